"""The C-FIND SCP (Query/Retrieve, Patient Root and Study Root): pynetdicom's ``EVT_C_FIND`` handler.

The identifier is parsed by :mod:`node.net.find_query` and run by :func:`node.archive.find.find`, the same
matcher ``POST /tools/find`` uses, so DICOM and REST clients get the same resources for the same query.
Matches stream out one pending response (0xFF00) each as the index yields them: a viewer sees the first
studies at once and a C-CANCEL stops the search between two answers.

Statuses (Orthanc 1.10's where it has one; checked against its ``FindScp.cpp``):

* ``0xFF00`` per match, then ``0x0000``;
* ``0xFE00`` after ``LimitFindResults`` (patients, studies, series) or ``LimitFindInstances`` answers when more
  matched, as Orthanc ("matching terminated"), and after a C-CANCEL;
* ``0xC000`` for an identifier we cannot run (no level, a wildcard on a UID…), with an ErrorComment saying why;
* ``0x0124`` (Refused: Not Authorized) when the calling AE may not query: Orthanc aborts the association
  instead, which tells the peer nothing and loses its other operations;
* ``0xA700`` when the index fails or stays locked: the query may be retried, nothing crashes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from peewee import Model, PeeweeException
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import evt

from node import logs
from node.archive import children
from node.archive.db import reset_if_broken
from node.archive.find import find, inherited_tags
from node.archive.store import Archive, elapsed_ms
from node.dicom.errors import RequestError
from node.dicom.levels import Level
from node.net.find_query import SPECIFIC_CHARACTER_SET, FindQuery, build_answer, file_matches, parse_identifier

if TYPE_CHECKING:
    from node.net.scp import StoreSCP

log = logs.get("dicom-node.find")

PENDING = 0xFF00
CANCEL = 0xFE00
REFUSED_NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
UNABLE_TO_PROCESS = 0xC000

Response = tuple[int | Dataset, Dataset | None]


def failure(code: int, comment: str) -> Dataset:
    """A status dataset with an ErrorComment (LO: 64 characters at most)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def limit_for(values: dict[str, Any], level: Level) -> int:
    """Orthanc's ``LimitFindInstances`` at the instance level, ``LimitFindResults`` above (0: no limit)."""
    value = values.get("LimitFindInstances" if level is Level.INSTANCE else "LimitFindResults", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def read_header(archive: Archive, level: Level, row: Model, query: FindQuery) -> Dataset | None:
    """The tags ``query`` needs from the file of the resource's first instance, decoded; ``None`` when it has
    no instance left or its file cannot be read (its keys are then answered empty, and logged)."""
    instance = children.representative(level, row)
    if instance is None:
        return None
    path = archive.storage.locate(instance.file_uuid)
    try:
        header = dcmread(path, stop_before_pixels=True, force=True,
                         specific_tags=[SPECIFIC_CHARACTER_SET, *query.file_tags])  # fmt: skip
        header.decode()
    except Exception as exc:  # noqa: BLE001 - a damaged file costs its keys, not the whole query
        log.warning("cannot read a stored file for C-FIND return keys", instance=instance.public_id, error=str(exc))
        return None
    return header


def matches(archive: Archive, query: FindQuery) -> Iterator[tuple[Model, Dataset | None]]:
    """The matching rows in index order, each with its first instance's header when the query needs one."""
    for row in find(archive.db, query.level, query.index_constraints):
        header = read_header(archive, query.level, row, query) if query.reads_files else None
        if file_matches(query, header):
            yield row, header


def answer(query: FindQuery, row: Model, header: Dataset | None, retrieve_aet: str) -> Dataset:
    wanted = query.computed
    counters = children.computed(query.level, row, wanted) if wanted else {}
    return build_answer(query, index_tags=inherited_tags(row), computed=counters, header=header,
                        retrieve_aet=retrieve_aet)  # fmt: skip


def handle_find(scp: StoreSCP, event: evt.Event) -> Iterator[Response]:
    """pynetdicom's C-FIND handler protocol: ``(status, identifier)`` pairs, pending ones first."""
    t0 = time.perf_counter()
    rq = event.assoc.requestor
    peer = {"peer_aet": rq.ae_title, "peer": f"{rq.address}:{rq.port}"}
    if not scp.policy.may_find(rq.ae_title, rq.address):
        log.warning("find refused", reason="calling AE title is not allowed to query", **peer)
        yield failure(REFUSED_NOT_AUTHORIZED, "calling AE title is not allowed to query (C-FIND)"), None
        return
    try:
        query = parse_identifier(event.identifier, case_sensitive_pn=bool(scp.cfg["CaseSensitivePN"]))
    except RequestError as exc:  # MalformedQuery and the matching parser's refusals
        log.warning("find refused", reason="malformed identifier", error=str(exc), **peer)
        yield failure(UNABLE_TO_PROCESS, str(exc)), None
        return
    except Exception as exc:  # noqa: BLE001 - pydicom could not decode the identifier at all
        log.warning("find refused", reason="undecodable identifier", error=repr(exc), **peer)
        yield failure(UNABLE_TO_PROCESS, f"cannot decode the identifier: {type(exc).__name__}"), None
        return
    limit = limit_for(scp.cfg.values, query.level)
    aet = str(scp.cfg["DicomAet"])
    sent, outcome = 0, "success"
    try:
        scp.archive.db.connect(reuse_if_open=True)
        for row, header in matches(scp.archive, query):
            if event.is_cancelled:
                outcome = "cancelled"
                yield CANCEL, None
                return
            if limit and sent >= limit:
                outcome = "limited"
                yield CANCEL, None
                return
            identifier = answer(query, row, header, aet)
            yield PENDING, identifier
            sent += 1
    except PeeweeException as exc:
        outcome = "index failure"
        log.error("index failure during C-FIND", error=str(exc), **peer)
        reset_if_broken(scp.archive.db)
        yield failure(OUT_OF_RESOURCES, "the index is busy or failed; try again"), None
    except Exception as exc:  # a bug costs this query, not the association
        outcome = "error"
        log.exception("C-FIND handler error", **peer)
        yield failure(UNABLE_TO_PROCESS, f"internal error: {type(exc).__name__}"), None
    finally:
        log.info("find", qr_level=query.level.name, keys=query.matching_keywords, answers=sent, outcome=outcome,
                 limit=limit or None, ms=elapsed_ms(t0), **peer)  # fmt: skip
