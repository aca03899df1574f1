#!/usr/bin/env python3
"""Ingest with 4 senders into 1 node vs 2 nodes on one PostgreSQL index (issue 7), SQLite alongside, in one run.

Why: several nodes on one index must add capacity, not contention. On this 2-core machine two nodes cannot
go faster than one (they share the cores with PostgreSQL and the senders). So the check is twofold:
- throughput does not drop when the same load is split over two nodes;
- no lock waits or deadlocks appear in PostgreSQL while they both write.

Configurations, interleaved rep by rep so drift on the shared VM hits all alike:
- ``sqlite-1``: one node on its SQLite index (the default; the reference of earlier benchmarks).
- ``pg-1``: one node on PostgreSQL, all 4 senders to it.
- ``pg-2``: two nodes (``NodeId`` n0, n1) on the same PostgreSQL database and one shared storage folder,
  2 senders to each.

Every run gets a fresh database and storage folder. Each node runs with its defaults (receivers and routing
workers per core, no routes, REST off). The senders are DCMTK ``storescu`` with ``TCP_NODELAY=1``. A run is
verified: the index must hold every instance exactly once.

During each PostgreSQL run a sampler reads the following every 20 ms:
- ``pg_stat_activity``: backends waiting on a lock (``wait_event_type = 'Lock'``);
- ``pg_locks``: ungranted locks.

``pg_stat_database`` gives that database's deadlocks and rollbacks before and after (a rollback is a
transaction retried after losing a race, or one that failed).

    python3 scripts/bench_multinode.py                       # small (5000 x 11 KB) and ct (500 x 0.5 MB), 3 reps
    python3 scripts/bench_multinode.py --datasets small --reps 1

Prints a markdown table and ratios (pg-2 / pg-1, pg-1 / sqlite-1); saves every measurement as JSON (and the
table as .md) into --out-dir. Needs Debian ``dcmtk`` and a PostgreSQL server (``scripts/postgres.sh`` starts
one; ``--postgres`` takes an admin URL of yours). The datasets come from ``../shared/bench/make_dataset.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DATA, ROOT, TMP_ROOT, Rec, ensure_data, fmt_num, log, median, save_and_report

STORESCU = "/usr/bin/storescu"  # never pynetdicom's console script of the same name
SENDERS = 4
CONFIGS = ("sqlite-1", "pg-1", "pg-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def admin_sql(admin: str, sql: str) -> None:
    import psycopg2

    con = psycopg2.connect(admin)
    con.autocommit = True
    try:
        con.cursor().execute(sql)
    finally:
        con.close()


def start_node(workdir: Path, storage: Path, database: str, node_id: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = {"DicomAet": "DICOMNODE", "DicomPort": port, "DicomListenAddress": "127.0.0.1", "HttpServerEnabled": False,
           "StorageDirectory": str(storage), "IndexDirectory": str(workdir / "index"), "Database": database,
           "NodeId": node_id}  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "node.json").write_text(json.dumps(cfg))
    logf = open(workdir / "node.log", "ab")  # noqa: SIM115 - the node's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(workdir / "node.json")],
                            stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"node exited: {(workdir / 'node.log').read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    sys.exit("node did not start")


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


class LockSampler(threading.Thread):
    """Samples PostgreSQL's lock waits of one database while a run goes on."""

    def __init__(self, url: str, dbname: str) -> None:
        super().__init__(daemon=True)
        import psycopg2

        self.con = psycopg2.connect(url)
        self.con.autocommit = True
        self.dbname = dbname
        self.stop = threading.Event()
        self.samples = 0
        self.waiting_samples = 0  # samples where at least one backend waited on a lock
        self.waiting_sum = 0
        self.waiting_max = 0
        self.ungranted_max = 0

    def counters(self) -> tuple[int, int, int]:
        cur = self.con.cursor()
        cur.execute("SELECT deadlocks, xact_rollback, xact_commit FROM pg_stat_database WHERE datname = %s",
                    (self.dbname,))  # fmt: skip
        row = cur.fetchone()
        return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)

    def run(self) -> None:
        cur = self.con.cursor()
        while not self.stop.wait(0.02):
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                        (self.dbname,))  # fmt: skip
            waiting = int(cur.fetchone()[0])
            cur.execute("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                        "WHERE NOT l.granted AND d.datname = %s", (self.dbname,))  # fmt: skip
            ungranted = int(cur.fetchone()[0])
            self.samples += 1
            self.waiting_samples += waiting > 0
            self.waiting_sum += waiting
            self.waiting_max = max(self.waiting_max, waiting)
            self.ungranted_max = max(self.ungranted_max, ungranted)


def send(ds_dir: Path, files: list[str], ports: list[int], logdir: Path) -> tuple[float, int]:
    """4 storescu at once, sender i to ``ports[i % len(ports)]``; returns (wall seconds, error lines)."""
    chunks = [files[i::SENDERS] for i in range(SENDERS)]
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.perf_counter()
    procs = []
    for i, chunk in enumerate(chunks):
        out = open(logdir / f"storescu_{i}.log", "wb")  # noqa: SIM115 - closed below
        cmd = [STORESCU, "-aet", "BENCHSCU", "-aec", "DICOMNODE", "-R", "-to", "60", "127.0.0.1",
               str(ports[i % len(ports)]), *chunk]  # fmt: skip
        procs.append((subprocess.Popen(cmd, cwd=ds_dir, stdout=out, stderr=subprocess.STDOUT, env=env), out))
    for p, out in procs:
        p.wait(1800)
        out.close()
    wall = time.perf_counter() - t0
    errors = sum(1 for i in range(SENDERS) for line in (logdir / f"storescu_{i}.log").read_bytes().splitlines()
                 if line.startswith((b"E:", b"F:")))  # fmt: skip
    return wall, errors


def count_instances(database: str) -> tuple[int, int]:
    if database.startswith("sqlite:///"):
        import sqlite3

        con = sqlite3.connect(database[len("sqlite:///") :])
        try:
            return con.execute('SELECT count(*), count(DISTINCT sop_uid) FROM "instance"').fetchone()  # type: ignore[no-any-return]
        finally:
            con.close()
    import psycopg2

    con = psycopg2.connect(database)
    try:
        cur = con.cursor()
        cur.execute('SELECT count(*), count(DISTINCT sop_uid) FROM "instance"')
        row = cur.fetchone()
        return int(row[0]), int(row[1])
    finally:
        con.close()


def one_run(config: str, kind: str, rep: int, admin: str, tmp: Path) -> Rec:
    ds_dir = DATA / kind
    manifest = json.loads((ds_dir / "manifest.json").read_text())
    files: list[str] = manifest["file_list"]
    work = tmp / f"{config}-{kind}-{rep}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    storage = work / "storage"
    n_nodes = 2 if config == "pg-2" else 1
    dbname = ""
    if config.startswith("pg"):
        dbname = f"dn_bench_{uuid.uuid4().hex[:12]}"
        admin_sql(admin, f'CREATE DATABASE "{dbname}"')
        database = admin.rsplit("/", 1)[0] + "/" + dbname
    else:
        database = f"sqlite:///{work}/index/index.db"
    nodes = []
    try:
        for i in range(n_nodes):
            nodes.append(start_node(work / f"node{i}", storage, database, f"n{i}"))
        sampler = LockSampler(database, dbname) if dbname else None
        before = sampler.counters() if sampler else (0, 0, 0)
        if sampler:
            sampler.start()
        wall, errors = send(ds_dir, files, [port for _, port in nodes], work)
        if sampler:
            sampler.stop.set()
            sampler.join()
        after = sampler.counters() if sampler else (0, 0, 0)
        rows, distinct = count_instances(database)
    finally:
        for proc, _ in nodes:
            stop_node(proc)
        if dbname:
            admin_sql(admin, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        shutil.rmtree(work, ignore_errors=True)
    ok = rows == distinct == len(files) and errors == 0
    rec: Rec = {"config": config, "dataset": kind, "rep": rep, "files": len(files), "wall_s": round(wall, 3),
                "inst_per_s": round(len(files) / wall, 1), "rows": rows, "scu_errors": errors, "ok": ok}  # fmt: skip
    if sampler:
        rec.update(lock_wait_samples=sampler.waiting_samples, samples=sampler.samples,
                   lock_waiters_mean=round(sampler.waiting_sum / max(1, sampler.samples), 3),
                   lock_waiters_max=sampler.waiting_max, ungranted_max=sampler.ungranted_max,
                   deadlocks=after[0] - before[0], rollbacks=after[1] - before[1],
                   commits=after[2] - before[2])  # fmt: skip
    log(f"{config:9} {kind:6} rep {rep}: {rec['inst_per_s']:8.1f} inst/s  ok={ok}  "
        + (f"lock-wait samples {rec['lock_wait_samples']}/{rec['samples']} deadlocks {rec['deadlocks']} "
           f"rollbacks {rec['rollbacks']}" if sampler else ""))  # fmt: skip
    return rec


def table(recs: list[Rec]) -> str:
    lines = [
        "| dataset | config | inst/s (median) | x pg-1 | lock-wait samples | max waiters | deadlocks | rollbacks "
        "| commits | verified |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for kind in sorted({r["dataset"] for r in recs}):
        base = median([r["inst_per_s"] for r in recs if r["dataset"] == kind and r["config"] == "pg-1"])
        for config in CONFIGS:
            rs = [r for r in recs if r["dataset"] == kind and r["config"] == config]
            if not rs:
                continue
            tput = median([r["inst_per_s"] for r in rs])
            ratio = tput / base if tput and base else None
            pg = config.startswith("pg")
            waits = f"{sum(r['lock_wait_samples'] for r in rs)}/{sum(r['samples'] for r in rs)}" if pg else "-"
            lines.append(
                f"| {kind} | {config} | {fmt_num(tput, 1)} | {fmt_num(ratio)} | {waits} "
                f"| {max(r['lock_waiters_max'] for r in rs) if pg else '-'} "
                f"| {sum(r['deadlocks'] for r in rs) if pg else '-'} "
                f"| {sum(r['rollbacks'] for r in rs) if pg else '-'} "
                f"| {sum(r['commits'] for r in rs) if pg else '-'} | {all(r['ok'] for r in rs)} |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="small,ct")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument(
        "--postgres",
        default=os.environ.get("DICOM_NODE_TEST_POSTGRES", ""),
        help="admin URL (a role that may CREATE DATABASE); default: scripts/postgres.sh's server",
    )
    ap.add_argument("--tmp", default=os.path.join(TMP_ROOT, "dicom-node-multinode-bench"))
    ap.add_argument("--out-dir", default=os.path.join(TMP_ROOT, "dicombench-results"))
    a = ap.parse_args()
    admin = a.postgres or subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh")], check=True,
                                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    kinds = [k for k in a.datasets.split(",") if k]
    for kind in kinds:
        if kind == "ct":
            ensure_data(DATA / "ct")
        elif not (DATA / kind / "manifest.json").exists():
            subprocess.run([sys.executable, str(ROOT.parent / "shared" / "bench" / "make_dataset.py"), kind, "--out",
                            str(DATA)], check=True)  # fmt: skip
    configs = [c for c in a.configs.split(",") if c]
    recs: list[Rec] = []
    tmp = Path(a.tmp)
    for kind in kinds:
        for rep in range(a.reps):
            for config in configs:  # interleaved
                recs.append(one_run(config, kind, rep, admin, tmp))
    text = table(recs)
    print(text)
    info = {"cores": os.cpu_count(), "senders": SENDERS, "reps": a.reps, "command": " ".join(sys.argv)}
    return save_and_report(a.out_dir, "multinode", info, recs, text)


if __name__ == "__main__":
    sys.exit(main())
