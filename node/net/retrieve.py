"""The C-MOVE and C-GET SCP: which stored instances an identifier names, and sending them.

Both handlers follow pynetdicom's handler protocol (``EVT_C_MOVE``: destination, number of sub-operations, then
``(status, dataset)`` pairs; ``EVT_C_GET``: the same without the destination), so pynetdicom writes every
response: the pending ones with the remaining/completed/failed/warning counts after each sub-operation, the
cancel response with the counts so far, and the final one (``0x0000``; ``0xB000`` when some failed or gave a
warning; ``0xA702`` when all failed) with the Failed SOP Instance UID List (PS3.4 C.4.2.1.4, C.4.3.1.4).

What pynetdicom would do with the yielded dataset (decode the whole instance, re-encode it in memory) is not
what an archive wants, so each yielded dataset is only a stand-in naming the instance: the association's
``send_c_store`` is bound, for that stand-in, to :class:`node.net.forward.Connection`, which streams the
stored file as it is (bounded memory, byte-exact), decompresses it when the peer did not accept its transfer
syntax (the pixel-data plugins of :mod:`node.dicom.transcode`), and for C-MOVE sets the Move Originator AE
title and message ID of the C-MOVE's requestor (pynetdicom would put our own AE title there).

* C-MOVE: the Move Destination is looked up by AE title among the known modalities (``DicomModalities`` and
  those added over REST), compared as :mod:`node.net.access` compares calling AE titles; pynetdicom opens the
  one sub-association to it with presentation contexts built from what is sent (each instance's own syntax plus
  Explicit and Implicit VR Little Endian) and we adopt it.
* C-GET: the instances go back on the requestor's association, over the storage contexts on which it accepted
  to be the SCP (role selection) only.

Selection follows Orthanc's ``OrthancMoveRequestHandler``: the unique key of the retrieve level
(``PatientID``, ``StudyInstanceUID`` or ``AccessionNumber``, ``SeriesInstanceUID``, ``SOPInstanceUID``),
matched exactly, ``\\``-separated lists allowed, the level deduced from the deepest key given when
``QueryRetrieveLevel`` is missing. Unique keys of the levels above, when given, narrow the selection too.
Where we differ from Orthanc (docs/compatibility.md): no match is a success with 0 sub-operations (Orthanc:
failure 0xC000), an unknown destination is 0xA801 (Orthanc: 0xC000), a failed sub-operation is counted and the
move goes on (Orthanc: the move stops with 0xC000).
"""

from __future__ import annotations

import dataclasses
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peewee import Field, PeeweeException
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pynetdicom import _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import StoragePresentationContexts

from node import logs
from node.archive.db import reset_if_broken
from node.archive.models import Instance, Patient, Series, Study
from node.config import Modality
from node.dicom.levels import Level
from node.net.forward import FALLBACKS, Connection, Outgoing, Sent, contexts_for, on_connect
from node.net.scu import MAX_CONTEXTS, Target, inspect
from node.routing.transform import Transformer

if TYPE_CHECKING:
    from node.net.scp import StoreSCP

log = logs.get("dicom-node.retrieve")

# Statuses we choose (PS3.4 C.4.2.1.4 and C.4.3.1.4, PS3.7 C); pynetdicom picks the final one itself.
PENDING = 0xFF00
CANCELLED = 0xFE00
NOT_AUTHORIZED = 0x0124
SOP_CLASS_NOT_SUPPORTED = 0x0122
MOVE_DESTINATION_UNKNOWN = 0xA801  # answered by pynetdicom itself when the destination yielded is (None, None)
OUT_OF_RESOURCES_MATCHES = 0xA701  # unable to calculate number of matches (the index failed)
IDENTIFIER_MISMATCH = 0xA900  # identifier does not match SOP class
UNABLE_TO_PROCESS = 0xC000

#: The C-STORE statuses handed back to pynetdicom, which only classifies them to keep its counts (the
#: destination's own status, whatever its code, is in our log).
_STORE_SUCCESS, _STORE_WARNING, _STORE_FAILURE = 0x0000, 0xB000, 0xC000

STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
COMPOSITE_INSTANCE_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.4.2"
COMPOSITE_INSTANCE_ROOT_GET = "1.2.840.10008.5.1.4.1.2.4.3"
#: C-GET without bulk data: the instances would have to be rewritten without their pixel data; not offered.
WITHOUT_BULK_DATA_GET = "1.2.840.10008.5.1.4.1.2.5.3"
#: Information models without a PATIENT level (PS3.4 C.6.2, C.6.3).
_NO_PATIENT_LEVEL = frozenset({STUDY_ROOT_MOVE, STUDY_ROOT_GET, COMPOSITE_INSTANCE_ROOT_MOVE,
                               COMPOSITE_INSTANCE_ROOT_GET})  # fmt: skip

_LEVELS = {"PATIENT": Level.PATIENT, "STUDY": Level.STUDY, "SERIES": Level.SERIES, "IMAGE": Level.INSTANCE,
           "INSTANCE": Level.INSTANCE}  # fmt: skip
#: The unique keys, with their level and indexed column. At STUDY level either key names the study.
_KEYS: tuple[tuple[str, Level, Field], ...] = (
    ("PatientID", Level.PATIENT, Patient.patient_id),
    ("StudyInstanceUID", Level.STUDY, Study.study_uid),
    ("AccessionNumber", Level.STUDY, Study.accession_number),
    ("SeriesInstanceUID", Level.SERIES, Series.series_uid),
    ("SOPInstanceUID", Level.INSTANCE, Instance.sop_uid),
)


class RetrieveRefused(Exception):
    """The request cannot be carried out; ``status`` is the C-MOVE/C-GET failure to answer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status

    def response(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = str(self)[:64]  # LO
        return ds


@dataclass(frozen=True, slots=True)
class Match:
    """A stored instance the identifier names."""

    public_id: str
    study: str
    sop_uid: str
    file_uuid: str
    sop_class: str  # from the index: what the sub-association is planned with
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class Selection:
    """What an identifier asks for: the retrieve level and, per unique key given, the values it accepts."""

    level: Level
    keys: tuple[tuple[str, Field, tuple[str, ...]], ...]


def _values(identifier: Dataset, keyword: str) -> tuple[str, ...]:
    """The values of a unique key: a list of UIDs/IDs (``\\``-separated), blanks and padding dropped."""
    value = identifier.get(keyword)
    if value is None or value == "":
        return ()
    items = list(value) if isinstance(value, MultiValue) else str(value).split("\\")
    return tuple(v for v in (str(i).strip(" \0") for i in items) if v)


def parse_identifier(identifier: Dataset, model: str) -> Selection:
    """The selection an identifier makes under ``model`` (the request's Affected SOP Class).

    Raises :class:`RetrieveRefused` (0xA900) for an unknown or missing level with no key to deduce it from, a
    PATIENT level in a model without one, and a level whose unique key is missing; (0xC000) for an identifier
    that cannot be decoded.
    """
    try:
        given = {kw: _values(identifier, kw) for kw, _, _ in _KEYS}
        raw_level = identifier.get("QueryRetrieveLevel")
    except Exception as exc:  # noqa: BLE001 - pydicom decodes lazily: any element may fail to parse
        raise RetrieveRefused(UNABLE_TO_PROCESS, f"cannot decode the identifier: {type(exc).__name__}") from None
    if raw_level is None or str(raw_level).strip() == "":
        # Not conformant, but sent by some SCUs (Orthanc's "Tudor DICOM"): the deepest level given a key.
        level = next((lv for kw, lv, _ in reversed(_KEYS) if given[kw]), None)
        if level is None:
            raise RetrieveRefused(IDENTIFIER_MISMATCH, "no QueryRetrieveLevel and no unique key")
    else:
        name = str(raw_level).strip().upper()
        if name not in _LEVELS:
            raise RetrieveRefused(IDENTIFIER_MISMATCH, f"unknown QueryRetrieveLevel {name[:20]!r}")
        level = _LEVELS[name]
    if level is Level.PATIENT and model in _NO_PATIENT_LEVEL:
        raise RetrieveRefused(IDENTIFIER_MISMATCH, "PATIENT level in a model without a patient level")
    if not any(given[kw] for kw, lv, _ in _KEYS if lv == level):
        needed = " or ".join(kw for kw, lv, _ in _KEYS if lv == level)
        raise RetrieveRefused(IDENTIFIER_MISMATCH, f"a {level.name} retrieve needs {needed}")
    keys = tuple((kw, column, given[kw]) for kw, lv, column in _KEYS if lv <= level and given[kw])
    return Selection(level, keys)


def select(selection: Selection) -> list[Match]:
    """The stored instances a selection names, study by study and in series order (call within a connection).

    Every key is an exact match on an indexed column (Orthanc's ``LookupIdentifierExact``): no wildcard, no
    case folding.
    """
    query = (Instance.select(Instance.public_id, Study.public_id, Instance.sop_uid, Instance.file_uuid,
                             Instance.sop_class_uid, Instance.transfer_syntax)
             .join(Series).join(Study).join(Patient))  # fmt: skip
    for _, column, values in selection.keys:
        query = query.where(column == values[0] if len(values) == 1 else column.in_(list(values)))
    query = query.order_by(Study.id, Series.id, Instance.index_in_series, Instance.id)
    return [Match(*row) for row in query.tuples()]


def destination(known: Sequence[Modality], aet: str, strict: bool) -> Modality | None:
    """The modality a Move Destination names (the first by name when several share the AE title)."""
    wanted = aet.strip()
    for m in sorted(known, key=lambda m: m.name):
        if (m.aet == wanted) if strict else (m.aet.upper() == wanted.upper()):
            return m
    return None


def plan_contexts(matches: list[Match]) -> list[Any]:
    """The presentation contexts of a C-MOVE sub-association: what :func:`forward.contexts_for` proposes.

    Past DICOM's 128 contexts, each SOP class keeps Implicit VR Little Endian (every SCP accepts it and any
    instance can be decompressed to it), then its own syntaxes and Explicit VR Little Endian while room remains.
    """
    items = [Outgoing(Path(), m.sop_class, m.transfer_syntax) for m in matches if m.sop_class and m.transfer_syntax]
    pairs = contexts_for(items)
    if len(pairs) > MAX_CONTEXTS:
        implicit = str(FALLBACKS[-1])
        chosen: list[tuple[str, str]] = sorted({(c, implicit) for c, _ in pairs})[:MAX_CONTEXTS]
        for pair in sorted(pairs - set(chosen), key=lambda p: p[1] in FALLBACKS):
            if len(chosen) < MAX_CONTEXTS:
                chosen.append(pair)
        pairs = set(chosen)
    return [build_context(sop_class, ts) for sop_class, ts in sorted(pairs)]


@dataclass
class Retrieval:
    """One C-MOVE or C-GET in progress: the instances, the connection they go over and the tallies."""

    service: str  # "C-MOVE" / "C-GET"
    peer_aet: str
    destination: str  # the modality's name (C-MOVE) or the requestor's AE title (C-GET)
    scp: StoreSCP
    conn: Connection
    convert: Callable[[Outgoing, str], Path]
    matches: list[Match] = field(default_factory=list)
    completed: int = 0
    warnings: int = 0
    failed: int = 0
    cancelled: bool = False
    attached: bool = False
    _pending: tuple[Dataset, Match] | None = None
    _started: float = field(default_factory=time.perf_counter)

    def attach(self, assoc: Association, *, acceptor: bool) -> None:
        """Send over ``assoc`` from now on; its ``send_c_store`` given a stand-in sends the stored file instead."""
        self.conn.adopt(assoc, acceptor=acceptor)
        own = types.MethodType(type(assoc).send_c_store, assoc)

        def send_c_store(dataset: Any, msg_id: int = 1, *args: Any, **kwargs: Any) -> Dataset:
            pending = self._pending
            if pending is not None and dataset is pending[0]:
                self._pending = None
                return self._send(pending[1], msg_id)
            return own(dataset, msg_id, *args, **kwargs)  # the file itself, from Connection.send

        assoc.send_c_store = send_c_store  # type: ignore[method-assign]
        # A path is sent as it is on disk (not decoded and re-encoded) only in pynetdicom's chunked mode.
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.attached = True

    def on_established(self, event: evt.Event) -> None:
        """``EVT_ESTABLISHED`` of the C-MOVE sub-association pynetdicom opens."""
        self.attach(event.assoc, acceptor=False)

    def detach(self, assoc: Association) -> None:
        assoc.__dict__.pop("send_c_store", None)

    def sub_operations(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """The ``(status, dataset)`` pairs: a stand-in per instance, or the cancel."""
        for match in self.matches:
            if event.is_cancelled:
                self.cancelled = True
                yield CANCELLED, None
                return
            stand_in = Dataset()
            stand_in.SOPInstanceUID = match.sop_uid  # what pynetdicom lists when the sub-operation fails
            self._pending = (stand_in, match)
            yield PENDING, stand_in

    def _send(self, match: Match, msg_id: int) -> Dataset:
        t0 = time.perf_counter()
        path = self.scp.archive.storage.locate(match.file_uuid)
        try:
            meta = inspect(path)  # what pynetdicom will look up: the stored file's own header
            sent = self.conn.send(Outgoing(path, meta.sop_class, meta.transfer_syntax), self.convert, msg_id)
        except (OSError, InvalidDicomError) as exc:
            sent = Sent(False, None, f"cannot read the stored file: {exc}")
        status = Dataset()
        fields = dict(service=self.service, peer_aet=self.peer_aet, destination=self.destination,
                      instance=match.public_id, study=match.study, sop_instance_uid=match.sop_uid,
                      status=None if sent.status is None else f"0x{sent.status:04X}")  # fmt: skip
        if sent.ok:
            log.info("sent", transfer_syntax=sent.transfer_syntax, ms=round((time.perf_counter() - t0) * 1000, 1),
                     **fields)  # fmt: skip
            if sent.status:
                self.warnings += 1
                status.Status = _STORE_WARNING
            else:
                self.completed += 1
                status.Status = _STORE_SUCCESS
        else:
            log.warning("failed", error=sent.error, **fields)
            self.failed += 1
            status.Status = _STORE_FAILURE
        return status

    def summary(self) -> None:
        """One event per retrieve with its tallies (also when pynetdicom could not associate with a C-MOVE
        destination: it answers 0xA801 itself and abandons this generator, whose ``finally`` still runs)."""
        remaining = len(self.matches) - self.completed - self.warnings - self.failed
        fields = dict(service=self.service, peer_aet=self.peer_aet, destination=self.destination,
                      instances=len(self.matches), completed=self.completed, warnings=self.warnings,
                      failed=self.failed, remaining=remaining, cancelled=self.cancelled, connected=self.attached,
                      ms=round((time.perf_counter() - self._started) * 1000, 1))  # fmt: skip
        if self.attached:
            log.info("retrieve done", **fields)
        else:
            log.warning("retrieve done", error="could not associate with the destination", **fields)


def _prepare(scp: StoreSCP, event: evt.Event, service: str) -> tuple[Selection, list[Match]]:
    """Permission, identifier and selection of a C-MOVE/C-GET; raises :class:`RetrieveRefused`."""
    rq = event.assoc.requestor
    may = scp.policy.may_move if service == "C-MOVE" else scp.policy.may_get
    if not may(rq.ae_title, rq.address):
        raise RetrieveRefused(NOT_AUTHORIZED, f"{rq.ae_title.strip()} may not {service}")
    model = str(event.request.AffectedSOPClassUID or "")
    if model == WITHOUT_BULK_DATA_GET:
        raise RetrieveRefused(SOP_CLASS_NOT_SUPPORTED, "retrieve without bulk data is not supported")
    try:
        identifier = event.identifier
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises for bytes it cannot decode
        raise RetrieveRefused(UNABLE_TO_PROCESS, f"cannot decode the identifier: {type(exc).__name__}") from None
    selection = parse_identifier(identifier, model)
    try:
        scp.archive.db.connect(reuse_if_open=True)  # this thread's connection, kept as the store path does
        matches = select(selection)
    except PeeweeException as exc:
        log.error("index failure", service=service, error=str(exc))
        reset_if_broken(scp.archive.db)
        raise RetrieveRefused(OUT_OF_RESOURCES_MATCHES, "database failure") from None
    return selection, [m if m.sop_class and m.transfer_syntax else _from_header(scp, m) for m in matches]


def _from_header(scp: StoreSCP, match: Match) -> Match:
    """A match whose index row lacks its SOP class or transfer syntax, completed from the stored file."""
    try:
        meta = inspect(scp.archive.storage.locate(match.file_uuid))
    except (OSError, InvalidDicomError):
        return match  # sending it will fail, and say why
    return dataclasses.replace(match, sop_class=meta.sop_class, transfer_syntax=meta.transfer_syntax)


def _refused(service: str, peer_aet: str, refusal: RetrieveRefused, **extra: Any) -> None:
    log.warning("retrieve refused", service=service, peer_aet=peer_aet, status=f"0x{refusal.status:04X}",
                reason=str(refusal), **extra)  # fmt: skip


#: What a C-MOVE refused before any sub-operation proposes to the destination (see :func:`handle_move`).
_ANY_STORAGE_SCP = [build_context("1.2.840.10008.1.1"), *StoragePresentationContexts[: MAX_CONTEXTS - 1]]


def _converter(scp: StoreSCP) -> Callable[[Outgoing, str], Path]:
    transformer = Transformer(scp.archive.db, scp.archive.storage.tmp)

    def convert(item: Outgoing, syntax: str) -> Path:
        return transformer.convert(item.path, syntax).path

    return convert


def handle_move(scp: StoreSCP, event: evt.Event) -> Iterator[Any]:
    """``EVT_C_MOVE``: yields the destination, the number of sub-operations, then the ``(status, dataset)`` pairs.

    Errors found before any sub-operation (not authorised, bad identifier) can only reach the requestor as
    pynetdicom's answer to a first ``(status, None)``, which comes after it has associated with the destination
    (pynetdicom answers 0xA801 instead when that fails): that association carries nothing, and proposes
    Verification and the common storage classes so that any storage SCP accepts it.
    """
    rq = event.assoc.requestor
    peer_aet = rq.ae_title.strip()
    wanted = str(event.move_destination or "").strip()
    dest = destination(scp.policy.known(), wanted, scp.policy.strict_aet)  # configured and PUT over REST
    if dest is None:
        unknown = RetrieveRefused(MOVE_DESTINATION_UNKNOWN, "move destination unknown")
        _refused("C-MOVE", peer_aet, unknown, destination=wanted)
        yield None, None  # pynetdicom answers 0xA801 itself
        return
    try:
        selection, matches = _prepare(scp, event, "C-MOVE")
    except RetrieveRefused as refusal:
        _refused("C-MOVE", peer_aet, refusal, destination=dest.name)
        yield dest.host, dest.port, {"ae_title": dest.aet, "contexts": _ANY_STORAGE_SCP}
        yield 1
        yield refusal.response(), None
        return
    log.info("retrieve", service="C-MOVE", peer_aet=peer_aet, destination=dest.name, level=selection.level.name,
             instances=len(matches))  # fmt: skip
    if not matches:
        yield dest.host, dest.port
        yield 0  # success, no sub-operation
        return
    target = Target(dest.aet, dest.host, dest.port)
    conn = Connection(target, event.assoc.ae.ae_title, originator=(peer_aet, event.request.MessageID or 0))
    job = Retrieval("C-MOVE", peer_aet, dest.name, scp, conn, _converter(scp), matches)
    try:
        yield dest.host, dest.port, {"ae_title": dest.aet, "contexts": plan_contexts(matches),
                                     "evt_handlers": [(evt.EVT_CONN_OPEN, on_connect),
                                                      (evt.EVT_ESTABLISHED, job.on_established)]}  # fmt: skip
        yield len(matches)
        yield from job.sub_operations(event)
    finally:
        job.summary()


def handle_get(scp: StoreSCP, event: evt.Event) -> Iterator[Any]:
    """``EVT_C_GET``: yields the number of sub-operations, then the ``(status, dataset)`` pairs.

    A refusal is answered as pynetdicom answers a failure status yielded for the first of one sub-operation.
    """
    rq = event.assoc.requestor
    peer_aet = rq.ae_title.strip()
    try:
        selection, matches = _prepare(scp, event, "C-GET")
    except RetrieveRefused as refusal:
        _refused("C-GET", peer_aet, refusal)
        yield 1
        yield refusal.response(), None
        return
    log.info("retrieve", service="C-GET", peer_aet=peer_aet, level=selection.level.name, instances=len(matches))
    if not matches:
        yield 0
        return
    conn = Connection(Target(peer_aet, rq.address, rq.port), event.assoc.ae.ae_title)
    job = Retrieval("C-GET", peer_aet, peer_aet, scp, conn, _converter(scp), matches)
    job.attach(event.assoc, acceptor=True)
    try:
        yield len(matches)
        yield from job.sub_operations(event)
    finally:
        job.detach(event.assoc)
        job.summary()
