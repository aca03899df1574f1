"""Shared test helpers: sample paths, DCMTK binaries, a real node process on a free port, synthetic data.

Tests read the real-world samples in place from ``../shared/samples`` (their licence forbids copying them into
the project) and drive the node with real DICOM peers (DCMTK from Debian), never with mocks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"
DCMTK = Path(os.environ.get("DCMTK_BIN", "/usr/bin"))  # never pynetdicom's console scripts of the same names
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


#: An admin URL of a PostgreSQL server (a role that may CREATE DATABASE). When set, every archive and node of
#: the tests gets a throwaway database there instead of an SQLite file (``scripts/test.sh`` runs the archive,
#: engine and gateway suites once more that way).
PG_ADMIN = os.environ.get("DICOM_NODE_TEST_POSTGRES", "")


def _pg_admin_sql(sql: str) -> None:
    import psycopg2

    con = psycopg2.connect(PG_ADMIN)
    con.autocommit = True
    try:
        con.cursor().execute(sql)
    finally:
        con.close()


def new_database_url(tmp_path: Path, name: str = "index", session: bool = False) -> str:
    """An empty index for one test: ``sqlite:///<tmp_path>/<name>.db``, or a fresh PostgreSQL database, dropped
    after the test (``session``: at the end of the run, for a module-scoped corpus)."""
    if not PG_ADMIN:
        return f"sqlite:///{tmp_path}/{name}.db"
    import uuid

    db = f"dn_test_{uuid.uuid4().hex[:16]}"
    _pg_admin_sql(f'CREATE DATABASE "{db}"')
    (_SESSION if session else _CREATED).append(db)
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + db


_CREATED: list[str] = []
_SESSION: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a PostgreSQL server, the multi-node tests are deselected (``scripts/test.sh`` provides one)."""
    if PG_ADMIN:
        return
    kept = [i for i in items if i.get_closest_marker("postgres_only") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


@pytest.fixture(scope="session", autouse=True)
def _drop_session_databases() -> Iterator[None]:
    yield
    for name in (*_SESSION, *_CREATED):
        _drop(name)


def _drop(name: str) -> None:
    """Drop a test database. ``WITH (FORCE)`` ends the node's connections, but not an autovacuum worker that
    PostgreSQL started on it (our role may not signal it): those finish in a moment, so try again a while."""
    import psycopg2

    for _ in range(60):
        try:
            _pg_admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except (psycopg2.errors.InsufficientPrivilege, psycopg2.errors.ObjectInUse):
            time.sleep(0.25)
    _pg_admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """Drop the databases a test made. Those of module-scoped fixtures were made before this fixture starts
    (higher scopes set up first): they stay until the end of the run."""
    mark = len(_CREATED)
    yield
    while len(_CREATED) > mark:
        _drop(_CREATED.pop())


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return new_database_url(tmp_path)


def sql_rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one statement (``?`` placeholders) against a test index, SQLite or PostgreSQL, outside the node."""
    if url.startswith("sqlite:///"):
        con = sqlite3.connect(url[len("sqlite:///") :])
        try:
            con.execute("PRAGMA foreign_keys = ON")  # as the node has it (ON DELETE CASCADE)
            rows = con.execute(sql, args).fetchall()
            con.commit()
            return rows
        finally:
            con.close()
    import psycopg2

    con = psycopg2.connect(url)
    try:
        cur = con.cursor()
        cur.execute(sql.replace("?", "%s"), args or None)  # (no arguments: a % in the SQL is literal)
        rows = cur.fetchall() if cur.description else []
        con.commit()
        return [tuple(r) for r in rows]
    finally:
        con.close()


def dcmtk(tool: str) -> str:
    path = DCMTK / tool
    if not path.exists():
        pytest.fail(f"{path} is missing: install DCMTK (apt-get install dcmtk), see README")
    return str(path)


def dcmtk_env() -> dict[str, str]:
    """DCMTK 3.6.7 leaves Nagle's algorithm on unless TCP_NODELAY=1 is set (each C-STORE would stall ~45 ms)."""
    return dict(os.environ, TCP_NODELAY="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, what: str, timeout: float = 10) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port`` (a peer we started, say storescp)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"{what} did not start listening on {port}"
        time.sleep(0.05)


def sample_files() -> list[Path]:
    """Every file under the shared samples folder (some are not DICOM on purpose)."""
    if not SAMPLES.is_dir():
        pytest.fail(f"{SAMPLES} is missing: tests need ../shared/samples beside the project")
    return sorted(p for p in SAMPLES.rglob("*") if p.is_file())


def dicom_samples() -> list[Path]:
    """The samples that are storable DICOM instances (not PNG/raw, not DICOMDIR)."""
    out = []
    for p in sample_files():
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        if "SOPInstanceUID" in ds and p.name != "DICOMDIR":
            out.append(p)
    return out


def storescu_profile(files: list[Path], path: Path, acceptor: bool = False) -> list[str]:
    """A DCMTK association profile for exactly the files' (SOP class, transfer syntax) pairs.

    storescu's built-in proposals only offer uncompressed syntaxes plus one chosen compressed one, so sending a
    mixed folder (JPEG, J2K, RLE, deflate…) as it is needs a profile (``-xf FILE Test``).  With ``acceptor``
    the profile is for storescp: one context per SOP class listing every syntax seen for it.
    """
    pairs = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        meta = getattr(ds, "file_meta", None)
        ts = str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
        pairs.add((str(ds.SOPClassUID), ts))
    if acceptor:
        by_class: dict[str, set[str]] = {}
        for sop, ts in pairs:
            by_class.setdefault(sop, set()).add(ts)
        groups = {sop: tuple(sorted(tss)) for sop, tss in by_class.items()}
    else:
        groups = {f"{sop}\\{ts}": (ts,) for sop, ts in pairs}
    ts_lists = sorted(set(groups.values()))
    lines = ["[[TransferSyntaxes]]"]
    for i, tss in enumerate(ts_lists):
        lines.append(f"[TS{i}]")
        lines += [f"TransferSyntax{j} = {ts}" for j, ts in enumerate(tss, 1)]
    lines += ["", "[[PresentationContexts]]", "[Contexts]"]
    for n, (key, tss) in enumerate(sorted(groups.items()), 1):
        sop = key.split("\\")[0]
        lines.append(f"PresentationContext{n} = {sop}\\TS{ts_lists.index(tss)}")
    lines += ["", "[[Profiles]]", "[Test]", "PresentationContexts = Contexts", ""]
    assert len(groups) <= 128, "more than 128 presentation contexts"
    path.write_text("\n".join(lines))
    return ["-xf", str(path), "Test"]


def make_dataset(*, patient_id: str | None = "PAT1", study_uid: str | None = None, series_uid: str | None = None,
                 sop_uid: str | None = None, sop_class: str = CT_IMAGE_STORAGE, **tags: Any) -> Dataset:  # fmt: skip
    """A small synthetic instance with file meta and fresh UIDs, not encoded (``patient_id=None``: no PatientID)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PatientName = tags.pop("PatientName", "Test^Patient")
    ds.Modality = tags.pop("Modality", "CT")
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def add_pixels(ds: Dataset, data: bytes, rows: int, frames: int = 1) -> None:
    """16-bit monochrome pixel data of ``rows`` x ``rows`` (x ``frames``)."""
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = data


def make_instance(path: Path, *, patient_id: str = "PAT1", study_uid: str | None = None,
                  series_uid: str | None = None, sop_uid: str | None = None, rows: int = 16,
                  frames: int = 1, **tags: Any) -> Path:  # fmt: skip
    """Write a small synthetic CT instance (explicit VR little endian)."""
    tags.setdefault("InstanceNumber", 1)
    ds = make_dataset(patient_id=patient_id, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, **tags)
    add_pixels(ds, os.urandom(rows * rows * 2) * frames, rows, frames)
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a Part-10 file (everything after the file meta group)."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return data
    meta_len = int.from_bytes(data[140:144], "little")  # (0002,0000) UL value
    return data[144 + meta_len :]


@dataclass
class Node:
    """A dicom-node server running as a real subprocess."""

    workdir: Path
    port: int
    aet: str = "DICOMNODE"
    config: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    http_port: int = field(default_factory=free_port)
    database: str = ""  # the index URL; "" until write_config picks one (SQLite under the workdir, or PG_ADMIN's)

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def index_db(self) -> Path:
        return self.workdir / "index" / "index.db"

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    @property
    def target(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        if not self.database and PG_ADMIN:
            self.database = self.config.get("Database") or new_database_url(self.workdir)
        cfg = {"DicomAet": self.aet, "DicomPort": self.port, "DicomListenAddress": "127.0.0.1",
               "StorageDirectory": "storage", "IndexDirectory": "index", "HttpPort": self.http_port,
               **({"Database": self.database} if self.database else {}), **self.config}  # fmt: skip
        path = self.workdir / "node.json"
        path.write_text("// test configuration\n" + json.dumps(cfg, indent=2))
        return path

    def start(self, wait: bool = True, preexec_fn: Any = None) -> Node:
        cfg = self.write_config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process' lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True, preexec_fn=preexec_fn,
        )  # fmt: skip
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"node exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        pytest.fail(f"node did not listen on {self.port}:\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def kill9(self) -> None:
        """``kill -9`` of the node's main process only: receivers must die with it."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait for the receivers to be gone (port free)
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        pytest.fail("receiver processes survived the kill -9 of the node")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rest(self, timeout: float = 60) -> Any:
        """An httpx client of the node's REST API, once its process answers (it starts a moment after the
        DICOM port)."""
        import httpx

        http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=timeout)
        deadline = time.monotonic() + 20
        while True:
            try:
                if http.get("/system").status_code == 200:
                    return http
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the REST API did not answer on {self.http_port}:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                ev = json.loads(line)
                if ev.get("event") == name:
                    out.append(ev)
        return out

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return sql_rows(self.config.get("Database") or self.database or f"sqlite:///{self.index_db}", sql, *args)

    def spool_files(self) -> list[Path]:
        """Files left in the receivers' spool folders (``.tmp/<slot>/``)."""
        return [p for p in (self.storage / ".tmp").rglob("*") if p.is_file()]

    def stored_files(self) -> set[Path]:
        return {
            p
            for p in self.storage.rglob("*")
            if p.is_file() and ".tmp" not in p.parts and not p.name.startswith(".lock")
        }

    def file_of(self, sop_uid: str) -> Path:
        rows = self.query('SELECT file_uuid FROM "instance" WHERE sop_uid = ?', sop_uid)
        assert len(rows) == 1, f"{sop_uid}: {len(rows)} index rows"
        uuid = rows[0][0]
        return self.storage / uuid[:2] / uuid


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    nodes: list[Node] = []

    def make(**config: Any) -> Node:
        workdir = tmp_path / f"node{len(nodes)}"
        workdir.mkdir()
        node = Node(workdir=workdir, port=free_port(), config=config)
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.stop()


def run(cmd: list[str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), **kw)


# -- the REST API on a real SQLite archive (no server: FastAPI's test client) ---------------------------------


@pytest.fixture
def rest_archive(tmp_path: Path, db_url: str) -> Any:
    from node.archive.store import open_archive

    return open_archive(db_url, tmp_path / "storage")


@pytest.fixture
def rest_client(rest_archive: Any, tmp_path: Path, db_url: str) -> Any:
    from fastapi.testclient import TestClient

    from node import config
    from node.rest.app import create_app

    cfg = config.build(None, {"StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path),
                              "DicomAet": "RESTNODE", "Database": db_url}, environ={})  # fmt: skip
    return TestClient(create_app(cfg, rest_archive))


def store_file(archive: Any, path: Path) -> None:
    """Store a file in an archive as the receiver does (DicomProtocol origin)."""
    from node.archive.store import Origin, store
    from node.dicom.maintags import read_index_tags

    spool = archive.storage.new_spool()
    spool.write(path.read_bytes())
    archive.db.connect(reuse_if_open=True)
    store(archive, spool, read_index_tags(spool.name), Origin("DicomProtocol", "MOD", "NODE", "127.0.0.1"))
