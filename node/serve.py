"""Running the node: open the archive, start the DICOM server (in one or several processes), stop cleanly.

Several receiver processes share the DICOM port through SO_REUSEPORT (the kernel spreads associations over
them): Python runs one thread at a time per process, so that is how concurrent senders use every core.  Crash
recovery of the storage runs once, in the parent, before any receiver starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from types import FrameType

from node import logs
from node.archive.store import Archive, open_archive, recover
from node.config import Config
from node.net.access import AccessPolicy
from node.net.scp import StoreSCP, make_ae, start_server

log = logs.get("dicom-node")


def receiver_processes(cfg: Config) -> int:
    n = int(cfg["DicomReceiverProcesses"])
    return n if n > 0 else max(1, os.cpu_count() or 1)


def _open(cfg: Config) -> Archive:
    return open_archive(cfg.database_url, cfg.storage_dir, overwrite=cfg["OverwriteInstances"],
                        sync=cfg["SyncStorageArea"])  # fmt: skip


def _run_receiver(cfg: Config, stop: threading.Event, reuse_port: bool) -> None:
    archive = _open(cfg) if not reuse_port else _open_no_recover(cfg)
    ae = make_ae(
        cfg["DicomAet"],
        max_pdu=cfg["MaximumPduLength"],
        timeout=cfg["DicomScpTimeout"],
        max_assoc=cfg["DicomThreadsCount"],
        check_called_aet=cfg["DicomCheckCalledAet"],
        unknown_sop_classes=cfg["UnknownSopClassAccepted"],
    )
    scp = StoreSCP(archive=archive, policy=AccessPolicy.from_config(cfg), aet=cfg["DicomAet"])
    server = start_server(ae, scp, cfg["DicomListenAddress"], cfg["DicomPort"], reuse_port=reuse_port)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        archive.close()


def _open_no_recover(cfg: Config) -> Archive:
    from node.archive.db import open_index
    from node.archive.storage import FileStorage

    return Archive(db=open_index(cfg.database_url), storage=FileStorage(cfg.storage_dir, cfg["SyncStorageArea"]),
                   overwrite=cfg["OverwriteInstances"])  # fmt: skip


def _die_with_parent() -> None:
    """Linux: a receiver gets SIGKILL when the parent dies, even by ``kill -9`` (no orphan keeps the port)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code."""
    for w in cfg.warnings:
        log.warning("configuration", message=w)
    archive = _open(cfg)  # creates the schema and runs crash recovery once
    finished, dropped, _garbage = recover(archive)
    archive.close()
    n = receiver_processes(cfg)
    log.info("dicom-node starting", name=cfg["Name"], aet=cfg["DicomAet"], port=cfg["DicomPort"],
             storage=str(cfg.storage_dir), database=cfg.database_url, receivers=n, pid=os.getpid(),
             recovered=finished, dropped_partial=dropped, config=cfg.source)  # fmt: skip
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if n == 1:
        _run_receiver(cfg, stop, reuse_port=False)
        log.info("dicom-node stopped")
        return 0
    children: dict[int, int] = {}

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # child: its own signal handling, then serve
            _die_with_parent()
            child_stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: child_stop.set())
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
            code = 0
            try:
                _run_receiver(cfg, child_stop, reuse_port=True)
            except BaseException as exc:  # noqa: BLE001 - report and leave: the parent restarts us
                log.error("receiver crashed", slot=slot, error=repr(exc))
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = slot

    for slot in range(n):
        spawn(slot)
    while not stop.is_set():
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            slot = children.pop(pid, None)
            if slot is not None and not stop.is_set():
                log.error("receiver process died; restarting", pid=pid, status=status, slot=slot)
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
        os.kill(pid, signal.SIGKILL)
    log.info("dicom-node stopped")
    return 0
