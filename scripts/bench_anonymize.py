#!/usr/bin/env python3
"""Study anonymization benchmark: dicom-node next to Orthanc 1.10 and a naive pydicom loop, in one run.

Why: the issue asks whether our engine anonymizes a whole study (read, de-identify, write every instance) at
least 3x faster than Orthanc's ``POST /studies/{id}/anonymize``. Absolute rates drift on a shared machine, so
every target is measured in the *same* run, interleaved (the order rotates every repetition), and reported as
paired ratios (target inst/s / Orthanc inst/s of the same repetition), like the shared harness does for ingest.

Targets (dataset: the shared bench's 500-instance ``ct`` study, ~264 MB):

* ``orthanc``      Orthanc 1.10 ``POST /studies/{id}/anonymize`` body ``{}`` (synchronous: reads, anonymizes
                   and stores 500 new instances) after a one-time, separately reported REST upload; the new
                   study is deleted after each repetition (untimed). CPU: Orthanc's process session (/proc).
* ``pydicom``      the harness' naive loop (``bench._pure_chunk`` mode ``anon``: dcmread, basic-profile-like
                   edit, save_as), in this process (1) or a fork Pool (N). CPU: os.times incl. children.
* ``node-cli``     ``dicom-node anonymize DIR --out OUT --jobs N -q`` as a subprocess; wall time includes the
                   interpreter start-up and imports. CPU: os.times children.
* ``node-inproc``  ``node.batch.run(paths, Job(parse_anonymize({})), jobs=N)`` in this process: the engine
                   without start-up. CPU: os.times incl. children (the fork Pool's workers).

Every measurement writes to a fresh temp folder (deleted afterwards), counts the outputs (must be 500) and
checks one output: PatientName changed, SOPInstanceUID not one of the source's, no private tags. A failed
check makes that row an ERROR (left out of medians and ratios) and the exit code 1.

    python3 scripts/bench_anonymize.py                    # 3 reps, jobs 1 and 2, every target
    python3 scripts/bench_anonymize.py --reps 1 --jobs 2 --targets orthanc,node-inproc

Prints a markdown table; saves every measurement as JSON (and the table as .md) into --out-dir.
Prerequisites: Debian ``orthanc`` (``ORTHANC_BIN``, default /usr/sbin/Orthanc), ``requests``, the harness in
../shared/bench. The dataset is generated with the harness' make_dataset.py if missing.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from benchlib import DATA, ROOT, TMP_ROOT, Rec, ensure_data, fmt_num, load_harness, log, median, save_and_report

TARGETS = ("orthanc", "pydicom", "node-cli", "node-inproc")
TARGET_GOAL = 3.0  # the goal: node >= 3x Orthanc's study anonymize


def node_cli() -> list[str]:
    """The installed console script next to this interpreter (not a pyenv shim, whose bash start-up would be
    timed too); else ``python -m node``."""
    exe = Path(sys.executable).parent / "dicom-node"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-m", "node"]


# ----------------------------------------------------------------------------- source facts and verification
@dataclass(frozen=True)
class Source:
    ds_dir: Path
    files: list[str]  # names relative to ds_dir, from the manifest
    nbytes: int
    kind: str
    patient_name: str
    sop_uids: frozenset[str]

    @property
    def paths(self) -> list[str]:
        return [str(self.ds_dir / f) for f in self.files]


def load_source(bench: ModuleType, ds_dir: Path) -> Source:
    import pydicom

    man = bench.load_manifest(str(ds_dir))
    files = list(man["file_list"])
    if man["unique_sop_instance_uids"] != len(files):
        sys.exit(f"{ds_dir}: {len(files)} files but {man['unique_sop_instance_uids']} unique instances")
    sops, names = set(), set()
    for f in files:
        d = pydicom.dcmread(ds_dir / f, stop_before_pixels=True, specific_tags=["PatientName", "SOPInstanceUID"])
        sops.add(str(d.SOPInstanceUID))
        names.add(str(d.get("PatientName", "")))
    if len(names) != 1:
        sys.exit(f"{ds_dir}: expected one patient, found {len(names)} PatientNames")
    return Source(ds_dir, files, int(man["bytes"]), str(man["kind"]), names.pop(), frozenset(sops))


def check_anonymized(src: Source, data: str | Path | io.BytesIO) -> list[str]:
    """Problems with one output instance (empty list: it looks anonymized)."""
    import pydicom

    d = pydicom.dcmread(data, stop_before_pixels=True)
    problems = []
    if str(d.get("PatientName", "")) == src.patient_name:
        problems.append("PatientName unchanged")
    if str(d.get("SOPInstanceUID", "")) in src.sop_uids:
        problems.append("SOPInstanceUID unchanged")
    private = sum(1 for e in d.iterall() if e.tag.is_private)
    if private:
        problems.append(f"{private} private element(s) left")
    return problems


def output_files(out_dir: str) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(out_dir):
        found += [os.path.join(root, f) for f in files]
    return sorted(found)


def verify_folder(src: Source, out_dir: str) -> tuple[int, list[str]]:
    """(number of files written, problems): count must equal the source's, one output is checked."""
    outs = output_files(out_dir)
    problems = [] if len(outs) == len(src.files) else [f"wrote {len(outs)}/{len(src.files)} files"]
    if outs:
        problems += check_anonymized(src, outs[len(outs) // 2])
    return len(outs), problems


def cpu_times() -> float:
    """user+system CPU seconds of this process and its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ----------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class Unit:
    target: str
    jobs: int

    @property
    def label(self) -> str:
        return self.target if self.target == "orthanc" else f"{self.target} x{self.jobs}"


class Orthanc:
    """The harness' Orthanc target (fresh storage, TCP_NODELAY=1, own process session) holding the dataset."""

    def __init__(self, bench: ModuleType, src: Source, timeout: float) -> None:
        self.bench = bench
        self.src = src
        self.timeout = timeout
        self.target = bench.make_target("orthanc")
        self.work = ""
        self.studies: list[str] = []
        self.sess: Any = None

    def start(self) -> Rec:
        """Start Orthanc and upload the dataset over REST (timed, reported, not part of the ratios)."""
        ok, why = self.target.available()
        if not ok:
            raise RuntimeError(why)
        self.work = tempfile.mkdtemp(prefix="dicombench-anon-orthanc-", dir=TMP_ROOT)
        self.target.start(self.work)
        self.sess = self.bench.new_session()  # Accept-Encoding: identity (see bench.new_session)
        t0 = time.perf_counter()
        n_ok = self.bench.rest_upload(self.sess, self.target.rest, str(self.src.ds_dir), self.src.files)
        wall = time.perf_counter() - t0
        stored = self.target.count()
        self.studies = self.sess.get(self.target.rest + "/studies", timeout=60).json()
        problems = [] if stored == n_ok == len(self.src.files) else [f"stored {stored}/{len(self.src.files)}"]
        if len(self.studies) != 1:
            problems.append(f"{len(self.studies)} studies after upload, expected 1")
        return {
            "op": "rest-upload",
            "target": "orthanc",
            "jobs": 1,
            "rep": 0,
            "wall": wall,
            "produced": stored,
            "ok": not problems,
            "problems": problems,
        }

    def measure(self) -> Rec:
        s, base = self.sess, self.target.rest
        cpu0 = self.target.cpu()
        t0 = time.perf_counter()
        new_ids = []
        try:
            for sid in self.studies:
                r = s.post(f"{base}/studies/{sid}/anonymize", json={}, timeout=self.timeout)
                r.raise_for_status()
                new_ids.append(r.json()["ID"])
            wall = time.perf_counter() - t0
            cpu = self.target.cpu() - cpu0
            instances = [i["ID"] for nid in new_ids for i in s.get(f"{base}/studies/{nid}/instances").json()]
            problems = (
                []
                if len(instances) == len(self.src.files)
                else [f"anonymized study has {len(instances)}/{len(self.src.files)} instances"]
            )
            if instances:
                r = s.get(f"{base}/instances/{instances[len(instances) // 2]}/file", timeout=60)
                r.raise_for_status()
                problems += check_anonymized(self.src, io.BytesIO(r.content))
            return {"wall": wall, "cpu": cpu, "produced": len(instances), "problems": problems}
        finally:
            for nid in new_ids:  # untimed: back to the uploaded study only
                s.delete(f"{base}/studies/{nid}", timeout=self.timeout)
            left = self.target.count()
            if left != len(self.src.files):
                log(f"   warning: Orthanc holds {left} instances after deleting the anonymized study")

    def stop(self) -> None:
        self.target.stop()
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process + reaped children)."""
    c0 = cpu_times()
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    return result, wall, cpu_times() - c0


def run_pydicom(bench: ModuleType, src: Source, jobs: int, out_dir: str) -> int:
    """The harness' naive loop (same as ``bench.py pure``, mode anon): 1 process, or a fork Pool of ``jobs``."""
    if jobs == 1:
        return int(bench._pure_chunk((str(src.ds_dir), src.files, out_dir, "anon")))
    chunks = [(str(src.ds_dir), src.files[i::jobs], out_dir, "anon") for i in range(jobs)]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return sum(pool.map(bench._pure_chunk, chunks))


def new_job(out_dir: str) -> Any:
    from node import batch
    from node.dicom.request import parse_anonymize

    return batch.Job(mod=parse_anonymize({}), out_dir=out_dir, key=os.urandom(32), name_counter=1)


def run_inproc(src: Source, jobs: int, job: Any) -> Any:
    from node import batch

    return batch.run(src.paths, job, jobs=jobs)


SUMMARY_RE = re.compile(r"anonymize: (\d+) written, (\d+) duplicate\(s\), (\d+) skipped \(not DICOM\), (\d+) failed")


def measure(unit: Unit, bench: ModuleType, src: Source, orthanc: Orthanc | None, timeout: float) -> Rec:
    """One timed measurement of one target, verified; never raises."""
    rec: Rec = {"op": "study-anonymize", "target": unit.target, "jobs": unit.jobs}
    out_dir = tempfile.mkdtemp(prefix=f"dicombench-anon-{unit.target}-", dir=TMP_ROOT)
    try:
        if unit.target == "orthanc":
            assert orthanc is not None
            rec.update(orthanc.measure())
        elif unit.target == "pydicom":
            n, wall, cpu = _timed(lambda: run_pydicom(bench, src, unit.jobs, out_dir))
            produced, problems = verify_folder(src, out_dir)
            if n != len(src.files):
                problems.insert(0, f"loop reported {n}/{len(src.files)} files")
            rec.update({"wall": wall, "cpu": cpu, "produced": produced, "problems": problems})
        elif unit.target == "node-cli":
            cmd = [*node_cli(), "anonymize", str(src.ds_dir), "--out", out_dir, "--jobs", str(unit.jobs), "-q"]
            proc, wall, cpu = _timed(
                lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            )
            produced, problems = verify_folder(src, out_dir)
            m = SUMMARY_RE.search(proc.stdout)
            if proc.returncode != 0:
                problems.insert(0, f"exit code {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
            elif not m or int(m.group(1)) != len(src.files) or int(m.group(4)):
                problems.insert(0, f"summary line: {proc.stdout.strip()[-200:]!r}")
            rec.update(
                {
                    "wall": wall,
                    "cpu": cpu,
                    "produced": produced,
                    "problems": problems,
                    "cmd": " ".join(cmd),
                    "stdout": proc.stdout.strip()[-300:],
                }
            )
        elif unit.target == "node-inproc":
            job = new_job(out_dir)  # untimed: parsing the (empty) body and loading the profile
            summary, wall, cpu = _timed(lambda: run_inproc(src, unit.jobs, job))
            produced, problems = verify_folder(src, out_dir)
            written = summary.count("written")
            if written != len(src.files):
                why = "; ".join(f"{o.status}: {o.reason}" for o in summary.outcomes if o.status != "written")[:300]
                problems.insert(0, f"batch.run wrote {written}/{len(src.files)} ({why})")
            rec.update({"wall": wall, "cpu": cpu, "produced": produced, "problems": problems})
        else:
            raise ValueError(f"unknown target {unit.target!r}")
    except Exception as exc:  # noqa: BLE001 - a crash is a failed measurement, the run goes on
        rec["problems"] = [*rec.get("problems", []), f"{type(exc).__name__}: {exc}"]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    rec["ok"] = not rec.get("problems") and "wall" in rec
    rec["loadavg"] = os.getloadavg()[0]
    return rec


def warm_up(bench: ModuleType, src: Source, units: list[Unit]) -> None:
    """Untimed: run the in-process targets once on a few files so lazy imports are not charged to rep 0
    (Orthanc is warm too: it has just stored the study)."""
    small = Source(src.ds_dir, src.files[:4], 0, src.kind, src.patient_name, src.sop_uids)
    out_dir = tempfile.mkdtemp(prefix="dicombench-anon-warmup-", dir=TMP_ROOT)
    try:
        if any(u.target == "pydicom" for u in units):
            run_pydicom(bench, small, 1, out_dir)
        if any(u.target == "node-inproc" for u in units):
            run_inproc(small, 1, new_job(os.path.join(out_dir, "node")))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def fmt(rec: Rec, n: int, nbytes: int) -> str:
    if not rec.get("ok"):
        return "ERROR: " + "; ".join(rec.get("problems") or ["?"])
    cpu = f"  {1e3 * rec['cpu'] / n:.1f} ms CPU/inst" if rec.get("cpu") is not None else ""
    return f"{rec['wall']:.2f}s  {n / rec['wall']:.1f} inst/s  {nbytes / 1e6 / rec['wall']:.1f} MB/s{cpu}"


# ----------------------------------------------------------------------------- report
def paired_ratio(recs: list[Rec], unit: Unit, ref: Unit) -> float | None:
    """Median over reps of (unit inst/s / ref inst/s in the same rep)."""
    rate = {(r["target"], r["jobs"], r["rep"]): 1 / r["wall"] for r in recs if r.get("ok")}
    rs = [
        v / rate[(ref.target, ref.jobs, rep)]
        for (t, j, rep), v in rate.items()
        if (t, j) == (unit.target, unit.jobs) and (ref.target, ref.jobs, rep) in rate
    ]
    return median(rs)


def table(recs: list[Rec], units: list[Unit], src: Source, reps: int) -> str:
    n, nbytes = len(src.files), src.nbytes
    timed = [r for r in recs if r.get("op") == "study-anonymize"]
    orth, py1 = Unit("orthanc", 1), Unit("pydicom", 1)
    lines = [
        f"**study anonymization** of `{src.kind}` ({n} instances, {nbytes / 1e6:.1f} MB): read, anonymize, write "
        f"every instance; median of {reps} interleaved rep(s). x orthanc / x pydicom: median of the per-rep ratio "
        "of inst/s to that target in the same rep. CPU: Orthanc's process session; this process + children for "
        "pydicom / node-inproc; the subprocess tree for node-cli (incl. interpreter start-up).",
        "",
        "| target | jobs | wall s (min-max) | inst/s | MB/s | CPU ms/inst | x orthanc | x pydicom x1 | verified |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for u in units:
        rs = [r for r in timed if (r["target"], r["jobs"]) == (u.target, u.jobs)]
        good = [r for r in rs if r.get("ok")]
        bad = [r for r in rs if not r.get("ok")]
        status = (
            f"ok {len(good)}/{len(rs)}"
            if not bad
            else (f"**ERROR** {len(bad)}/{len(rs)}: {(bad[0].get('problems') or ['?'])[0]}")
        )
        name = "orthanc `POST /studies/{id}/anonymize`" if u.target == "orthanc" else u.target
        if not good:
            lines.append(f"| {name} | {u.jobs} | - | - | - | - | - | - | {status} |")
            continue
        walls = [r["wall"] for r in good]
        cpus = [1e3 * r["cpu"] / n for r in good if r.get("cpu") is not None]
        xo = "1.00" if u == orth else fmt_num(paired_ratio(timed, u, orth))
        xp = "1.00" if u == py1 else fmt_num(paired_ratio(timed, u, py1))
        lines.append(
            f"| {name} | {u.jobs} | {median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) | "
            f"{median([n / w for w in walls]):.1f} | {median([nbytes / 1e6 / w for w in walls]):.1f} | "
            f"{fmt_num(median(cpus), 1)} | {xo} | {xp} | {status} |"
        )
    up = [r for r in recs if r.get("op") == "rest-upload"]
    if up:
        r = up[0]
        lines += [
            "",
            "One-time REST upload to Orthanc (`POST /instances`, 1 client, not in the ratios): "
            + (
                f"{r['wall']:.2f} s, {n / r['wall']:.1f} inst/s."
                if r.get("ok")
                else "ERROR: " + "; ".join(r.get("problems") or ["?"])
            ),
        ]
    node_units = [u for u in units if u.target.startswith("node")]
    if any(u == orth for u in units) and node_units:
        verdict = []
        for u in node_units:
            x = paired_ratio(timed, u, orth)
            if x is not None:
                verdict.append(f"{u.label} {x:.2f}x ({'met' if x >= TARGET_GOAL else 'NOT met'})")
        lines += ["", f"Goal >= {TARGET_GOAL:.0f}x Orthanc: " + ("; ".join(verdict) or "no valid node measurement")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=DATA / "ct", help="dataset folder with manifest.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", default="1,2", help="worker processes for pydicom / node-cli / node-inproc")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)}")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before an Orthanc call / CLI run fails")
    ap.add_argument("--out-dir", default=os.path.join(TMP_ROOT, "dicombench-results"))
    a = ap.parse_args(argv)
    unknown = set(a.targets.split(",")) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s) {sorted(unknown)}; choose from {','.join(TARGETS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    bench = load_harness()
    sys.path.insert(0, str(ROOT))  # node-inproc measures this checkout
    ensure_data(a.dataset)
    src = load_source(bench, a.dataset)
    jobs = [int(j) for j in a.jobs.split(",")]
    names = a.targets.split(",")
    units = [
        Unit(t, 1 if t == "orthanc" else j) for t in TARGETS if t in names for j in ([1] if t == "orthanc" else jobs)
    ]
    info = bench.env_info()
    info.update({"node_cli": " ".join(node_cli()), "dataset": str(a.dataset), "argv": sys.argv})
    log(f"env: {json.dumps(info, default=str)}")
    log(
        f"== study anonymize {src.kind} ({len(src.files)} instances, {src.nbytes / 1e6:.1f} MB) x {a.reps} reps: "
        + ", ".join(u.label for u in units)
    )
    recs: list[Rec] = []
    orthanc: Orthanc | None = None
    try:
        if any(u.target == "orthanc" for u in units):
            orthanc = Orthanc(bench, src, a.timeout)
            try:
                rec = orthanc.start()
            except Exception as exc:  # noqa: BLE001 - Orthanc missing/broken: its row is an ERROR
                rec = {
                    "op": "rest-upload",
                    "target": "orthanc",
                    "jobs": 1,
                    "rep": 0,
                    "ok": False,
                    "problems": [f"{type(exc).__name__}: {exc}"],
                }
            recs.append(rec)
            log(f"   upload  orthanc          {fmt(rec, len(src.files), src.nbytes)}")
            if not rec["ok"]:
                orthanc.stop()
                units = [u for u in units if u.target != "orthanc"]
                recs.append({**rec, "op": "study-anonymize", "rep": 0})
                orthanc = None
        warm_up(bench, src, units)
        for rep in range(a.reps):
            k = rep % len(units) if units else 0
            for u in units[k:] + units[:k]:
                rec = measure(u, bench, src, orthanc, a.timeout)
                rec.update({"rep": rep, "expected": len(src.files), "bytes": src.nbytes})
                recs.append(rec)
                log(f"   rep {rep} {u.label:<16} {fmt(rec, len(src.files), src.nbytes)}")
    finally:
        if orthanc is not None:
            orthanc.stop()
    all_units = [
        Unit(t, 1 if t == "orthanc" else j) for t in TARGETS if t in names for j in ([1] if t == "orthanc" else jobs)
    ]
    text = "\n".join(
        [
            "# dicom-node study anonymization benchmark",
            "",
            f"{info['date_utc']}, {info['cpus']} CPUs, {info['mem_total_gb']} GB RAM, loadavg at start "
            f"{info['loadavg'][0]:.2f} / end {os.getloadavg()[0]:.2f}; {info['orthanc']}; Python {info['python']}, "
            f"pydicom {info['pydicom']}; node CLI `{info['node_cli']}`",
            "",
            table(recs, all_units, src, a.reps),
        ]
    )
    print(text)
    return save_and_report(a.out_dir, "anonymize-study", info, recs, text)


if __name__ == "__main__":
    raise SystemExit(main())
