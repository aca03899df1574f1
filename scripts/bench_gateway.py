#!/usr/bin/env python3
"""De-identify-and-forward gateway benchmark: dicom-node's routing rule next to its own plain ingest and
Orthanc 1.10's Lua gateway, in one run.

Why: the issue asks that the gateway (receive, anonymize, forward every instance) costs at most 1.3x the
node's plain ingest time and is at least 2x faster than the usual Orthanc recipe. Absolute times drift on a
shared machine, so every target is measured in the *same* run, interleaved (the order rotates every
repetition), and the goals are judged on paired per-repetition ratios of wall times.

Targets (dataset: the shared bench's 500-instance ``ct`` study, ~264 MB; one DCMTK storescu association):

* ``node-ingest``   dicom-node without ``Routes``. Time: storescu start -> storescu exit (all 500 acknowledged,
                    each one fsync'ed and indexed before its Success): the plain ingest time.
* ``node-gateway``  dicom-node with the rule ``{"Anonymize": {"DicomVersion": "2023b"}, "Forward": ["dest"]}``;
                    ``dest`` is a DCMTK storescp (``storescp -aet DEST +xa -od DIR``). Time: storescu start ->
                    the destination folder holds 500 files whose total size no longer changes (polled every
                    20 ms). The storescu exit inside the same run is reported as "ingest", the rest as the
                    forwarding tail.
* ``orthanc-lua``   Orthanc 1.10 with the classic instance-level Lua recipe (the Orthanc book's auto-routing
                    sample with ``/anonymize`` instead of ``/modify``): ``OnStoredInstance`` -> ``RestApiPost
                    /instances/{id}/anonymize`` -> ``RestApiPost /instances`` -> ``Delete(SendToModality(id,
                    'dest'))`` (a Lua job: one association, anonymized copy deleted once sent). Orthanc 1.10
                    knows no ``2023b`` profile (HTTP 400), so it runs its newest one, ``2021b``. Same timing.

Every server, and the destination, runs in a fresh temp folder (deleted afterwards, unless --keep-failed)
with fresh ports, DCMTK and Orthanc with ``TCP_NODELAY=1`` (DCMTK 3.6.7 leaves Nagle on otherwise: ~45 ms
stalls per PDU exchange). Verification per measurement: storescu exited cleanly; the node stored (ingest) or
the destination received (gateways) exactly 500 files; one received file has another PatientName and a
StudyInstanceUID that is not the source's; for the node all 500 received files share ONE StudyInstanceUID
(the point of its persistent UID map). Orthanc anonymizes each instance with a fresh UID map, which splits
the study (spec edge case 70): its number of studies is reported, not judged. A failed check makes that row
an ERROR (left out of medians and ratios) and the exit code 1.

    python3 scripts/bench_gateway.py                         # 3 reps, every target
    python3 scripts/bench_gateway.py --reps 1 --targets node-ingest,node-gateway

Prints a markdown table; saves every measurement as JSON (and the table as .md) into --out-dir.
Prerequisites: Debian ``dcmtk`` (/usr/bin/storescu, /usr/bin/storescp; not pynetdicom's console scripts of
the same names) and ``orthanc`` (``ORTHANC_BIN``, default /usr/sbin/Orthanc), the harness in ../shared/bench.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from benchlib import DATA, ROOT, TMP_ROOT, Rec, ensure_data, fmt_num, load_harness, log, median, save_and_report

TARGETS = ("node-ingest", "node-gateway", "orthanc-lua")
GATEWAYS = ("node-gateway", "orthanc-lua")
GOAL_VS_INGEST = 1.3  # node-gateway wall <= 1.3x node-ingest wall (same rep)
GOAL_VS_ORTHANC = 2.0  # orthanc-lua wall >= 2x node-gateway wall (same rep)
NODE_DICOM_VERSION = "2023b"
ORTHANC_DICOM_VERSION = "2021b"  # Orthanc 1.10.1 answers 400 "Unknown specific version" to 2023b
POLL_S = 0.02
#: Settle time after a server's port opens (untimed): dicom-node forks its receivers and routing workers, the
#: port answers as soon as the first receiver listens; the others should be up before the clock starts.
SETTLE_S = 0.5
#: Give up waiting for the destination when nothing arrived for this long after storescu exited.
STALL_S = 120.0


LUA_SCRIPT = """\
-- De-identify and forward, instance by instance (the Orthanc book's auto-routing recipe with /anonymize).
function OnStoredInstance(instanceId, tags, metadata, origin)
   -- the anonymized copy uploaded below triggers this callback again: skip it
   if origin['RequestOrigin'] ~= 'Lua' then
      local anonymized = RestApiPost('/instances/' .. instanceId .. '/anonymize', '%(body)s')
      local uploaded = ParseJson(RestApiPost('/instances', anonymized))
      Delete(SendToModality(uploaded['ID'], 'dest'))
   end
end
"""


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick; fresh per server so a lingering one cannot answer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- source facts and verification
@dataclass(frozen=True)
class Source:
    ds_dir: Path
    files: list[str]  # names relative to ds_dir, from the manifest
    nbytes: int
    kind: str
    proposal: list[str]  # storescu presentation-context options, as the harness' ingest uses them
    patient_name: str
    study_uids: frozenset[str]


def load_source(bench: ModuleType, ds_dir: Path) -> Source:
    import pydicom

    man = bench.load_manifest(str(ds_dir))
    files = list(man["file_list"])
    if man["unique_sop_instance_uids"] != len(files):
        sys.exit(f"{ds_dir}: {len(files)} files but {man['unique_sop_instance_uids']} unique instances")
    names, studies = set(), set()
    for f in files:
        d = pydicom.dcmread(ds_dir / f, stop_before_pixels=True, specific_tags=["PatientName", "StudyInstanceUID"])
        names.add(str(d.get("PatientName", "")))
        studies.add(str(d.StudyInstanceUID))
    if len(names) != 1:
        sys.exit(f"{ds_dir}: expected one patient, found {len(names)} PatientNames")
    proposal = (
        ["-xf", str(ds_dir / man["storescu_cfg"]), man["storescu_profile"]] if man.get("storescu_cfg") else ["-R"]
    )
    return Source(ds_dir, files, int(man["bytes"]), str(man["kind"]), proposal, names.pop(), frozenset(studies))


def folder_state(folder: str) -> tuple[int, int]:
    """(files, total bytes) directly in ``folder`` (storescp -od writes flat, straight under the final name)."""
    n = size = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                n += 1
                size += e.stat(follow_symlinks=False).st_size
    return n, size


def verify_received(src: Source, folder: str, one_study: bool) -> tuple[int, int | None, list[str]]:
    """(files, distinct StudyInstanceUIDs, problems) of what the destination received."""
    import pydicom

    paths = sorted(str(p) for p in Path(folder).iterdir() if p.is_file())
    problems = [] if len(paths) == len(src.files) else [f"destination received {len(paths)}/{len(src.files)}"]
    if not paths:
        return 0, None, problems
    d = pydicom.dcmread(paths[len(paths) // 2], stop_before_pixels=True)
    if str(d.get("PatientName", "")) == src.patient_name:
        problems.append("PatientName unchanged")
    if str(d.get("StudyInstanceUID", "")) in src.study_uids:
        problems.append("StudyInstanceUID unchanged")
    studies = {str(pydicom.dcmread(p, specific_tags=["StudyInstanceUID"]).StudyInstanceUID) for p in paths}
    if one_study and len(studies) != 1:
        problems.append(f"{len(studies)} studies at the destination, expected 1")
    return len(paths), len(studies), problems


def log_tail(path: str, lines: int = 12) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def count_events(path: str, events: tuple[str, ...]) -> dict[str, int]:
    """How many structured-log lines of the node carry each of ``events`` (``retry``, ``dead``, ...)."""
    found = dict.fromkeys(events, 0)
    try:
        with open(path, errors="replace") as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    ev = json.loads(line).get("event")
                    if ev in found:
                        found[ev] += 1
    except OSError:
        pass
    return found


def orthanc_errors(path: str) -> list[str]:
    """Orthanc's error lines (``E0512 ...``), e.g. a failing Lua callback."""
    try:
        with open(path, errors="replace") as fh:
            return [line.rstrip() for line in fh if line.startswith("E")]
    except OSError:
        return []


# ----------------------------------------------------------------------------- servers
class Run:
    """The processes of one measurement, all under one fresh temp folder."""

    def __init__(self, bench: ModuleType, target: str, dest_fork: bool) -> None:
        self.bench = bench
        self.target = target
        self.dest_fork = dest_fork
        self.work = tempfile.mkdtemp(prefix=f"dicombench-gw-{target}-", dir=TMP_ROOT)
        self.dest_dir = os.path.join(self.work, "dest")
        self.server: Any = None
        self.dest: Any = None
        self.server_log = ""
        self.storage = ""
        self.port = 0
        self.aet = ""

    def start(self) -> None:
        if self.target in GATEWAYS:
            self._start_dest()
        if self.target.startswith("node"):
            self._start_node()
        else:
            self._start_orthanc()
        time.sleep(SETTLE_S)

    def _start_dest(self) -> None:
        """DCMTK storescp, one association at a time unless --dest-fork."""
        os.makedirs(self.dest_dir)
        self.dest_port = free_port()
        cmd = [self.bench.STORESCP, "-aet", "DEST", "+xa", "-od", self.dest_dir]
        cmd += ["--fork"] if self.dest_fork else []
        self.dest = self.bench.Server(
            [*cmd, str(self.dest_port)], os.path.join(self.work, "dest.log"), cwd=self.work, env=self.bench.NODELAY_ENV
        )
        self.bench.wait_port(self.dest_port, self.dest.proc)

    def _start_node(self) -> None:
        self.port, self.aet = free_port(), "NODE"
        cfg: Rec = {
            "Name": "bench-gateway",
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomListenAddress": "127.0.0.1",
            "StorageDirectory": "storage",  # relative: resolved against the config file's folder
            "IndexDirectory": "index",
        }
        if self.target == "node-gateway":
            cfg["DicomModalities"] = {"dest": ["DEST", "127.0.0.1", self.dest_port]}
            cfg["Routes"] = [
                {"Name": "gw", "Anonymize": {"DicomVersion": NODE_DICOM_VERSION}, "Forward": ["dest"]},
            ]
        path = os.path.join(self.work, "node.json")
        with open(path, "w") as fh:
            json.dump(cfg, fh, indent=1)
        self.storage = os.path.join(self.work, "storage")
        # measure this checkout, configured by the file only (no DICOM_NODE_* override from the caller's env)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.server_log = os.path.join(self.work, "node.log")
        cmd = [sys.executable, "-m", "node", "serve", "--config", path]
        self.server = self.bench.Server(cmd, self.server_log, cwd=self.work, env=env)
        self.bench.wait_port(self.port, self.server.proc)

    def _start_orthanc(self) -> None:
        if not os.access(self.bench.ORTHANC_BIN, os.X_OK):
            raise RuntimeError(f"{self.bench.ORTHANC_BIN} not found (set ORTHANC_BIN)")
        self.port, self.aet, http = free_port(), "ORTHANC", free_port()
        lua = os.path.join(self.work, "gateway.lua")
        with open(lua, "w") as fh:
            fh.write(LUA_SCRIPT % {"body": json.dumps({"DicomVersion": ORTHANC_DICOM_VERSION})})
        cfg = self.bench.orthanc_config(os.path.join(self.work, "storage"), self.port, http, self.aet)
        cfg.update({"DicomModalities": {"dest": ["DEST", "127.0.0.1", self.dest_port]}, "LuaScripts": [lua]})
        path = os.path.join(self.work, "orthanc.json")
        with open(path, "w") as fh:
            json.dump(cfg, fh, indent=1)
        self.server_log = os.path.join(self.work, "orthanc.log")
        self.server = self.bench.Server(
            [self.bench.ORTHANC_BIN, path], self.server_log, cwd=self.work, env=self.bench.NODELAY_ENV
        )
        self.bench.wait_http(f"http://127.0.0.1:{http}/system", self.server.proc)
        self.bench.wait_port(self.port, self.server.proc)

    def stop(self) -> None:
        for s in (self.server, self.dest):
            if s is not None:
                s.stop()
        self.server = self.dest = None


def wait_destination(
    run: Run, expected: int, t0: float, scu_done: threading.Event, timeout: float
) -> tuple[float | None, int]:
    """Poll the destination until it holds ``expected`` files whose total size is stable for one poll.

    Returns (arrival time relative to ``t0`` of the first poll that saw the final state, files seen). storescp
    writes straight under the final name, so a count alone could stop the clock while the last file is still
    being written; the stable-size poll closes that gap, and the first poll of the stable state is the end.
    """
    last = (-1, -1)
    first_seen = 0.0
    last_change = time.perf_counter()
    while True:
        now = time.perf_counter()
        state = folder_state(run.dest_dir)
        if state != last:
            last, first_seen, last_change = state, now, now
        elif state[0] >= expected:
            return first_seen - t0, state[0]
        if now - t0 > timeout:
            return None, state[0]
        if scu_done.is_set() and now - last_change > STALL_S:
            return None, state[0]
        if run.server is not None and run.server.proc.poll() is not None:
            return None, state[0]
        time.sleep(POLL_S)


def measure(target: str, bench: ModuleType, src: Source, a: argparse.Namespace) -> Rec:
    """One timed, verified measurement of one target in its own servers and folder; never raises."""
    rec: Rec = {"op": "gateway", "target": target, "expected": len(src.files), "bytes": src.nbytes}
    run = Run(bench, target, a.dest_fork)
    problems: list[str] = []
    try:
        run.start()
        base = bench.count_files(run.storage) if target == "node-ingest" else 0  # the node's .lock file
        cpu0 = run.server.cpu()
        scu: Rec = {}
        scu_done = threading.Event()
        t0 = time.perf_counter()

        def send() -> None:
            try:
                scu.update(bench.run_storescu(str(src.ds_dir), src.files, 1, run.aet, run.port, run.work,
                                              a.timeout, src.proposal))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - reported as a problem of this measurement
                scu["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                scu["end"] = time.perf_counter()
                scu_done.set()

        sender = threading.Thread(target=send, name="storescu")
        sender.start()
        if target in GATEWAYS:
            wall, seen = wait_destination(run, len(src.files), t0, scu_done, a.timeout)
        else:
            wall, seen = None, 0
        sender.join()
        ingest = scu["end"] - t0
        wall = ingest if target == "node-ingest" else wall
        rec["server_cpu"] = run.server.cpu() - cpu0
        rec.update({"wall": wall, "ingest": ingest, "tail": None if wall is None else wall - ingest})
        if "error" in scu:
            problems.append(f"storescu: {scu['error']}")
        if any(rc != 0 for rc in scu.get("rcs", [])):
            problems.append(f"storescu exit codes {scu['rcs']}")
        if scu.get("killed"):
            problems.append(f"storescu killed after {a.timeout:.0f}s")
        if scu.get("scu_error_lines"):
            problems.append(f"{scu['scu_error_lines']} storescu error lines")
        if target == "node-ingest":
            stored = bench.count_files(run.storage) - base
            rec["received"] = stored
            if stored != len(src.files):
                problems.append(f"node stored {stored}/{len(src.files)} files")
        else:
            if wall is None:
                died = run.server.proc.poll() is not None
                problems.append(
                    f"destination got {seen}/{len(src.files)} "
                    + ("(server exited)" if died else f"(stalled or over {a.timeout:.0f}s)")
                )
            time.sleep(1.0)  # untimed: would anything more (a duplicate) still arrive?
            received, studies, found = verify_received(src, run.dest_dir, one_study=target == "node-gateway")
            rec.update({"received": received, "studies": studies})
            problems += found
    except Exception as exc:  # noqa: BLE001 - a crash is a failed measurement, the run goes on
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        run.stop()
        if run.server_log:
            if target.startswith("node"):
                rec["node_events"] = count_events(run.server_log, ("retry", "dead"))
            else:
                errs = orthanc_errors(run.server_log)
                rec["server_errors"] = len(errs)
                rec["server_error_sample"] = errs[:3]
        if problems and run.server_log:
            rec["log_tail"] = log_tail(run.server_log)
        if problems and a.keep_failed:
            rec["kept"] = run.work
        else:
            shutil.rmtree(run.work, ignore_errors=True)
    rec["problems"] = problems
    rec["ok"] = not problems and rec.get("wall") is not None
    rec["loadavg"] = os.getloadavg()[0]
    return rec


def fmt(rec: Rec) -> str:
    if not rec.get("ok"):
        return "ERROR: " + "; ".join(rec.get("problems") or ["?"])
    n = rec["expected"]
    parts = [f"{rec['wall']:.2f}s  {n / rec['wall']:.1f} inst/s"]
    if rec["target"] != "node-ingest":
        parts.append(f"(ingest {rec['ingest']:.2f}s + tail {rec['tail']:.2f}s, {rec.get('studies')} studies)")
    parts.append(f"server {1e3 * rec['server_cpu'] / n:.1f} ms CPU/inst")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- report
def paired(recs: list[Rec], num: str, den: str) -> list[float]:
    """Per rep: wall(num) / wall(den) of the same rep, for reps where both are valid."""
    wall = {(r["target"], r["rep"]): r["wall"] for r in recs if r.get("ok")}
    return [
        w / wall[(den, rep)]
        for (t, rep), w in sorted(wall.items(), key=lambda x: x[0][1])
        if t == num and (den, rep) in wall
    ]


def table(recs: list[Rec], targets: list[str], src: Source, reps: int) -> str:
    n, nbytes = len(src.files), src.nbytes
    lines = [
        f"**de-identify and forward** `{src.kind}` ({n} instances, {nbytes / 1e6:.1f} MB), 1 storescu association, "
        f"median of {reps} interleaved rep(s). wall: storescu start -> last instance stored (node-ingest) or "
        "accepted by the destination storescp (gateways); ingest: storescu exit in the same run; tail: wall - "
        f"ingest. node anonymizes with {NODE_DICOM_VERSION}, Orthanc 1.10 with {ORTHANC_DICOM_VERSION} (its "
        "newest). CPU: the server's process session (destination storescp not included).",
        "",
        "| target | wall s (min-max) | inst/s | MB/s | ingest s | tail s | server CPU ms/inst | studies at dest "
        "| verified |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in targets:
        rs = [r for r in recs if r["target"] == t]
        good = [r for r in rs if r.get("ok")]
        bad = [r for r in rs if not r.get("ok")]
        status = f"ok {len(good)}/{len(rs)}" if not bad else f"**ERROR** {len(bad)}/{len(rs)}: {bad[0]['problems'][0]}"
        if not good:
            lines.append(f"| {t} | - | - | - | - | - | - | - | {status} |")
            continue
        walls = [r["wall"] for r in good]
        studies = sorted({r["studies"] for r in good if r.get("studies") is not None})
        gw = t != "node-ingest"
        lines.append(
            f"| {t} | {median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) | {median([n / w for w in walls]):.1f} "
            f"| {median([nbytes / 1e6 / w for w in walls]):.1f} | {median([r['ingest'] for r in good]):.2f} "
            f"| {fmt_num(median([r['tail'] for r in good])) if gw else '-'} "
            f"| {median([1e3 * r['server_cpu'] / n for r in good]):.1f} "
            f"| {'/'.join(map(str, studies)) if studies else '-'} | {status} |"
        )
    lines.append("")
    for num, den, goal, better in (
        ("node-gateway", "node-ingest", GOAL_VS_INGEST, "<="),
        ("orthanc-lua", "node-gateway", GOAL_VS_ORTHANC, ">="),
    ):
        if num not in targets or den not in targets:
            continue
        rs = paired(recs, num, den)
        m = median(rs)
        if m is None:
            verdict = "no valid pair"
        else:
            met = m <= goal if better == "<=" else m >= goal
            verdict = f"median **{m:.2f}** ({'met' if met else 'NOT met'})"
        lines.append(
            f"- wall {num} / {den} (per rep: {', '.join(f'{x:.2f}' for x in rs) or '-'}): "
            f"goal {better} {goal:g}, {verdict}"
        )
    notes = []
    for r in recs:
        if r.get("server_errors"):
            notes.append(f"{r['target']} rep {r['rep']}: {r['server_errors']} Orthanc error line(s), e.g. "
                         f"`{r['server_error_sample'][0][:160]}`")  # fmt: skip
        ev = r.get("node_events") or {}
        if any(ev.values()):
            notes.append(f"{r['target']} rep {r['rep']}: node routing events {ev}")
    if notes:
        lines += ["", "Notes:", *[f"- {x}" for x in notes]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=DATA / "ct", help="dataset folder with manifest.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)}")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before storescu / the wait for the "
                    "destination gives up")  # fmt: skip
    ap.add_argument("--out-dir", default=os.path.join(TMP_ROOT, "dicombench-results"))
    ap.add_argument("--dest-fork", action="store_true", help="run the destination storescp with --fork "
                    "(parallel associations); default: one association at a time")  # fmt: skip
    ap.add_argument("--keep-failed", action="store_true", help="keep the temp folder (logs) of failed runs")
    a = ap.parse_args(argv)
    unknown = set(a.targets.split(",")) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s) {sorted(unknown)}; choose from {','.join(TARGETS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    bench = load_harness()
    for tool in (bench.STORESCU, bench.STORESCP):
        if not os.access(tool, os.X_OK):
            sys.exit(f"{tool} not found: apt-get install dcmtk (or set DCMTK_BIN)")
    ensure_data(a.dataset)
    src = load_source(bench, a.dataset)
    targets = [t for t in TARGETS if t in a.targets.split(",")]
    info = bench.env_info()
    info.update({"dataset": str(a.dataset), "argv": sys.argv, "dest_fork": a.dest_fork})
    log(f"env: {json.dumps(info, default=str)}")
    log(f"== gateway {src.kind} ({len(src.files)} instances, {src.nbytes / 1e6:.1f} MB) x {a.reps} reps: "
        + ", ".join(targets))  # fmt: skip
    recs: list[Rec] = []
    for rep in range(a.reps):
        k = rep % len(targets)
        for t in targets[k:] + targets[:k]:
            rec = measure(t, bench, src, a)
            rec["rep"] = rep
            recs.append(rec)
            log(f"   rep {rep} {t:<13} {fmt(rec)}")
            if not rec["ok"] and rec.get("log_tail"):
                log("      server log tail:\n" + "\n".join("      | " + x for x in rec["log_tail"].splitlines()))
            if rec.get("kept"):
                log(f"      kept {rec['kept']} for inspection")
    text = "\n".join(
        [
            "# dicom-node gateway benchmark (anonymize + forward)",
            "",
            f"{info['date_utc']}, {info['cpus']} CPUs, {info['mem_total_gb']} GB RAM, loadavg at start "
            f"{info['loadavg'][0]:.2f} / end {os.getloadavg()[0]:.2f}; {info['orthanc']}; {info['storescu']}; "
            f"Python {info['python']}, pydicom {info['pydicom']}, pynetdicom {info['pynetdicom']}; destination "
            f"storescp {'--fork' if a.dest_fork else 'one association at a time'}",
            "",
            table(recs, targets, src, a.reps),
        ]
    )
    print(text)
    return save_and_report(a.out_dir, "gateway", info, recs, text)


if __name__ == "__main__":
    raise SystemExit(main())
