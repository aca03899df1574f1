"""What the side-by-side benchmark scripts share: paths, the shared harness, the dataset, small formatting.

Imported by ``bench_anonymize.py`` and ``bench_gateway.py`` (their folder is on ``sys.path`` when they run).
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
DATA = Path(os.environ.get("BENCH_DATA", "/tmp/dicombench-data"))
TMP_ROOT = os.environ.get("BENCH_TMP", "/tmp")

#: One measurement (a row of the saved JSON).
Rec = dict[str, Any]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt_num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def load_harness() -> ModuleType:
    """The shared harness (``../shared/bench/bench.py``) as a module: storescu driver, servers, Orthanc."""
    if not (BENCH / "bench.py").is_file():
        sys.exit(f"{BENCH}/bench.py not found: the benchmark harness lives in ../shared/bench")
    sys.path.insert(0, str(BENCH))
    return importlib.import_module("bench")


def ensure_data(ds_dir: Path) -> None:
    """Generate the ``ct`` dataset if missing (for one kind, make_dataset.py's --out is the dataset folder)."""
    if not (ds_dir / "manifest.json").exists():
        log(f"generating the ct dataset in {ds_dir}")
        subprocess.run([sys.executable, str(BENCH / "make_dataset.py"), "ct", "--out", str(ds_dir)], check=True)


def save_and_report(out_dir: str, name: str, info: dict[str, Any], recs: list[Rec], text: str) -> int:
    """Save every measurement (JSON) and the table (markdown) as ``<out_dir>/<name>-<stamp>.*``; the exit code:
    1 when a measurement failed its verification."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{name}-{time.strftime('%Y%m%dT%H%M%S')}")
    with open(base + ".json", "w") as fh:
        json.dump({"env": info, "records": recs}, fh, indent=1, default=str)
    with open(base + ".md", "w") as fh:
        fh.write(text + "\n")
    log(f"saved {base}.{{json,md}}")
    failed = [r for r in recs if not r.get("ok")]
    if failed:
        log(f"!! {len(failed)} measurement(s) FAILED verification - see the 'verified' column")
    return 1 if failed else 0
