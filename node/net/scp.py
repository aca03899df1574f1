"""The DICOM SCP: one small handler per DIMSE service (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET), bound to
pynetdicom events. Query/Retrieve lives in its own modules (:mod:`node.net.find_scp`, ``node.net.retrieve``);
this one holds the state they share and the C-STORE path.

Incoming C-STORE data is spooled by pynetdicom straight into a file of the storage area
(``STORE_RECV_CHUNKED_DATASET``), so a 500 MB multi-frame instance costs no more memory than a 10 KB one and the
bytes stored are exactly the dataset as received, in its transfer syntax, behind a file meta header.  The
handler then reads only the tags the index needs and hands the file to :func:`node.archive.store.store`, which
answers only once file and index row are durable.
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pydicom.config
import pynetdicom.dimse_messages
from peewee import PeeweeException
from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    DEFAULT_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from node import logs
from node.archive.storage import SpoolFile, Storage, is_disk_error
from node.archive.store import Archive, Origin, elapsed_ms, store
from node.config import DEFAULTS, Config
from node.dicom.maintags import MalformedDataset, read_index_tags
from node.net import retrieve
from node.net.access import AccessPolicy
from node.net.fastpath import FastRequestHandler
from node.net.find_scp import handle_find
from node.routing import rules

log = logs.get("dicom-node.scp")

# DIMSE statuses we answer (PS3.4 B.2.3 and PS3.7 C).
SUCCESS = 0x0000
REFUSED_NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

#: The Query/Retrieve information models we serve (PS3.4 C.6.1 and C.6.2), for C-FIND, C-MOVE and C-GET.
QR_MODELS = (
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet,
)  # fmt: skip


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


class _SpoolRegistry:
    """Hands pynetdicom our :class:`SpoolFile` instead of a ``NamedTemporaryFile`` and finds it again by path.

    pynetdicom creates the temporary file through the name ``NamedTemporaryFile`` of its ``dimse_messages``
    module; replacing that name is the one hook that puts the file on our filesystem (so publishing it is a
    rename, not a copy), hashes it while it arrives and turns a full disk into a clean 0xA700.  The handler gets
    the path from the public ``event.dataset_path``.  ``tests/test_scp.py`` pins this pynetdicom behaviour.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: dict[str, tuple[SpoolFile, threading.Thread]] = {}
        self.storage: Storage | None = None

    def install(self, storage: Storage) -> None:
        self.storage = storage
        _config.STORE_RECV_CHUNKED_DATASET = True
        pynetdicom.dimse_messages.NamedTemporaryFile = self._new  # type: ignore[attr-defined,assignment]

    def _new(self, *args: Any, **kwargs: Any) -> SpoolFile:
        assert self.storage is not None
        spool = self.storage.new_spool()
        with self._lock:  # created in the association's DUL thread: remember whose it is
            self._by_path[spool.name] = (spool, threading.current_thread())
        return spool

    def take(self, path: str) -> SpoolFile:
        with self._lock:
            return self._by_path.pop(path)[0]

    def discard_orphans(self) -> int:
        """Delete the partial files of associations whose network thread is gone without a close event
        (pynetdicom ends an association silently when, e.g., a C-STORE names a context it did not accept)."""
        with self._lock:
            owners = {owner for _, owner in self._by_path.values() if not owner.is_alive()}
        return sum(self.discard_owned_by(o) for o in owners)

    def discard_owned_by(self, thread: threading.Thread) -> int:
        """Delete the partial files of an association that ended in the middle of a C-STORE."""
        with self._lock:
            mine = [p for p, (_, owner) in self._by_path.items() if owner is thread]
            spools = [self._by_path.pop(p)[0] for p in mine]
        for spool in spools:
            spool.close()
            assert self.storage is not None
            self.storage.discard_spool(spool.uuid)
        return len(spools)


SPOOLS = _SpoolRegistry()


@dataclass
class _AssocStats:
    opened: float = field(default_factory=time.perf_counter)
    stored: int = 0
    failed: int = 0
    bytes: int = 0


def _default_config() -> Config:
    return Config(values=copy.deepcopy(DEFAULTS))


@dataclass
class StoreSCP:
    """The event handlers of one running SCP (plain functions over shared state).

    ``cfg`` is the node's configuration, for the Query/Retrieve handlers: ``DicomAet`` (RetrieveAETitle, the
    C-MOVE sender), ``CaseSensitivePN``, ``LimitFind*``, timeouts; ``policy`` says who may do what and
    ``policy.known()`` lists the modalities (configured and PUT over REST).
    """

    archive: Archive
    policy: AccessPolicy
    routes: tuple[rules.Route, ...] = ()
    cfg: Config = field(default_factory=_default_config)
    _stats: weakref.WeakKeyDictionary[Any, _AssocStats] = field(default_factory=weakref.WeakKeyDictionary)
    _fsync_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8, "fsync"))

    # -- association events -------------------------------------------------------------------------------
    def on_requested(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        calling = str(rq.primitive.calling_ae_title or "").strip()  # rq.ae_title is filled in only on acceptance
        if not self.policy.may_associate(calling, rq.address):
            log.warning("association refused", peer_aet=calling, peer=f"{rq.address}:{rq.port}",
                        reason="calling AE title not allowed")  # fmt: skip
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
            event.assoc.kill()  # as pynetdicom's own rejections do: waits until the A-ASSOCIATE-RJ is out

    def on_established(self, event: evt.Event) -> None:
        SPOOLS.discard_orphans()
        rq = event.assoc.requestor
        self._stats[event.assoc] = _AssocStats()
        log.info("association opened", peer_aet=rq.ae_title, peer=f"{rq.address}:{rq.port}", pid=os.getpid(),
                 called_aet=event.assoc.acceptor.ae_title, contexts=len(event.assoc.accepted_contexts))  # fmt: skip

    def on_closed(self, event: evt.Event) -> None:
        partial = SPOOLS.discard_owned_by(event.assoc.dul)
        st = self._stats.pop(event.assoc, None)
        if st is None:
            return
        rq = event.assoc.requestor
        how = "aborted" if event.event is evt.EVT_ABORTED else "released"
        log.info("association closed", peer_aet=rq.ae_title, peer=f"{rq.address}:{rq.port}", how=how,
                 stored=st.stored, failed=st.failed, bytes=st.bytes, ms=elapsed_ms(st.opened),
                 partial_discarded=partial)  # fmt: skip

    # -- DIMSE services -----------------------------------------------------------------------------------
    def on_echo(self, event: evt.Event) -> int:
        rq = event.assoc.requestor
        if not self.policy.may_echo(rq.ae_title, rq.address):
            return REFUSED_NOT_AUTHORIZED
        return SUCCESS

    def on_store(self, event: evt.Event) -> int | Dataset:
        t0 = time.perf_counter()
        spool = SPOOLS.take(str(event.dataset_path))
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        st = self._stats.get(event.assoc) or _AssocStats()
        fail = self._failure(event, spool, sop_uid, t0, st)
        try:
            return self._store(event, spool, sop_uid, t0, st, fail)
        except Exception as exc:  # a bug must cost one instance, not the file or the association
            log.exception("store handler error", sop_instance_uid=sop_uid)
            return fail(CANNOT_UNDERSTAND, f"internal error: {type(exc).__name__}", "error")

    def _store(
        self, event: evt.Event, spool: SpoolFile, sop_uid: str, t0: float, st: _AssocStats,
        fail: Callable[[int, str, str], Dataset],
    ) -> int | Dataset:  # fmt: skip
        rq = event.assoc.requestor
        if not self.policy.may_store(rq.ae_title, rq.address):
            return fail(REFUSED_NOT_AUTHORIZED, "calling AE title is not allowed to store", "refused")
        if spool.error is not None:
            return fail(OUT_OF_RESOURCES, f"storage write failed: {spool.error.strerror}", "disk")
        if self.archive.storage.sync:
            spool.begin_sync(self._fsync_pool)
        try:
            tags = read_index_tags(spool.name, event.context.transfer_syntax)
        except MalformedDataset as exc:
            return fail(CANNOT_UNDERSTAND, str(exc), "malformed")
        except OSError as exc:
            return fail(OUT_OF_RESOURCES, f"storage read failed: {exc.strerror}", "disk")
        if tags.sop_uid != sop_uid:
            log.warning("SOPInstanceUID differs from the C-STORE request", request_uid=sop_uid,
                        dataset_uid=tags.sop_uid, peer_aet=rq.ae_title)  # fmt: skip
        origin = Origin("DicomProtocol", rq.ae_title.strip(), event.assoc.acceptor.ae_title.strip(), rq.address)
        try:
            deliveries = self._route(spool.name, origin)
        except MalformedDataset as exc:
            return fail(CANNOT_UNDERSTAND, str(exc), "malformed")
        try:
            result = store(self.archive, spool, tags, origin, deliveries)
        except OSError as exc:
            kind = "disk" if is_disk_error(exc) else "io"
            return fail(OUT_OF_RESOURCES, f"{kind} failure: {exc.strerror or type(exc).__name__}", kind)
        except PeeweeException as exc:
            log.error("index failure", sop_instance_uid=tags.sop_uid, error=str(exc))
            return fail(OUT_OF_RESOURCES, "database failure", "database")  # details stay in our log
        st.stored += 1
        st.bytes += result.size
        log.info("stored", sop_instance_uid=tags.sop_uid, status=result.status, instance=result.ids.instance,
                 series=result.ids.series, study=result.ids.study, patient=result.ids.patient,
                 bytes=result.size, peer_aet=rq.ae_title, ms=elapsed_ms(t0))  # fmt: skip
        if result.status == "Success":
            for rule, destination in deliveries:
                log.info("queued", rule=rule, destination=destination, instance=result.ids.instance,
                         study=result.ids.study, sop_instance_uid=tags.sop_uid)  # fmt: skip
        return SUCCESS

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        yield from handle_find(self, event)

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        yield from retrieve.handle_move(self, event)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        yield from retrieve.handle_get(self, event)

    def _route(self, path: str, origin: Origin) -> list[tuple[str, str]]:
        """The deliveries of the Instance-triggered rules, queued in the instance's own transaction."""
        where = rules.Origin(origin.remote_aet, origin.called_aet, origin.remote_ip)
        return rules.deliveries_for_file(self.routes, path, where)

    def _failure(
        self, event: evt.Event, spool: SpoolFile, sop_uid: str, t0: float, st: _AssocStats
    ) -> Callable[[int, str, str], Dataset]:
        def fail(code: int, comment: str, reason: str) -> Dataset:
            spool.close()
            if not spool.committed:  # an indexed file is never discarded, whatever failed afterwards
                self.archive.storage.discard_spool(spool.uuid)
            st.failed += 1
            log.warning("store failed", sop_instance_uid=sop_uid, status=f"0x{code:04X}", reason=reason,
                        error=comment, peer_aet=event.assoc.requestor.ae_title, ms=elapsed_ms(t0))  # fmt: skip
            return _status(code, comment)

        return fail

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
        ]


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with SO_REUSEPORT so several receiver processes can share one port."""

    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


def make_ae(aet: str, *, max_pdu: int, timeout: float, max_assoc: int, check_called_aet: bool,
            unknown_sop_classes: bool) -> AE:  # fmt: skip
    """The application entity: every storage class pynetdicom knows in every transfer syntax, echo, and the
    Patient Root and Study Root Query/Retrieve models (FIND, MOVE, GET).

    The storage contexts accept whichever role the requestor proposes in SCP/SCU role selection: a C-GET SCU
    proposes to be the storage SCP, so that we can send the instances back on its association, while a plain
    storescu proposes nothing and keeps the default roles (it sends, we store).
    """
    ae = AE(ae_title=aet)
    ae.maximum_pdu_size = max_pdu
    ae.maximum_associations = max_assoc
    ae.network_timeout = timeout
    ae.acse_timeout = timeout
    # C-MOVE opens its sub-association from this AE: without a connect timeout an unreachable (silently
    # dropping) destination would hold the move until the OS gives up.
    ae.connection_timeout = timeout
    ae.dimse_timeout = timeout
    ae.require_called_aet = check_called_aet
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for model in QR_MODELS:  # identifiers are small: the uncompressed syntaxes (and deflate) only
        ae.add_supported_context(model, DEFAULT_TRANSFER_SYNTAXES)
    # Unknown and private SOP classes are negotiated as storage (their first proposed transfer syntax).
    _config.UNRESTRICTED_STORAGE_SERVICE = unknown_sop_classes
    # pynetdicom's default handlers format a log record for every PDU and DIMSE message even when nothing
    # is shown: a large share of its CPU time per instance. We log our own events instead.
    _config.LOG_HANDLER_LEVEL = "none"
    # And the C-FIND/C-MOVE/C-GET services pretty-print every request and *each pending answer's* identifier
    # for a DEBUG record whether or not DEBUG is shown: ~0.16 ms per C-FIND answer. Our own "find" event says
    # what a query asked and how many answers it got.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # pydicom checks every value it sets against its VR's regex, also for each DIMSE command set pynetdicom
    # builds and parses (about 1 ms per C-STORE here). A receiver stores bytes as they came and must accept
    # odd values rather than refuse images, so the receiver process turns that checking off.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    return ae


def start_server(ae: AE, scp: StoreSCP, host: str, port: int, *, reuse_port: bool = False) -> ReusePortServer:
    """Bind and serve in a background thread; return the server (``shutdown()`` stops it)."""

    class _Server(ReusePortServer):
        pass

    _Server.reuse_port = reuse_port
    SPOOLS.install(scp.archive.storage)
    server = ae.make_server((host, port), evt_handlers=scp.handlers(), server_class=_Server,
                            request_handler=FastRequestHandler)  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, name=f"dicom-scp:{port}", daemon=True)
    thread.start()
    return server  # type: ignore[return-value]
