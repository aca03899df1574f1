#!/usr/bin/env python3
"""Ingest benchmark: dicom-node next to DCMTK storescp, a bare pynetdicom SCP and Orthanc, in one run.

Drives ``../shared/bench/bench.py ingest`` (the side-by-side harness) with our node plugged into its ``node``
slot, so every figure is measured interleaved with the peers and reported as ratios (x storescp, x orthanc).

    python3 scripts/bench_ingest.py                       # ct + small datasets, 1 and 4 senders, 3 reps
    python3 scripts/bench_ingest.py --reps 1 --parallel 1 --datasets ct

Prerequisites (installed on demand when run as root): Debian ``dcmtk`` and ``orthanc``; the datasets are
generated under /tmp/dicombench-data by the harness' make_dataset.py if missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
DATA = Path(os.environ.get("BENCH_DATA", "/tmp/dicombench-data"))

#: How the harness starts the node: storage under its fresh folder, index beside it (not counted as files).
NODE_CMD = (
    f"{sys.executable} -m node serve --dicom-port {{dicom_port}} --dicom-aet {{aet}} "
    "--dicom-listen-address 127.0.0.1 --storage-directory {storage} --index-directory {workdir}/index"
)


def ensure_tools() -> None:
    missing = [p for p in ("/usr/bin/storescu", "/usr/bin/storescp", "/usr/sbin/Orthanc") if not Path(p).exists()]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"missing {missing}: apt-get install dcmtk orthanc")
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "dcmtk", "orthanc"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))  # fmt: skip


def ensure_data(kinds: list[str]) -> None:
    for kind in kinds:
        if not (DATA / kind / "manifest.json").exists():
            subprocess.run([sys.executable, str(BENCH / "make_dataset.py"), kind, "--out", str(DATA)], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="ct,small")
    ap.add_argument("--parallel", default="1,4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--targets", default="storescp,pynetdicom,orthanc,node")
    ap.add_argument("--out-dir", default="/tmp/dicombench-results")
    a = ap.parse_args()
    if not BENCH.is_dir():
        sys.exit(f"{BENCH} not found: the benchmark harness lives in ../shared/bench")
    ensure_tools()
    kinds = a.datasets.split(",")
    ensure_data(kinds)
    env = dict(os.environ, BENCH_NODE_CMD=NODE_CMD, BENCH_NODE_AET="NODE", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(BENCH / "bench.py"), "ingest", "--reps", str(a.reps), "--parallel", a.parallel,
           "--targets", a.targets, "--out-dir", a.out_dir, "--dataset", *[str(DATA / k) for k in kinds]]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    if shutil.which("storescu") and not Path("/usr/bin/storescu").exists():
        print("note: the storescu on PATH is pynetdicom's; the harness uses /usr/bin/storescu", file=sys.stderr)
    raise SystemExit(main())
