#!/usr/bin/env python3
"""REST anonymization benchmark: dicom-node's Orthanc-compatible routes next to Orthanc 1.10, in one run.

Why: the issue asks that ``POST /studies/{id}/anonymize`` runs at least 1.5x as fast as Orthanc's, and that
``POST /instances/{id}/anonymize`` called instance by instance (as a script would) is at least as fast as
Orthanc's. Absolute rates drift on a shared machine, so both servers are measured in the *same* run,
interleaved (the order of the four measurements rotates every repetition), and the goals are judged on paired
per-repetition ratios (node inst/s / Orthanc inst/s of the same repetition).

Targets, each in a fresh temp folder with free ports, holding the same study (the shared bench's 500-instance
``ct`` study, ~264 MB, or its first ``--instances`` files) uploaded once over REST (``POST /instances``, one
keep-alive client; timed and reported, not part of the goals):

* ``orthanc``  Orthanc 1.10 (the harness' Orthanc target: defaults, SQLite index, ``TCP_NODELAY=1``).
* ``node``     ``python -m node serve --config F`` of this checkout, F = HTTP and DICOM on free ports,
               ``RemoteAccessAllowed: false``, ``SyncStorageArea: true``, default ``JobsProcesses`` (one per core).

Measurements per repetition and target:

* ``study``     ``POST /studies/{id}/anonymize`` body ``{}`` (synchronous: reads, anonymizes and stores N new
                instances). Verified: HTTP 200 with an ``ID`` and ``InstancesCount`` == N, the server then holds
                2N instances, one new instance is anonymized (PatientName ``Anonymized...``, new SOPInstanceUID,
                no private tags). Afterwards (untimed) every study but the uploaded one is deleted and the
                server must hold N instances again, so every repetition starts from the same state.
* ``instance``  ``POST /instances/{id}/anonymize`` body ``{}`` for each of the N instances, sequentially, one
                ``requests.Session`` (keep-alive); nothing is stored. Verified: N answers HTTP 200 with ``DICM``
                at byte 128; the first, middle and last answers parsed with pydicom and checked as above.

Before the first repetition each server does one untimed study and a few instance anonymizations (warm-up:
the node starts its rewrite worker pool on its first job; Orthanc is warm from the upload). Wall time is
the client's ``time.perf_counter`` around the requests; server CPU is the server's whole process session
(``/proc``, as the harness measures it, incl. the node's HTTP child and job workers); client CPU is this
process (``os.times``). REST calls send ``Accept-Encoding: identity`` like the harness (Orthanc 1.10 would
otherwise gzip every answer; ``BENCH_HTTP_GZIP=1`` measures with gzip). A failed check makes that row an
ERROR (left out of medians and ratios) and the exit code 1.

    python3 scripts/bench_rest.py                          # 3 reps, 500 instances, orthanc and node
    python3 scripts/bench_rest.py --reps 1 --instances 40  # smoke run

Prints a markdown table (paste into docs/benchmarks.md); saves every measurement as JSON (and the table as
.md) into --out-dir. Prerequisites: Debian ``orthanc`` (``ORTHANC_BIN``, default /usr/sbin/Orthanc),
``requests``, the harness in ../shared/bench; the dataset is generated with its make_dataset.py if missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from bench_anonymize import Source, check_anonymized, cpu_times, load_source
from bench_gateway import free_port, log_tail
from benchlib import DATA, ROOT, TMP_ROOT, Rec, ensure_data, fmt_num, load_harness, log, median, save_and_report

TARGETS = ("orthanc", "node")
OPS = ("study", "instance")
GOALS = {"study": 1.5, "instance": 1.0}  # node inst/s >= goal x Orthanc inst/s (same rep)
LABEL = {
    "rest-upload": "REST upload `POST /instances` (1 client)",
    "study": "`POST /studies/{id}/anonymize` (sync, stores N)",
    "instance": "`POST /instances/{id}/anonymize` x N (1 keep-alive client)",
}
ANON_PREFIX = "Anonymized"  # Orthanc's (and the node's) PatientName after a default /anonymize: Anonymized<n>
#: Settle time after a server answers GET /system (untimed): the node forks its receivers and routing worker.
SETTLE_S = 0.5


# ----------------------------------------------------------------------------- servers
class NodeServer:
    """dicom-node of this checkout, shaped like the harness' targets (start/cpu/count/stop, ``rest``)."""

    name = "node"

    def __init__(self, bench: ModuleType) -> None:
        self.bench = bench
        self.dicom_port, self.http_port = free_port(), free_port()
        self.rest = f"http://127.0.0.1:{self.http_port}"
        self.server: Any = None
        self.logpath = ""

    def available(self) -> tuple[bool, str]:
        return True, ""

    def start(self, workdir: str) -> None:
        cfg: Rec = {
            "Name": "bench-rest",
            "DicomAet": "NODE",
            "DicomPort": self.dicom_port,
            "DicomListenAddress": "127.0.0.1",
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "SyncStorageArea": True,
            "StorageDirectory": "storage",  # relative: resolved against the config file's folder
            "IndexDirectory": "index",
        }
        path = os.path.join(workdir, "node.json")
        with open(path, "w") as fh:
            json.dump(cfg, fh, indent=1)
        # measure this checkout, configured by the file only (no DICOM_NODE_* override from the caller's env)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.logpath = os.path.join(workdir, "node.log")
        cmd = [sys.executable, "-m", "node", "serve", "--config", path]
        self.server = self.bench.Server(cmd, self.logpath, cwd=workdir, env=env)
        self.bench.wait_http(self.rest + "/system", self.server.proc)
        self.bench.wait_port(self.dicom_port, self.server.proc)

    def cpu(self) -> float:
        return float(self.server.cpu())

    def count(self) -> int:
        return int(self.bench.http_get(self.rest + "/statistics", timeout=30).json()["CountInstances"])

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def make_server(bench: ModuleType, name: str) -> Any:
    if name == "node":
        return NodeServer(bench)
    t = bench.make_target("orthanc")  # the harness' Orthanc (TCP_NODELAY=1, own session, /statistics count)
    t.dicom_port, t.http_port = free_port(), free_port()  # not the harness' fixed ports: other runs may hold them
    t.rest = f"http://127.0.0.1:{t.http_port}"
    return t


def server_log(srv: Any) -> str:
    if isinstance(srv, NodeServer):
        return srv.logpath
    return srv.server.logpath if getattr(srv, "server", None) is not None else ""


def http_problem(what: str, r: Any) -> str:
    return f"{what}: HTTP {r.status_code}: {r.text.strip()[:400]}"


class Side:
    """One server holding the uploaded study, and what is measured on it."""

    def __init__(self, bench: ModuleType, name: str, src: Source, timeout: float) -> None:
        self.bench = bench
        self.name = name
        self.src = src
        self.n = len(src.files)
        self.timeout = timeout
        self.srv = make_server(bench, name)
        self.work = tempfile.mkdtemp(prefix=f"dicombench-rest-{name}-", dir=TMP_ROOT)
        self.upload: Rec = {}
        self.sess: Any = None
        self.study = ""
        self.instances: list[str] = []

    # -- setup
    def start(self) -> Rec:
        """Start the server and upload the study (timed, reported, not part of the goals); never raises."""
        rec: Rec = {"op": "rest-upload", "target": self.name, "rep": 0}
        problems: list[str] = []
        try:
            ok, why = self.srv.available()
            if not ok:
                raise RuntimeError(why)
            self.srv.start(self.work)
            time.sleep(SETTLE_S)
            self.sess = self.bench.new_session()  # Accept-Encoding: identity (see bench.new_session)
            base = self.srv.count()
            rec.update(self._timed(lambda: self.bench.rest_upload(self.sess, self.srv.rest, str(self.src.ds_dir),
                                                                  self.src.files)))  # fmt: skip
            accepted = rec.pop("result")
            stored = self.srv.count() - base
            rec["produced"] = stored
            if stored != self.n or accepted != self.n:
                problems.append(f"stored {stored}/{self.n} ({accepted} uploads answered 200)")
            studies = self.sess.get(self.srv.rest + "/studies", timeout=60).json()
            if len(studies) != 1:
                problems.append(f"{len(studies)} studies after the upload, expected 1")
            else:
                self.study = studies[0]
                listed = self.sess.get(f"{self.srv.rest}/studies/{self.study}/instances", timeout=60).json()
                self.instances = [i["ID"] for i in listed]
                if len(self.instances) != self.n:
                    problems.append(f"the study lists {len(self.instances)}/{self.n} instances")
        except Exception as exc:  # noqa: BLE001 - a server that does not start is an ERROR row, the run goes on
            problems.append(f"{type(exc).__name__}: {exc}")
        if problems and server_log(self.srv):
            rec["log_tail"] = log_tail(server_log(self.srv))
        return finish(rec, problems)

    def _timed(self, fn: Callable[[], Any]) -> Rec:
        """Run ``fn``: its result, wall seconds, server CPU (process session) and client CPU (this process)."""
        s0, c0 = self.srv.cpu(), cpu_times()
        t0 = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        return {"result": result, "wall": wall, "server_cpu": self.srv.cpu() - s0, "client_cpu": cpu_times() - c0}

    def check_instance(self, data: bytes) -> list[str]:
        import pydicom

        problems = check_anonymized(self.src, io.BytesIO(data))
        name = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).get("PatientName", ""))
        if not name.startswith(ANON_PREFIX):
            problems.append(f"PatientName {name!r} does not start with {ANON_PREFIX!r}")
        return problems

    # -- measurements
    def measure(self, op: str) -> Rec:
        """One timed, verified measurement; never raises."""
        rec: Rec = {"op": op, "target": self.name, "expected": self.n, "bytes": self.src.nbytes}
        problems: list[str] = []
        try:
            problems = self._study(rec) if op == "study" else self._instances(rec, self.instances)
        except Exception as exc:  # noqa: BLE001 - a crash is a failed measurement, the run goes on
            problems.append(f"{type(exc).__name__}: {exc}")
        rec["loadavg"] = os.getloadavg()[0]
        return finish(rec, problems)

    def _study(self, rec: Rec) -> list[str]:
        s, base = self.sess, self.srv.rest
        problems: list[str] = []
        try:
            t = self._timed(lambda: s.post(f"{base}/studies/{self.study}/anonymize", json={}, timeout=self.timeout))
            r = t.pop("result")
            rec.update(t)
            answer = r.json() if r.status_code == 200 else {}
            rec["answer"] = {k: answer.get(k) for k in ("ID", "InstancesCount", "FailedInstancesCount", "Type")}
            new_id = answer.get("ID")
            if r.status_code != 200:
                problems.append(http_problem("study anonymize", r))
            elif not new_id:
                problems.append(f"answer without ID: {r.text[:200]}")
            if r.status_code == 200 and answer.get("InstancesCount") != self.n:
                problems.append(f"InstancesCount {answer.get('InstancesCount')}, expected {self.n}")
            held = self.srv.count()
            rec["held"] = held
            if held != 2 * self.n:
                problems.append(f"server holds {held} instances after the anonymization, expected {2 * self.n}")
            if new_id:  # one new instance, downloaded and checked
                listed = s.get(f"{base}/studies/{new_id}/instances", timeout=60).json()
                rec["produced"] = len(listed)
                if listed:
                    f = s.get(f"{base}/instances/{listed[len(listed) // 2]['ID']}/file", timeout=60)
                    problems += self.check_instance(f.content) if f.status_code == 200 else [http_problem("file", f)]
        finally:
            problems += self.reset()
        return problems

    def reset(self) -> list[str]:
        """Untimed: delete every study but the uploaded one; the server must hold the N uploaded instances."""
        s, base = self.sess, self.srv.rest
        problems = []
        for sid in s.get(f"{base}/studies", timeout=60).json():
            if sid != self.study:
                r = s.delete(f"{base}/studies/{sid}", timeout=self.timeout)
                if r.status_code != 200:
                    problems.append(http_problem(f"DELETE /studies/{sid}", r))
        left = self.srv.count()
        if left != self.n:
            problems.append(f"server holds {left} instances after deleting the anonymized study, expected {self.n}")
        return problems

    def _instances(self, rec: Rec, ids: list[str]) -> list[str]:
        s, base, n = self.sess, self.srv.rest, len(ids)
        samples = {0, n // 2, n - 1}
        kept: dict[int, bytes] = {}
        failures: list[str] = []

        def run() -> int:
            good = 0
            for i, iid in enumerate(ids):
                r = s.post(f"{base}/instances/{iid}/anonymize", json={}, timeout=self.timeout)
                if r.status_code == 200 and r.content[128:132] == b"DICM":
                    good += 1
                    if i in samples:
                        kept[i] = r.content
                elif not failures:
                    failures.append(http_problem(f"instance {iid}", r) if r.status_code != 200 else "not DICOM")
            return good

        t = self._timed(run)
        good = t.pop("result")
        rec.update(t)
        rec["produced"] = good
        problems = [] if good == n else [f"{good}/{n} answers were DICOM files", *failures]
        for i in sorted(kept):
            problems += [f"answer {i}: {p}" for p in self.check_instance(kept[i])]
        held = self.srv.count()
        if held != self.n:
            problems.append(f"server holds {held} instances after per-instance anonymize, expected {self.n}")
        return problems

    def warm_up(self) -> Rec:
        """Untimed for the goals: one study anonymization (+ reset) and 3 instance anonymizations."""
        rec: Rec = {"op": "warm-up", "target": self.name, "rep": -1}
        problems: list[str] = []
        try:
            study: Rec = {}
            problems += [f"study: {p}" for p in self._study(study)]
            inst: Rec = {}
            problems += [f"instance: {p}" for p in self._instances(inst, self.instances[:3])]
            rec.update({"study_wall": study.get("wall"), "instance_wall_3": inst.get("wall")})
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{type(exc).__name__}: {exc}")
        return finish(rec, problems)

    def stop(self) -> None:
        try:
            self.srv.stop()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)


def finish(rec: Rec, problems: list[str]) -> Rec:
    rec["problems"] = problems
    rec["ok"] = not problems
    return rec


def fmt(rec: Rec, n: int) -> str:
    if not rec.get("ok"):
        return "ERROR: " + "; ".join(rec.get("problems") or ["?"])
    if rec["op"] == "warm-up":
        return f"ok (study {fmt_num(rec.get('study_wall'))}s, 3 instances {fmt_num(rec.get('instance_wall_3'))}s)"
    return (
        f"{rec['wall']:.2f}s  {n / rec['wall']:.1f} inst/s  server {1e3 * rec['server_cpu'] / n:.2f} ms CPU/inst"
        f"  client {1e3 * rec['client_cpu'] / n:.2f} ms CPU/inst"
    )


# ----------------------------------------------------------------------------- report
def paired(recs: list[Rec], op: str) -> list[tuple[int, float]]:
    """Per rep: node inst/s / Orthanc inst/s (= Orthanc wall / node wall) of ``op``, where both are valid."""
    wall = {(r["target"], r["rep"]): r["wall"] for r in recs if r["op"] == op and r.get("ok")}
    return [
        (rep, wall[("orthanc", rep)] / w)
        for (t, rep), w in sorted(wall.items(), key=lambda x: x[0][1])
        if t == "node" and ("orthanc", rep) in wall
    ]


def table(recs: list[Rec], targets: list[str], src: Source, reps: int) -> str:
    n, nbytes = len(src.files), src.nbytes
    lines = [
        f"**REST anonymization** of `{src.kind}` ({n} instances, {nbytes / 1e6:.1f} MB, one study) held by each "
        f"server; median of {reps} interleaved rep(s). x Orthanc: median of the per-rep ratio of inst/s to "
        "Orthanc's in the same rep. Server CPU: the server's process session; client CPU: the Python client.",
        "",
        "| operation | target | wall s (min-max) | inst/s | MB/s | server CPU ms/inst | client CPU ms/inst | x Orthanc "
        "| verified |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for op in ("rest-upload", *OPS):
        ratios = [x for _rep, x in paired(recs, op)]
        for t in targets:
            rs = [r for r in recs if r["op"] == op and r["target"] == t]
            if not rs:
                continue
            good = [r for r in rs if r.get("ok")]
            bad = [r for r in rs if not r.get("ok")]
            status = (
                f"ok {len(good)}/{len(rs)}"
                if not bad
                else f"**ERROR** {len(bad)}/{len(rs)}: {(bad[0].get('problems') or ['?'])[0][:200]}"
            )
            name = f"**{t}**" if t == "node" else t
            if not good:
                lines.append(f"| {LABEL[op]} | {name} | - | - | - | - | - | - | {status} |")
                continue
            walls = [r["wall"] for r in good]
            xo = "1.00" if t == "orthanc" else fmt_num(median(ratios))
            lines.append(
                f"| {LABEL[op]} | {name} | {median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) "
                f"| {median([n / w for w in walls]):.1f} | {median([nbytes / 1e6 / w for w in walls]):.1f} "
                f"| {median([1e3 * r['server_cpu'] / n for r in good]):.2f} "
                f"| {median([1e3 * r['client_cpu'] / n for r in good]):.2f} | {xo} | {status} |"
            )
    if set(TARGETS) <= set(targets):
        lines.append("")
        for op in OPS:
            pr = paired(recs, op)
            m = median([x for _rep, x in pr])
            verdict = "no valid pair" if m is None else f"median **{m:.2f}** ({'met' if m >= GOALS[op] else 'NOT met'})"
            per_rep = ", ".join(f"{x:.2f}" for _rep, x in pr) or "-"
            lines.append(f"- {op}: node / Orthanc inst/s per rep {per_rep}; goal >= {GOALS[op]:g}, {verdict}")
    warm = [r for r in recs if r["op"] == "warm-up" and r.get("ok")]
    if warm:
        lines += ["", "Warm-up (untimed for the ratios), study anonymize wall: "
                  + ", ".join(f"{r['target']} {fmt_num(r.get('study_wall'))} s" for r in warm)]  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def dataset_dir(path: Path) -> Path:
    """``--data`` may be the dataset folder or the data root holding ``ct/``."""
    if not (path / "manifest.json").exists() and (path / "ct" / "manifest.json").exists():
        return path / "ct"
    return path


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA / "ct", help="dataset folder with manifest.json (or its "
                    "parent holding ct/); generated if missing")  # fmt: skip
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--instances", type=int, default=0, help="use only the first N instances (quick runs)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)}")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before one HTTP call fails")
    ap.add_argument("--out-dir", default=os.path.join(TMP_ROOT, "dicombench-results"))
    a = ap.parse_args(argv)
    names = [t for t in a.targets.split(",") if t]
    unknown = set(names) - set(TARGETS)
    if unknown or not names:
        ap.error(f"unknown target(s) {sorted(unknown)}; choose from {','.join(TARGETS)}")
    if a.reps < 1 or a.instances < 0:
        ap.error("--reps must be >= 1 and --instances >= 0")
    return a


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: servers stopped, folders deleted


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    bench = load_harness()
    ds_dir = dataset_dir(a.data)
    ensure_data(ds_dir)
    src = load_source(bench, ds_dir)
    if a.instances and a.instances < len(src.files):
        files = src.files[: a.instances]
        src = dataclasses.replace(src, files=files, nbytes=sum((ds_dir / f).stat().st_size for f in files))
    n = len(src.files)
    targets = [t for t in TARGETS if t in a.targets.split(",")]
    info = bench.env_info()
    info.update({"dataset": str(ds_dir), "instances": n, "argv": sys.argv, "commit": git_commit()})
    log(f"env: {json.dumps(info, default=str)}")
    log(f"== REST anonymize {src.kind} ({n} instances, {src.nbytes / 1e6:.1f} MB) x {a.reps} reps: "
        + ", ".join(targets))  # fmt: skip
    recs: list[Rec] = []
    sides: list[Side] = []
    try:
        for t in targets:
            side = Side(bench, t, src, a.timeout)
            sides.append(side)
            rec = side.upload = side.start()
            rec.update({"expected": n, "bytes": src.nbytes})
            recs.append(rec)
            log(f"   upload   {t:<8} {fmt(rec, n)}")
            if rec.get("log_tail"):
                log("      server log tail:\n" + "\n".join("      | " + x for x in rec["log_tail"].splitlines()))
        live = [s for s in sides if s.upload.get("ok")]
        for side in live:
            rec = side.warm_up()
            recs.append(rec)
            log(f"   warm-up  {side.name:<8} {fmt(rec, n)}")
        units = [(op, s) for op in OPS for s in live]
        for rep in range(a.reps):
            k = rep % len(units) if units else 0
            for op, side in units[k:] + units[:k]:
                rec = side.measure(op)
                rec["rep"] = rep
                recs.append(rec)
                log(f"   rep {rep} {op:<8} {side.name:<8} {fmt(rec, n)}")
            for op in OPS:
                x = dict(paired(recs, op)).get(rep)
                if x is not None:
                    log(f"   rep {rep} {op:<8} node/orthanc {x:.2f} (goal >= {GOALS[op]:g})")
    finally:
        for side in sides:
            side.stop()
    for side in sides:  # a server that did not start or upload still gets its (ERROR) rows
        if not side.upload.get("ok"):
            recs += [{**side.upload, "op": op, "rep": 0} for op in OPS]
    text = "\n".join(
        [
            "# dicom-node REST anonymization benchmark",
            "",
            f"{info['date_utc']}, {info['cpus']} CPUs, {info['mem_total_gb']} GB RAM, loadavg at start "
            f"{info['loadavg'][0]:.2f} / end {os.getloadavg()[0]:.2f}; {info['orthanc']}; Python {info['python']}, "
            f"pydicom {info['pydicom']}; dicom-node commit {info['commit']}",
            "",
            table(recs, targets, src, a.reps),
        ]
    )
    print(text)
    return save_and_report(a.out_dir, "rest", info, recs, text)


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # the servers are stopped and their folders deleted by main's finally
        log("interrupted: servers stopped, temp folders deleted, nothing saved")
        raise SystemExit(130) from None
