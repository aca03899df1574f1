#!/usr/bin/env python3
"""C-FIND latency on an index of 1,000,000 instances (issue 6, part 5: p50 < 50 ms and p99 < 200 ms on SQLite).

Why: a PACS viewer's query must stay interactive however large the archive grows; this is the evidence that the
index answers each common query kind by index searches alone, measured where a viewer sees it.

**The index** (``--patients`` x ``--studies`` x ``--series`` x ``--instances``, default 10,000 x 10 x 10 x 1)
is built by the store path's own SQL: every instance goes through ``node.archive.store._index``, the
transaction body that ``store()`` runs for a received instance (parents created or found through the series
cache, instance row, ``Change`` rows, folded columns filled by the models), grouped ``--commit-every``
instances per commit with ``synchronous=OFF`` while loading (what differs from the receiver: no file, no
fsync per instance). File uuids are placeholders and no file exists: C-FIND answers main-tag keys from the
index, never from files. Studies arrive in date order (an archive growing over ten years, 2015-2024) and
every series and study is then marked stable, as a node running for a while would have them. The index is
cached (``--db``, default ``/tmp/dicom-node-qr-bench/index.db``) with a fingerprint of the parameters, so a
rerun only measures; ``--rebuild`` builds it again.

Synthetic data: PatientID ``QR000123``, PatientName ``<8 letters>^<given>`` (random syllables, nearly unique
surnames), 10 studies per patient on random dates, AccessionNumber ``A00001234``, UIDs under a fixed root,
one modality per study (CT 30 %, MR 25 %, CR 15 %, US 10 %, DX 8 %, MG 5 %, PT 4 %, NM 3 %).

**Query kinds** (random keys drawn from the index; PN in C-FIND's default case-insensitive mode; ``--kinds``):

* ``patient_id``      STUDY level, PatientID exact (10 answers)
* ``patient_name``    STUDY level, PatientName ``<first 6 letters of a surname>*``
* ``study_date``      STUDY level, StudyDate over one calendar month (``YYYYMM01-YYYYMMDD``; ~840 answers)
* ``study_day``       STUDY level, StudyDate of one day (~28 answers: the same index, a viewer's "today")
* ``accession``       STUDY level, AccessionNumber exact (1 answer)
* ``study_uid``       STUDY level, StudyInstanceUID (1 answer)
* ``series_of_study`` SERIES level, StudyInstanceUID (10 answers)
* ``modality_month``  STUDY level, ModalitiesInStudy + a month's StudyDate

Return keys (``--keys main``): what a study list shows (PatientName, PatientID, PatientBirthDate, PatientSex,
StudyDate, StudyTime, AccessionNumber, StudyDescription, StudyInstanceUID, StudyID, ReferringPhysicianName),
for series Modality, SeriesNumber, SeriesDescription, SeriesInstanceUID; ``--keys viewer`` adds the computed
ModalitiesInStudy, NumberOfStudyRelatedSeries/Instances and NumberOfSeriesRelatedInstances.

**Modes**:

* ``network``: ``python -m node serve --config F`` on the cached index or its copy (F: free port, REST off,
  one receiver process, the bench SCU allowed to find), one pynetdicom association held open as a viewer does
  (with TCP_NODELAY), latency = from sending the C-FIND request to its final response (every pending answer
  received); also the time to the first answer, and the node's own C-FIND handler time (its ``find`` log
  event: from the request to the last answer handed to pynetdicom).
* ``direct``: ``node.archive.find.find`` in this process (the archive opened by URL, as the node opens it)
  and, per match, the answer's keys from ``inherited_tags`` (what the SCP does before encoding): the index's
  share of the latency.

**PostgreSQL** (``--postgres URL``, URL: any database of the server as a role that may ``CREATE DATABASE``,
e.g. what ``scripts/postgres.sh`` prints): the chosen modes run on SQLite, then on a PostgreSQL copy of the
same index (database ``--pg-db``, default ``dicomnode_qr_bench``), the same drawn queries on both; each gets
its report, then a table of PostgreSQL's p50 and p99 over SQLite's per kind. The copy: database created,
schema by ``node.archive.db.open_index`` (as a node creates it), every table's rows streamed from the SQLite
file by ``COPY`` in one transaction (secondary indexes and foreign keys dropped first and the same definitions
created again after the rows, booleans 0/1 as ``t``/``f``), id sequences moved past the copied ids,
``VACUUM (ANALYZE)`` (statistics, and the visibility map that autovacuum would set a while after a load).
The index's fingerprint is kept in the copy's ``property`` table (key ``BenchFingerprint``), so a rerun only
measures; ``--rebuild-pg`` (or a rebuilt SQLite index) drops the database and copies again. Queries are drawn
and their answers counted on the SQLite file (the same rows); every database's answers are checked.

Each kind runs ``--warmup`` untimed then ``--reps`` timed queries, kinds interleaved round-robin so drift on
the shared VM hits all alike. Every query's number of answers is checked against a count by plain SQL on the
columns (a wrong count is printed: a fast wrong answer is no result). Prints p50/p99 per kind against the
target, answers per query, and the index size on disk (``index.db`` + WAL; the PostgreSQL database's)::

    python3 scripts/bench_qr.py                       # build once (45 min here), then direct and network
    python3 scripts/bench_qr.py --mode direct --reps 500
    python3 scripts/bench_qr.py --patients 200 --db /tmp/qr-small/index.db   # a quick smoke run
    PG=$(bash scripts/postgres.sh)                    # a PostgreSQL server here: its admin URL
    python3 scripts/bench_qr.py --postgres "$PG"      # copy once (minutes), then both modes on both databases
    python3 scripts/bench_qr.py --patients 200 --db /tmp/qr-small/index.db --postgres "$PG" --pg-db qr_small
    python3 scripts/bench_qr.py ingest --runs 7       # store() timing on 2000 synthetic instances

``ingest`` is the ingest hot-path check of the same change: ``store()`` (spool file, index transaction,
publication) of 2000 synthetic instances (100 patients x 2 studies x 2 series x 5) in a fresh archive under
/dev/shm, median of ``--runs``; run it with ``PYTHONPATH`` at another checkout to compare.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import dataclasses
import datetime as dt
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: ``ingest`` can time another checkout

from node.archive import store as store_mod  # noqa: E402
from node.archive.db import write_transaction  # noqa: E402
from node.archive.store import Archive, Origin, open_archive  # noqa: E402
from node.dicom.ids import resource_ids  # noqa: E402
from node.dicom.maintags import IndexTags  # noqa: E402

TARGET_P50_MS = 50.0
TARGET_P99_MS = 200.0
UID_ROOT = "1.2.826.0.1.3680043.10.1043"
MODALITIES = (("CT", 30), ("MR", 25), ("CR", 15), ("US", 10), ("DX", 8), ("MG", 5), ("PT", 4), ("NM", 3))
SYLLABLES = ("BA", "KO", "MI", "TE", "LU", "SA", "NO", "RI", "DE", "VA", "GO", "PE", "ZU", "HA", "FI", "JO",
             "CA", "WE", "TI", "MO")  # fmt: skip
GIVEN = ("JOHN", "JANE", "ANNA", "PETER", "MARIE", "LUKAS", "SOFIA", "DAVID", "ELENA", "TOMAS")
DESCRIPTIONS = {"CT": "CT HEAD", "MR": "MR KNEE", "CR": "CR CHEST", "US": "US ABDOMEN", "DX": "DX HAND",
                "MG": "MG SCREENING", "PT": "PET WHOLE BODY", "NM": "NM BONE"}  # fmt: skip
FIRST_DAY = dt.date(2015, 1, 1)
DAYS = (dt.date(2024, 12, 31) - FIRST_DAY).days + 1

STUDY_KEYS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
    "StudyDescription", "StudyInstanceUID", "StudyID", "ReferringPhysicianName",
)  # fmt: skip
SERIES_KEYS = ("Modality", "SeriesNumber", "SeriesDescription", "SeriesInstanceUID")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the synthetic archive ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    patients: int
    studies: int
    series: int
    instances: int
    seed: int = 6

    @property
    def total(self) -> int:
        return self.patients * self.studies * self.series * self.instances

    def fingerprint(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "version": 1}, sort_keys=True)


def _study_plan(shape: Shape) -> list[tuple[dt.date, int, int]]:
    """(date, patient, study number) of every study, in date order (how an archive grows)."""
    rng = random.Random(shape.seed)
    plan = [(FIRST_DAY + dt.timedelta(days=rng.randrange(DAYS)), p, s)
            for p in range(shape.patients) for s in range(shape.studies)]  # fmt: skip
    plan.sort()
    return plan


def _patient_tags(shape: Shape, p: int) -> dict[str, str]:
    rng = random.Random(shape.seed * 1_000_003 + p)
    surname = "".join(rng.choice(SYLLABLES) for _ in range(4))
    birth = dt.date(1930, 1, 1) + dt.timedelta(days=rng.randrange(365 * 85))
    return {"PatientName": f"{surname}^{rng.choice(GIVEN)}", "PatientID": f"QR{p:06d}",
            "PatientBirthDate": birth.strftime("%Y%m%d"), "PatientSex": rng.choice("MF")}  # fmt: skip


def synthetic(shape: Shape) -> Iterator[IndexTags]:
    """Every instance's index tags, studies in date order (deterministic for a shape)."""
    weights = [w for _, w in MODALITIES]
    for n, (day, p, s) in enumerate(_study_plan(shape)):
        rng = random.Random(shape.seed * 7_919 + n)
        modality = rng.choices([m for m, _ in MODALITIES], weights)[0]
        study_uid = f"{UID_ROOT}.{p + 1}.{s + 1}"
        patient = _patient_tags(shape, p)
        time_of_day = f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}00"
        study = {"StudyDate": day.strftime("%Y%m%d"), "StudyTime": time_of_day,
                 "StudyID": str(s + 1), "StudyDescription": DESCRIPTIONS[modality],
                 "AccessionNumber": f"A{p * shape.studies + s:08d}", "StudyInstanceUID": study_uid,
                 "InstitutionName": "GENERAL HOSPITAL", "ReferringPhysicianName": "HOUSE^GREGORY"}  # fmt: skip
        for se in range(shape.series):
            series_uid = f"{study_uid}.{se + 1}"
            series = {"Modality": modality, "SeriesInstanceUID": series_uid, "SeriesNumber": str(se + 1),
                      "SeriesDescription": f"{DESCRIPTIONS[modality]} {se + 1}", "SeriesDate": study["StudyDate"],
                      "SeriesTime": study["StudyTime"], "Manufacturer": "ACME", "StationName": f"{modality}01",
                      "BodyPartExamined": DESCRIPTIONS[modality].split()[-1]}  # fmt: skip
            for i in range(shape.instances):
                instance = {"SOPInstanceUID": f"{series_uid}.{i + 1}", "InstanceNumber": str(i + 1),
                            "ImagePositionPatient": f"-125\\-125\\{i * 2.5:g}", "AcquisitionNumber": "1",
                            "ImageOrientationPatient": "1\\0\\0\\0\\1\\0"}  # fmt: skip
                yield IndexTags(patient, study, series, instance, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")


@dataclasses.dataclass(frozen=True)
class _Placeholder:
    """What ``store._index`` reads of a spool file: the uuid the row names, its size and checksum."""

    uuid: str
    size: int = 0
    sha256: str = "0" * 64


def build(db_path: Path, shape: Shape, commit_every: int) -> None:
    """Populate a fresh index through ``store._index`` (see the module docstring)."""
    if db_path.parent.exists():
        shutil.rmtree(db_path.parent)
    db_path.parent.mkdir(parents=True)
    archive = open_archive(f"sqlite:///{db_path}", db_path.parent / "storage", sync=False)
    db = archive.db
    db.connect(reuse_if_open=True)
    db.execute_sql("PRAGMA synchronous=OFF")
    origin = Origin("DicomProtocol", "MODALITY", "DICOMNODE", "10.0.0.1")
    now = store_mod.utcnow() - dt.timedelta(days=1)
    t0 = time.perf_counter()
    done = 0
    pending: list[IndexTags] = []

    def flush() -> None:
        with write_transaction(db):
            for tags in pending:
                ids = resource_ids(tags.patient_id, tags.study_uid, tags.series_uid, tags.sop_uid)
                placeholder: Any = _Placeholder(str(uuid.uuid4()))
                status, _, _ = store_mod._index(archive, placeholder, tags, ids, origin, now, True, (), {})
                assert status == "Success"
        pending.clear()

    for tags in synthetic(shape):
        pending.append(tags)
        if len(pending) >= commit_every:
            done += len(pending)
            flush()
            if done % (commit_every * 20) == 0:
                rate = done / (time.perf_counter() - t0)
                log(f"  {done:,}/{shape.total:,} instances, {rate:,.0f}/s, ~{(shape.total - done) / rate:,.0f} s left")
    done += len(pending)
    flush()
    with write_transaction(db):  # steady state: everything older than StableAge has been declared stable
        for table in ("series", "study"):
            db.execute_sql(f'UPDATE "{table}" SET stable_pending = 0, stable_seen = ?', (now,))
    db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    archive.close()
    (db_path.parent / "fingerprint.json").write_text(shape.fingerprint())
    log(f"built {done:,} instances in {time.perf_counter() - t0:,.0f} s")


def ensure_index(db_path: Path, shape: Shape, rebuild: bool, commit_every: int) -> bool:
    """Build the index unless the cached one has this shape; whether it was built."""
    stamp = db_path.parent / "fingerprint.json"
    if not rebuild and db_path.exists() and stamp.exists() and stamp.read_text() == shape.fingerprint():
        log(f"using the cached index {db_path} (--rebuild to build it again)")
        return False
    log(f"building {shape.total:,} instances into {db_path}")
    build(db_path, shape, commit_every)
    return True


def index_size(db_path: Path) -> int:
    return sum(p.stat().st_size for p in (db_path, Path(f"{db_path}-wal")) if p.exists())


# -- the PostgreSQL copy ----------------------------------------------------------------------------------------------

#: The ``property`` row of the PostgreSQL copy holding the fingerprint of the SQLite index it copies.
PG_STAMP_KEY = "BenchFingerprint"
#: Rows read from SQLite and formatted per step of a table's COPY (bounded memory: a few MB of text).
COPY_ROWS = 10_000
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def pg_database_url(admin_url: str, name: str) -> str:
    """``admin_url`` (any database of the server) with ``name`` as its database."""
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))


def _pg_stamp(url: str) -> str | None:
    """The fingerprint recorded in the copy at ``url`` (None: no completed copy there)."""
    import psycopg2

    with contextlib.closing(psycopg2.connect(url)) as con, con.cursor() as cur:
        cur.execute("SELECT to_regclass('property') IS NOT NULL")
        if not cur.fetchone()[0]:
            return None
        cur.execute("SELECT value FROM property WHERE key = %s", (PG_STAMP_KEY,))
        row = cur.fetchone()
        return None if row is None else str(row[0])


def ensure_postgres(admin_url: str, name: str, db_path: Path, fingerprint: str, rebuild: bool) -> str:
    """The URL of database ``name`` holding a copy of the SQLite index (copied unless the copy is current)."""
    import psycopg2
    from psycopg2 import sql

    url = pg_database_url(admin_url, name)
    with contextlib.closing(psycopg2.connect(admin_url)) as admin:
        admin.autocommit = True  # CREATE and DROP DATABASE run outside a transaction
        with admin.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            exists = cur.fetchone() is not None
            if exists and not rebuild:
                stamp = _pg_stamp(url)
                if stamp == fingerprint:
                    log(f"using the cached PostgreSQL copy {name} (--rebuild-pg to copy it again)")
                    return url
                log(f"the PostgreSQL database {name} holds {'no complete copy' if stamp is None else 'another index'}")
            if exists:
                cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    copy_to_postgres(db_path, url, fingerprint)
    return url


def copy_to_postgres(db_path: Path, url: str, fingerprint: str) -> None:
    """Schema by ``open_index`` (as a node creates it), then every table's rows streamed from SQLite by COPY.

    One transaction: the secondary indexes and foreign keys ``open_index`` made are dropped, the rows copied,
    and the same definitions (``pg_get_indexdef``, ``pg_get_constraintdef``) created again, which builds each
    index once instead of maintaining it per row; then the id sequences are moved past the copied ids and the
    fingerprint recorded. ``VACUUM (ANALYZE)`` after the commit gives the planner its statistics and sets the
    visibility map (index-only scans), as autovacuum would a while after a load.
    """
    import sqlite3

    import psycopg2
    from peewee import AutoField
    from psycopg2 import sql

    from node.archive.db import open_index, release_connections
    from node.archive.models import ALL_MODELS

    release_connections(open_index(f"sqlite:///{db_path}"))  # the SQLite index at this code's schema version
    release_connections(open_index(url))  # the schema, exactly as a node creates it
    t0 = time.perf_counter()
    log(f"copying {db_path} into {url.rsplit('/', 1)[-1]}")
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    with contextlib.closing(psycopg2.connect(url)) as con:
        with con, con.cursor() as cur:  # one transaction, committed at the end of the block
            cur.execute("SET LOCAL maintenance_work_mem = '256MB'")
            cur.execute(
                "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
                "JOIN pg_class t ON t.oid = i.indrelid WHERE t.relnamespace = current_schema()::regnamespace "
                "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid "
                "AND c.contype IN ('p', 'u', 'x'))"
            )
            indexes = cur.fetchall()
            cur.execute(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE contype = 'f' AND connamespace = current_schema()::regnamespace"
            )
            foreign_keys = cur.fetchall()
            for table, constraint, _ in foreign_keys:
                drop = sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}")
                cur.execute(drop.format(sql.SQL(table), sql.Identifier(constraint)))
            for index, _ in indexes:
                cur.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(index)))
            cur.execute("DELETE FROM property")  # open_index's SchemaVersion: the copy brings SQLite's
            total = 0
            for model in ALL_MODELS:
                total += _copy_table(src, cur, model._meta.table_name)
            t_rows = time.perf_counter()
            for _, definition in indexes:
                cur.execute(definition)
            for table, constraint, definition in foreign_keys:
                cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    sql.SQL(table), sql.Identifier(constraint), sql.SQL(definition)))  # fmt: skip
            log(f"  {len(indexes)} indexes and {len(foreign_keys)} foreign keys created in "
                f"{time.perf_counter() - t_rows:,.1f} s")  # fmt: skip
            for model in ALL_MODELS:
                pk = model._meta.primary_key
                if isinstance(pk, AutoField):
                    table, column = model._meta.table_name, pk.column_name
                    cur.execute(sql.SQL("SELECT setval(pg_get_serial_sequence(%s, %s), coalesce(max({}), 0) + 1, "
                                        "false) FROM {}").format(sql.Identifier(column), sql.Identifier(table)),
                                (f'"{table}"', column))  # fmt: skip
            cur.execute("INSERT INTO property (key, value) VALUES (%s, %s)", (PG_STAMP_KEY, fingerprint))
        t_commit = time.perf_counter()
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("VACUUM (ANALYZE)")
    src.close()
    log(f"copied {total:,} rows in {t_commit - t0:,.0f} s, VACUUM (ANALYZE) {time.perf_counter() - t_commit:,.0f} s")


def _copy_table(src: Any, cur: Any, table: str) -> int:
    """COPY the rows of one SQLite table into the PostgreSQL table of the same name (the columns both have)."""
    from psycopg2 import sql

    cur.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = %s ORDER BY ordinal_position", (table,))  # fmt: skip
    pg_columns = cur.fetchall()
    sqlite_columns = {row[1] for row in src.execute(f'PRAGMA table_info("{table}")')}
    columns = [(name, kind) for name, kind in pg_columns if name in sqlite_columns]
    if missing := [name for name, _ in pg_columns if name not in sqlite_columns]:
        log(f"  {table}: the SQLite index has no column {', '.join(missing)} (PostgreSQL's default used)")
    if src.execute(f'SELECT EXISTS (SELECT 1 FROM "{table}")').fetchone()[0] == 0:
        return 0
    t0 = time.perf_counter()
    selected = ", ".join(f'"{name}"' for name, _ in columns)
    rows = src.execute(f'SELECT {selected} FROM "{table}"')
    converters = [_copy_bool if kind == "boolean" else _copy_value for _, kind in columns]
    copied = [0]

    def chunks() -> Iterator[str]:
        while batch := rows.fetchmany(COPY_ROWS):
            copied[0] += len(batch)
            yield "".join("\t".join([f(v) for f, v in zip(converters, row, strict=True)]) + "\n" for row in batch)

    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(name) for name, _ in columns))  # fmt: skip
    cur.copy_expert(statement, _CopySource(chunks()), size=1 << 20)
    log(f"  {table}: {copied[0]:,} rows in {time.perf_counter() - t0:,.1f} s")
    return copied[0]


def _copy_value(v: Any) -> str:
    """One value in COPY's text format: NULL is ``\\N``; backslash, tab and line ends are escaped."""
    if v is None:
        return "\\N"
    return v.translate(_COPY_ESCAPES) if isinstance(v, str) else str(v)


def _copy_bool(v: Any) -> str:
    """SQLite keeps a boolean as 0 or 1."""
    return "\\N" if v is None else ("t" if v else "f")


class _CopySource:
    """The ``read(size)`` that ``copy_expert`` pulls COPY data from, fed a chunk of rows at a time."""

    def __init__(self, chunks: Iterator[str]) -> None:
        self._chunks = chunks
        self._buf = ""
        self._pos = 0

    def read(self, size: int = -1) -> str:
        if self._pos >= len(self._buf):
            self._buf, self._pos = next(self._chunks, ""), 0
        end = len(self._buf) if size < 0 else self._pos + size
        out = self._buf[self._pos : end]
        self._pos += len(out)
        return out


def pg_size(url: str) -> int:
    import psycopg2

    with contextlib.closing(psycopg2.connect(url)) as con, con.cursor() as cur:
        cur.execute("SELECT pg_database_size(current_database())")
        return int(cur.fetchone()[0])


# -- query kinds ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Query:
    kind: str
    level: str  # PATIENT, STUDY, SERIES, IMAGE
    keys: dict[str, str]  # the constraints; the requested return keys are added empty
    expected: int = -1  # the number of answers, counted by plain SQL on the columns (a check on find and the SCP)


KINDS = ("patient_id", "patient_name", "study_date", "study_day", "accession", "study_uid", "series_of_study",
         "modality_month")  # fmt: skip


def _month(day: str) -> str:
    year, month = int(day[:4]), int(day[4:6])
    return f"{year:04d}{month:02d}01-{year:04d}{month:02d}{calendar.monthrange(year, month)[1]:02d}"


def draw_queries(db_path: Path, kinds: tuple[str, ...], n: int, seed: int) -> list[Query]:
    """``n`` queries of each kind with keys of random studies, interleaved round-robin."""
    import sqlite3

    rng = random.Random(seed)
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    (studies,) = con.execute("SELECT max(id) FROM study").fetchone()
    out: list[Query] = []
    for _ in range(n):
        sid = rng.randrange(1, studies + 1)
        row = con.execute(
            "SELECT s.study_uid, s.study_date, s.accession_number, p.patient_id, p.patient_name, se.modality "
            "FROM study s JOIN patient p ON p.id = s.patient_id JOIN series se ON se.study_id = s.id "
            "WHERE s.id = ? LIMIT 1",
            (sid,),
        ).fetchone()
        study_uid, date, accession, patient_id, name, modality = row
        month = _month(date)
        low, high = month.split("-")
        prefix = name.split("^")[0][:6]

        def count(sql: str, *params: Any) -> int:
            return int(con.execute(sql, params).fetchone()[0])

        by_patient = "SELECT count(*) FROM study s JOIN patient p ON p.id = s.patient_id WHERE p.patient_id = ?"
        by_name = "SELECT count(*) FROM study s JOIN patient p ON p.id = s.patient_id WHERE p.patient_name LIKE ?"
        by_date = "SELECT count(*) FROM study WHERE study_date BETWEEN ? AND ?"
        series = "SELECT count(*) FROM series se JOIN study s ON s.id = se.study_id WHERE s.study_uid = ?"
        by_modality = ("SELECT count(DISTINCT s.id) FROM study s JOIN series se ON se.study_id = s.id "
                       "WHERE s.study_date BETWEEN ? AND ? AND se.modality = ?")  # fmt: skip
        by_kind = {
            "patient_id": Query("patient_id", "STUDY", {"PatientID": patient_id}, count(by_patient, patient_id)),
            "patient_name": Query("patient_name", "STUDY", {"PatientName": prefix + "*"},
                                  count(by_name, prefix + "%")),  # names are ASCII: LIKE ignores their case
            "study_date": Query("study_date", "STUDY", {"StudyDate": month}, count(by_date, low, high)),
            "study_day": Query("study_day", "STUDY", {"StudyDate": date}, count(by_date, date, date)),
            "accession": Query("accession", "STUDY", {"AccessionNumber": accession}, 1),
            "study_uid": Query("study_uid", "STUDY", {"StudyInstanceUID": study_uid}, 1),
            "series_of_study": Query("series_of_study", "SERIES", {"StudyInstanceUID": study_uid},
                                     count(series, study_uid)),
            "modality_month": Query("modality_month", "STUDY", {"StudyDate": month, "ModalitiesInStudy": modality},
                                    count(by_modality, low, high, modality)),
        }  # fmt: skip
        out += [by_kind[k] for k in kinds]
    con.close()
    return out


#: What a viewer's study and series lists add to the main tags: counters and lists computed from the children.
VIEWER_KEYS = {
    "STUDY": ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
}


def return_keys(level: str, keys: str = "main") -> tuple[str, ...]:
    """The return keys of a query at ``level``: main tags only (``main``), or with ``VIEWER_KEYS`` too."""
    main = STUDY_KEYS if level == "STUDY" else ("StudyInstanceUID", *SERIES_KEYS)
    return main + VIEWER_KEYS.get(level, ()) if keys == "viewer" else main


# -- measuring --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    ms: list[float] = dataclasses.field(default_factory=list)
    first_ms: list[float] = dataclasses.field(default_factory=list)
    matches: list[int] = dataclasses.field(default_factory=list)
    wrong: list[str] = dataclasses.field(default_factory=list)  # queries whose answers were not the expected count
    handler_ms: list[float] = dataclasses.field(default_factory=list)  # the node's C-FIND handler, from its log


#: Runs one query: yields once per answer (so the caller can time the first one), returns when complete.
Runner = Callable[[Query], Iterator[None]]


def measure(run: Runner, queries: list[Query], warmup: int) -> dict[str, Timing]:
    """Time each query to its first answer and to its end; the first ``warmup`` queries of each kind untimed."""
    seen: dict[str, int] = {}
    out: dict[str, Timing] = {}
    for q in queries:
        t0 = time.perf_counter()
        first = None
        n = 0
        for _ in run(q):
            if first is None:
                first = time.perf_counter()
            n += 1
        end = time.perf_counter()
        seen[q.kind] = seen.get(q.kind, 0) + 1
        t = out.setdefault(q.kind, Timing())
        if n != q.expected:
            t.wrong.append(f"{q.keys}: {n} answers, expected {q.expected}")
            log(f"WRONG ANSWER COUNT: {q.kind} {t.wrong[-1]}")
        if seen[q.kind] > warmup:
            t.ms.append((end - t0) * 1000)
            t.first_ms.append(((first or end) - t0) * 1000)
            t.matches.append(n)
    return out


def direct_runner(url: str, storage_dir: Path, keys: str) -> tuple[Runner, Callable[[], None]]:
    """find() plus, per match, the requested keys from inherited_tags (C-FIND's semantics: PN case-insensitive);
    with ``viewer`` keys also the computed ones, through the C-FIND SCP's own ``node.archive.children``.
    The archive is opened by URL as the node opens it (SQLite or PostgreSQL)."""
    from node.archive.db import release_connections
    from node.archive.find import find, inherited_tags
    from node.dicom.levels import Level
    from node.dicom.matching import parse_query

    computed: Callable[..., dict[str, str]] | None = None
    if keys == "viewer":
        from node.archive.children import computed

    db = open_archive(url, storage_dir).db
    db.connect(reuse_if_open=True)
    levels = {"PATIENT": Level.PATIENT, "STUDY": Level.STUDY, "SERIES": Level.SERIES, "IMAGE": Level.INSTANCE}

    def run(q: Query) -> Iterator[None]:
        constraints = parse_query(q.keys, case_sensitive=False, pn_only=True)
        wanted = return_keys(q.level, keys)
        level = levels[q.level]
        for row in find(db, level, constraints):
            tags = inherited_tags(row)
            if computed is not None:
                tags.update(computed(level, row, wanted))
            _answer = {k: tags.get(k, "") for k in wanted}
            yield

    return run, lambda: release_connections(db)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_node(url: str, workdir: Path, scu_aet: str) -> Iterator[tuple[int, str]]:
    """``python -m node serve`` on the index at ``url``; yields (port, AE title) once it answers C-ECHO."""
    from pynetdicom import AE

    port = _free_port()
    aet = "QRBENCH"
    cfg = {
        "Name": "qr-bench", "DicomAet": aet, "DicomPort": port, "DicomListenAddress": "127.0.0.1",
        "Database": url, "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir), "HttpServerEnabled": False, "DicomReceiverProcesses": 1,
        "DicomModalities": {"bench": {"AET": scu_aet, "Host": "127.0.0.1", "Port": 104, "AllowFind": True}},
    }  # fmt: skip
    cfg_path = workdir / "node.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    log_path = workdir / "node.log"
    with log_path.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(cfg_path)], cwd=ROOT,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        ae = AE(ae_title=scu_aet)
        ae.add_requested_context("1.2.840.10008.1.1")
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the node exited ({proc.returncode}); see {log_path}")
            assoc = ae.associate("127.0.0.1", port, ae_title=aet)
            if assoc.is_established:
                assoc.release()
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the node did not answer C-ECHO within 120 s; see {log_path}")
            time.sleep(0.5)
        yield port, aet
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _server_times(log_path: Path) -> list[float]:
    """The ``ms`` of the node's ``find`` log events (its handler's time, without the network and the client)."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "find" and "ms" in event:
                out.append(float(event["ms"]))
    return out


def network_runner(port: int, aet: str, scu_aet: str, keys: str) -> tuple[Runner, Callable[[], None]]:
    """One Study Root C-FIND association held open; a query's latency runs to its final response.

    A plain pynetdicom SCU: its DUL thread looks at the socket every millisecond, one PDU per look (a client
    with a 0.1 ms loop measured the same on this VM, so that is not where the time goes).
    """
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ae = AE(ae_title=scu_aet)
    ae.add_requested_context(FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120

    def on_open(event: evt.Event) -> None:
        # As a viewer should (and node.net.qr does): with Nagle on, the identifier PDU that follows the command
        # PDU waits for the node's delayed ACK, ~40 ms per query that measure TCP, not the node.
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    assoc = ae.associate("127.0.0.1", port, ae_title=aet, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    if not assoc.is_established:
        raise SystemExit("the node refused the C-FIND association (is the C-FIND SCP there? AllowFind?)")
    # pynetdicom's requestor reactor polls the DIMSE queue (non-blocking get_msg) between its pause handshakes
    # with send_c_find, and that handshake has a window: under CPU load the reactor takes a C-FIND response off
    # the queue ("Received unexpected C-FIND service message") and the query loses an answer or its final
    # status (seen here: 6 queries of 800). This client never serves requests, so its reactor reads none.
    blocking_get = assoc.dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return blocking_get(block=True) if block else (None, None)

    assoc.dimse.get_msg = get_msg  # type: ignore[method-assign]

    def run(q: Query) -> Iterator[None]:
        ds = Dataset()
        ds.QueryRetrieveLevel = q.level
        for key in return_keys(q.level, keys):
            setattr(ds, key, "")
        for key, value in q.keys.items():
            setattr(ds, key, value)
        for status, identifier in assoc.send_c_find(ds, FIND):
            code = getattr(status, "Status", None)
            if code not in (0xFF00, 0xFF01, 0x0000):
                raise SystemExit(f"C-FIND {q} failed: {status}")
            if code in (0xFF00, 0xFF01) and identifier is not None:
                yield

    return run, assoc.release


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (inclusive method: p99 of 200 samples lies between the two largest)."""
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[round(p) - 1]


def report(title: str, timings: dict[str, Timing]) -> str:
    handler = any(t.handler_ms for t in timings.values())
    extra = " node handler p50 ms |" if handler else ""
    lines = [f"### {title}", "",
             f"| query kind | answers per query | p50 ms | p99 ms | max ms | first answer p50 ms |{extra} target |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if handler else "") + "---|"]  # fmt: skip
    for kind in KINDS:
        t = timings.get(kind)
        if t is None:
            continue
        p50, p99 = pct(t.ms, 50), pct(t.ms, 99)
        ok = "met" if p50 < TARGET_P50_MS and p99 < TARGET_P99_MS else "**not met**"
        answers = f"{statistics.mean(t.matches):.1f} ({min(t.matches)}-{max(t.matches)})"
        own = f" {pct(t.handler_ms, 50):.1f} |" if t.handler_ms else (" - |" if handler else "")
        lines.append(f"| {kind} | {answers} | {p50:.1f} | {p99:.1f} | {max(t.ms):.1f} | {pct(t.first_ms, 50):.1f} |"
                     f"{own} {ok} |")  # fmt: skip
    wrong = [f"{kind}: {w}" for kind, t in timings.items() for w in t.wrong]
    lines.append("")
    lines.append(f"answer counts checked against plain SQL: {len(wrong)} wrong" + "".join(f"\n  {w}" for w in wrong))
    return "\n".join(lines)


def measure_network(url: str, queries: list[Query], keys: str, warmup: int) -> dict[str, Timing]:
    """The queries over one association to a node serving the index at ``url``, with its handler's times."""
    scu_aet = "BENCHSCU"
    with tempfile.TemporaryDirectory(prefix="qr-bench-node-") as tmp:
        with running_node(url, Path(tmp), scu_aet) as (port, aet):
            run, close = network_runner(port, aet, scu_aet, keys)
            try:
                timings = measure(run, queries, warmup)
            finally:
                close()
        handler = _server_times(Path(tmp) / "node.log")  # one event per query, in order (the node stopped)
    if len(handler) == len(queries):
        seen: dict[str, int] = {}
        for q, ms in zip(queries, handler, strict=True):
            seen[q.kind] = seen.get(q.kind, 0) + 1
            if seen[q.kind] > warmup:
                timings[q.kind].handler_ms.append(ms)
    else:
        log(f"the node logged {len(handler)} C-FINDs for {len(queries)} queries: no handler times")
    return timings


def ratio_report(title: str, sqlite: dict[str, Timing], postgres: dict[str, Timing]) -> str:
    """Per kind, PostgreSQL's p50 and p99 over SQLite's (above 1: PostgreSQL is slower)."""
    lines = [f"### PostgreSQL / SQLite, {title}", "",
             "| query kind | SQLite p50 ms | PostgreSQL p50 ms | p50 ratio | SQLite p99 ms | PostgreSQL p99 ms "
             "| p99 ratio |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for kind in KINDS:
        if kind not in sqlite or kind not in postgres:
            continue
        cells = []
        for p in (50, 99):
            a, b = pct(sqlite[kind].ms, p), pct(postgres[kind].ms, p)
            cells.append(f"{a:.1f} | {b:.1f} | {b / a:.2f}" if a else f"{a:.1f} | {b:.1f} | -")
        lines.append(f"| {kind} | {' | '.join(cells)} |")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    shape = Shape(args.patients, args.studies, args.series, args.instances)
    db_path = Path(args.db)
    built = ensure_index(db_path, shape, args.rebuild, args.commit_every)
    size = index_size(db_path)
    out = [f"index: {db_path}, {shape.total:,} instances ({shape.patients:,} patients x {shape.studies} studies x "
           f"{shape.series} series x {shape.instances}), {size / 1e6:,.0f} MB on disk (index.db + WAL)"]  # fmt: skip
    targets = {"SQLite": f"sqlite:///{db_path}"}
    if args.postgres:
        t0 = time.perf_counter()
        url = ensure_postgres(args.postgres, args.pg_db, db_path, shape.fingerprint(), args.rebuild_pg or built)
        targets["PostgreSQL"] = url
        out.append(f"PostgreSQL copy: database {args.pg_db}, {pg_size(url) / 1e6:,.0f} MB (pg_database_size); "
                   f"ready in {time.perf_counter() - t0:,.0f} s")  # fmt: skip
    kinds = tuple(args.kinds.split(",")) if args.kinds else KINDS
    what = f"{args.reps} queries per kind, {args.keys} return keys"
    results: dict[str, dict[str, dict[str, Timing]]] = {}  # mode title -> database -> kind -> timing
    if args.mode in ("direct", "both"):
        queries = draw_queries(db_path, kinds, args.reps + args.warmup, args.seed)
        title = "find.py directly"
        for name, url in targets.items():  # one database after the other, the same queries
            log(f"{title} on {name}")
            run, close = direct_runner(url, db_path.parent / "storage", args.keys)
            try:
                results.setdefault(title, {})[name] = timings = measure(run, queries, args.warmup)
            finally:
                close()
            out.append(report(f"{title}, {name} ({what})", timings))
    if args.mode in ("network", "both"):
        queries = draw_queries(db_path, kinds, args.reps + args.warmup, args.seed + 1)
        title = "C-FIND over the network, one pynetdicom association"
        for name, url in targets.items():
            log(f"{title} on {name}")
            results.setdefault(title, {})[name] = timings = measure_network(url, queries, args.keys, args.warmup)
            out.append(report(f"{title}, {name} ({what})", timings))
    if "PostgreSQL" in targets:
        out += [ratio_report(title, by_db["SQLite"], by_db["PostgreSQL"]) for title, by_db in results.items()]
    print("\n\n".join(out))
    return 0


# -- ingest timing ----------------------------------------------------------------------------------------------------


def _ingest_tags(p: int, s: int, se: int, i: int) -> IndexTags:
    return IndexTags(
        patient={"PatientName": f"DOE{p:05d}^JOHN", "PatientID": f"P{p:05d}", "PatientBirthDate": "19700101",
                 "PatientSex": "M"},
        study={"StudyDate": "20200115", "StudyTime": "101010", "AccessionNumber": f"A{p}.{s}",
               "StudyInstanceUID": f"1.2.{p}.{s}", "StudyDescription": "CT HEAD"},
        series={"Modality": "CT", "SeriesInstanceUID": f"1.2.{p}.{s}.{se}", "SeriesNumber": str(se),
                "SeriesDescription": "AX"},
        instance={"SOPInstanceUID": f"1.2.{p}.{s}.{se}.{i}", "InstanceNumber": str(i)},
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
    )  # fmt: skip


def cmd_ingest(args: argparse.Namespace) -> int:
    """store() of 2000 instances in a fresh archive, ``--runs`` times: total and the index transaction's share."""
    items = [_ingest_tags(p, s, se, i) for p in range(100) for s in range(2) for se in range(2) for i in range(5)]
    origin = Origin("DicomProtocol", "MOD", "NODE", "127.0.0.1")
    real_index = store_mod._index
    spent = [0.0]

    def timed_index(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real_index(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    store_mod._index = timed_index  # type: ignore[assignment]
    totals, indexes = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            archive: Archive = open_archive(f"sqlite:///{d}/index.db", Path(d) / "storage", sync=False)
            archive.db.connect(reuse_if_open=True)
            spent[0] = 0.0
            t0 = time.perf_counter()
            for tags in items:
                spool = archive.storage.new_spool()
                spool.write(b"x" * 64)
                store_mod.store(archive, spool, tags, origin)
            totals.append(time.perf_counter() - t0)
            indexes.append(spent[0])
            archive.close()
    us = 1e6 / len(items)
    print(f"store() of {len(items)} instances, {args.runs} runs (node from {store_mod.__file__})")
    for label, xs in (("total s: ", totals), ("_index s:", indexes)):
        runs = " ".join(f"{x:.3f}" for x in xs)
        print(f"  {label} {runs}  median {statistics.median(xs) * us:.0f} us/inst")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    ingest = sub.add_parser("ingest", help="time store() on 2000 synthetic instances")
    ingest.add_argument("--runs", type=int, default=7)
    ingest.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--db", default="/tmp/dicom-node-qr-bench/index.db", help="the cached index")
    parser.add_argument("--rebuild", action="store_true", help="build the index again even if cached")
    parser.add_argument("--postgres", metavar="URL", default="",
                        help="also measure a PostgreSQL copy of the index; URL: any database of the server, as a "
                        "role that may CREATE DATABASE (e.g. the output of scripts/postgres.sh)")  # fmt: skip
    parser.add_argument("--pg-db", default="dicomnode_qr_bench", help="the PostgreSQL database holding the copy")
    parser.add_argument("--rebuild-pg", action="store_true", help="drop the PostgreSQL copy and copy it again")
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--studies", type=int, default=10, help="per patient")
    parser.add_argument("--series", type=int, default=10, help="per study")
    parser.add_argument("--instances", type=int, default=1, help="per series")
    parser.add_argument("--commit-every", type=int, default=5_000, help="instances per transaction while building")
    parser.add_argument("--mode", choices=("direct", "network", "both"), default="both")
    parser.add_argument("--reps", type=int, default=200, help="timed queries per kind")
    parser.add_argument("--warmup", type=int, default=10, help="untimed queries per kind first")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kinds", default="", help=f"comma-separated (default: {','.join(KINDS)})")
    parser.add_argument("--keys", choices=("main", "viewer"), default="main",
                        help="return keys: main DICOM tags, or also the counters a viewer asks")  # fmt: skip
    args = parser.parse_args(argv)
    return cmd_ingest(args) if args.command == "ingest" else cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
