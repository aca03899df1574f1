"""Running the node: lock and recover the storage, start the DICOM server in one or several processes, stop.

Several receiver processes share the DICOM port through SO_REUSEPORT (the kernel spreads associations over
them): Python runs one thread at a time per process, so that is how concurrent senders use every core (see
:func:`receiver_processes` for how many).  Each
receiver spools into its own folder (``.tmp/<slot>``), so when one dies the parent finishes or drops exactly its
half-received files before starting a new one, while the others go on receiving.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import IO

from node import logs
from node.archive import outbox
from node.archive.db import release_connections
from node.archive.models import Outbox
from node.archive.store import Archive, open_archive, recover
from node.config import Config, ConfigError
from node.net.access import AccessPolicy
from node.net.scp import StoreSCP, make_ae, start_server
from node.routing import worker

log = logs.get("dicom-node")

#: A receiver that dies sooner than this after its start counts towards giving up (a crash loop).
_QUICK_DEATH_S = 5.0
_MAX_QUICK_DEATHS = 5


class StopFlag:
    """Set from a signal handler. (``threading.Event.set`` takes a lock that the interrupted main thread may
    hold inside ``Event.wait``: a signal at that moment would hang the shutdown.)"""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._set and time.monotonic() < deadline:
            time.sleep(min(0.1, timeout))
        return self._set


def receiver_processes(cfg: Config) -> int:
    """``DicomReceiverProcesses``, or 4 per core (at most 16) when 0.

    More processes than cores, because associations that share a process also share its GIL: measured here
    with 4 concurrent senders on 2 cores, 8 receivers stored 25-40 % more instances per second than 2, at
    less CPU per instance (no lock convoy), for about 55 MB resident each (partly shared with the parent).
    """
    n = int(cfg["DicomReceiverProcesses"])
    return n if n > 0 else min(16, 4 * (os.cpu_count() or 1))


def routing_workers(cfg: Config) -> int:
    """``RoutingWorkers``, or one per core when 0. Without rules one still runs: it declares series and studies
    stable (the ``StableSeries``/``StableStudy`` changes) and ends rows left by an earlier configuration."""
    if not cfg.routes:
        return 1
    n = int(cfg["RoutingWorkers"])
    return n if n > 0 else os.cpu_count() or 1


def _open(cfg: Config, slot: str = "0") -> Archive:
    return open_archive(cfg.database_url, cfg.storage_dir, overwrite=cfg["OverwriteInstances"],
                        sync=cfg["SyncStorageArea"], slot=cfg.spool_slot(slot))  # fmt: skip


def _run_receiver(cfg: Config, stop: StopFlag, slot: str, reuse_port: bool) -> None:
    archive = _open(cfg, slot)
    ae = make_ae(
        cfg["DicomAet"],
        max_pdu=cfg["MaximumPduLength"],
        timeout=cfg["DicomScpTimeout"],
        max_assoc=cfg["DicomThreadsCount"],
        check_called_aet=cfg["DicomCheckCalledAet"],
        unknown_sop_classes=cfg["UnknownSopClassAccepted"],
    )
    scp = StoreSCP(archive=archive, policy=AccessPolicy.from_config(cfg, archive.db), routes=cfg.routes, cfg=cfg)
    server = start_server(ae, scp, cfg["DicomListenAddress"], cfg["DicomPort"], reuse_port=reuse_port)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        # pynetdicom's shutdown() also drops the server from the AE's list, where only start_server (not the
        # make_server we use) puts it: the ValueError it raises made every receiver "crash" on SIGTERM.
        with contextlib.suppress(ValueError):
            server.shutdown()
        server.server_close()
        archive.close()


def _run_router(cfg: Config, stop: StopFlag, slot: str) -> None:
    archive = _open(cfg, slot)
    try:
        worker.run(cfg, archive, stop, slot, scheduler=slot == "w0")
    finally:
        archive.close()


def http_host(cfg: Config) -> str:
    """Where the REST API listens: loopback only unless ``RemoteAccessAllowed`` (Orthanc's rule)."""
    return "0.0.0.0" if cfg["RemoteAccessAllowed"] else "127.0.0.1"


def _run_http(cfg: Config, stop: StopFlag, slot: str) -> None:
    """The REST API (uvicorn, in a thread of this process so that ``stop`` ends it like the other children)."""
    import pydicom
    import uvicorn

    from node.archive import rewrite
    from node.rest.app import create_app

    # What the REST API writes is checked by the request parser; pydicom's per-assignment checks only cost time.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    archive = _open(cfg, slot)
    app = create_app(cfg, archive)
    # proxy_headers off: no route looks at the peer's address, so X-Forwarded-For need not be parsed per request
    server = uvicorn.Server(uvicorn.Config(app, host=http_host(cfg), port=cfg["HttpPort"], log_level="warning",
                                           access_log=False, lifespan="off", proxy_headers=False))  # fmt: skip
    thread = threading.Thread(target=server.run, name="rest", daemon=True)
    thread.start()
    try:
        while not stop.wait(0.5):
            if not thread.is_alive():
                raise RuntimeError(f"the REST API stopped (port {cfg['HttpPort']})")
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.jobs.shutdown()
        rewrite.shutdown_pool()
        archive.close()


def _lock_storage(cfg: Config) -> IO[str]:
    """One node per storage area (SQLite), or per ``NodeId`` on a storage shared through PostgreSQL: a second
    ``serve`` as the same node would take the first one's spool files for crash leftovers and delete them."""
    storage = cfg.storage_dir
    name = f".lock.{cfg.spool_prefix}node" if cfg.shared else ".lock"
    fh = open(storage / name, "a+")  # noqa: SIM115 - held for the process' lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        who = f" as node {cfg.node_id!r} (give each node its own NodeId)" if cfg.shared else ""
        raise ConfigError(f"{storage} is in use by another running dicom-node{who}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _check_port(host: str, port: int) -> None:
    """Fail at start, in the parent, when the DICOM port cannot be bound (not in an endless restart loop).

    Bound without SO_REUSEPORT, so that another program already listening there with SO_REUSEPORT (say a
    second dicom-node on another storage folder) is detected instead of silently sharing the associations.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _die_with_parent(parent: int) -> None:
    """Linux: a receiver gets SIGKILL when the parent dies, even by ``kill -9`` (no orphan keeps the port)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def serve(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    os.umask(0o077)  # DICOM files and the index hold PHI: readable by the node's user only
    for w in cfg.warnings:
        log.warning("configuration", message=w)
    lock = _lock_storage(cfg)
    n = receiver_processes(cfg)
    _check_port(cfg["DicomListenAddress"], cfg["DicomPort"])
    if cfg["HttpServerEnabled"]:
        _check_port(http_host(cfg), cfg["HttpPort"])
    archive = _open(cfg)  # creates the schema
    # Every receiver's leftovers, before any receiver runs: this node's only, when nodes share the storage.
    finished, dropped, _ = recover(archive, slots=archive.storage.slots(cfg.spool_prefix) if cfg.shared else None)
    with archive.db.connection_context():
        released = outbox.release_claims_of(archive.db, worker.worker_prefix(cfg))  # ours, from before a crash
        queued = Outbox.select().where(Outbox.state.in_([outbox.PENDING, outbox.CLAIMED])).count()
    log.info("dicom-node starting", name=cfg["Name"], aet=cfg["DicomAet"], port=cfg["DicomPort"],
             storage=str(cfg.storage_dir), database=cfg.database_url, receivers=n, pid=os.getpid(),
             recovered=finished, dropped_partial=dropped, config=cfg.source, routes=[r.name for r in cfg.routes],
             routing_workers=routing_workers(cfg), queued=queued, claims_released=released,
             http=f"{http_host(cfg)}:{cfg['HttpPort']}" if cfg["HttpServerEnabled"] else None)  # fmt: skip
    stop = StopFlag()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return _supervise(cfg, archive, n, stop)
    finally:
        log.info("dicom-node stopped")
        lock.close()


def _role(slot: str) -> str:
    return "routing worker" if slot.startswith("w") else "REST API" if slot == "http" else "receiver process"


def _supervise(cfg: Config, archive: Archive, n: int, stop: StopFlag) -> int:
    """Fork ``n`` receivers and the routing workers; restart one that dies after recovering its spool folder
    (and, for a routing worker, releasing the rows it had claimed); stop them all."""
    children: dict[int, tuple[str, float]] = {}
    parent = os.getpid()
    archive.close()

    def spawn(slot: str) -> None:
        release_connections(archive.db)  # a child must never inherit (and share) a database connection
        pid = os.fork()
        if pid == 0:  # child: its own signal handling, then serve
            _die_with_parent(parent)
            child_stop = StopFlag()
            signal.signal(signal.SIGTERM, lambda *_: child_stop.set())
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
            code = 0
            try:
                if slot.startswith("w"):
                    _run_router(cfg, child_stop, slot)
                elif slot == "http":
                    _run_http(cfg, child_stop, slot)
                else:
                    _run_receiver(cfg, child_stop, slot, reuse_port=True)
            except BaseException as exc:  # noqa: BLE001 - report and leave: the parent restarts us
                log.error(f"{_role(slot)} crashed", slot=slot, error=repr(exc))
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = (slot, time.monotonic())

    for i in range(n):
        spawn(str(i))
    for i in range(routing_workers(cfg)):
        spawn(f"w{i}")
    if cfg["HttpServerEnabled"]:
        spawn("http")
    quick_deaths = 0
    code = 0
    pending: list[tuple[str, int, int]] = []
    while not stop.is_set():
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid and pid in children:
            slot, started = children.pop(pid)
            if stop.is_set():
                continue
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < _QUICK_DEATH_S else 0
            if quick_deaths >= _MAX_QUICK_DEATHS:
                log.error("receivers keep dying at start; giving up", slot=slot, status=status)
                code = 1
                break
            pending.append((slot, pid, status))
        for item in list(pending):  # never respawn into a slot whose spool folder is not recovered
            slot, dead_pid, status = item
            try:
                finished, dropped, _ = recover(archive, slots=[cfg.spool_slot(slot)])
                if slot.startswith("w"):
                    with archive.db.connection_context():
                        outbox.release_claims_of(archive.db, f"{worker.worker_prefix(cfg)}{slot}:{dead_pid}")
            except Exception as exc:  # noqa: BLE001 - retried on the next round; the other receivers go on
                log.error("recovery of a dead receiver's files failed; retrying", slot=slot, error=str(exc))
                continue
            pending.remove(item)
            log.error(f"{_role(slot)} died; restarting", pid=dead_pid, status=status, slot=slot,
                      recovered=finished, dropped_partial=dropped)  # fmt: skip
            spawn(slot)
        stop.wait(0.2)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while children and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return code
