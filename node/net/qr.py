"""C-ECHO, C-FIND and C-MOVE as an SCU, for the REST API's ``/modalities`` and ``/queries`` routes.

pynetdicom does the protocol; this module opens one association per request (as Orthanc does) and turns every
way it can fail into one :class:`ScuError` whose message says *what* failed: nothing listening, the peer
rejecting us (with its reason: an unknown calling AE title is the usual one), no accepted presentation
context, no answer in time, or the DIMSE status of the answer. "Association failed" alone sends an operator
to the wrong end of the cable.

C-FIND and C-MOVE use the Patient Root model at the patient level and the Study Root model otherwise, as
Orthanc does.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from node.dicom.levels import Level
from node.net.scu import Target

#: The QueryRetrieveLevel (0008,0052) value of each level.
QR_LEVEL = {Level.PATIENT: "PATIENT", Level.STUDY: "STUDY", Level.SERIES: "SERIES", Level.INSTANCE: "IMAGE"}
PENDING = frozenset({0xFF00, 0xFF01})


class ScuError(ConnectionError):
    """The remote modality could not be reached, refused us, or answered with a failure status."""


@contextmanager
def associate(target: Target, calling_aet: str, contexts: list[str], timeout: float) -> Iterator[Association]:
    """An established association proposing ``contexts`` (default transfer syntaxes), released afterwards."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class in contexts:
        ae.add_requested_context(sop_class)
    connected: list[bool] = []

    def on_open(event: evt.Event) -> None:
        connected.append(True)
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:  # Nagle would hold each small PDU for the previous one's ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    assoc = ae.associate(target.host, target.port, ae_title=target.aet, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    if not assoc.is_established:
        raise ScuError(_why(assoc, bool(connected), target, timeout))
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _why(assoc: Association, connected: bool, target: Target, timeout: float) -> str:
    if not connected:
        return f"cannot connect to {target.host}:{target.port} (nothing listening there, or unreachable)"
    rsp = getattr(assoc.acceptor, "primitive", None)
    if assoc.is_rejected and rsp is not None:
        return f"{target} rejected the association ({rsp.reason_str}; {rsp.result_str}, by the {rsp.source_str})"
    if rsp is not None and getattr(rsp, "result", None) == 0 and not assoc.accepted_contexts:
        return f"{target} accepted none of the proposed presentation contexts"
    if rsp is None:
        return f"{target} did not answer the association request within {timeout:g} s"
    return f"{target} aborted the association"


def _status(code: int | None, what: str, target: Target) -> ScuError:
    if code is None:
        return ScuError(f"{what} to {target}: no response (association aborted, or timed out)")
    return ScuError(f"{what} to {target} failed with DIMSE status 0x{code:04X}")


def echo(target: Target, calling_aet: str, timeout: float) -> None:
    with associate(target, calling_aet, [Verification], timeout) as assoc:
        status = assoc.send_c_echo()
    code = getattr(status, "Status", None)
    if code != 0:
        raise _status(code, "C-ECHO", target)


def _model(level: Level, find: bool) -> str:
    if level == Level.PATIENT:
        return PatientRootQueryRetrieveInformationModelFind if find else PatientRootQueryRetrieveInformationModelMove
    return StudyRootQueryRetrieveInformationModelFind if find else StudyRootQueryRetrieveInformationModelMove


def find(target: Target, calling_aet: str, level: Level, query: Dataset, timeout: float) -> list[Dataset]:
    """C-FIND ``query`` (its QueryRetrieveLevel is set here); the answers' identifiers."""
    query.QueryRetrieveLevel = QR_LEVEL[level]
    model = _model(level, find=True)
    answers = []
    with associate(target, calling_aet, [model], timeout) as assoc:
        code = None
        for status, identifier in assoc.send_c_find(query, model):
            code = getattr(status, "Status", None)
            if code in PENDING and identifier is not None:
                answers.append(identifier)
    if code != 0:
        raise _status(code, "C-FIND", target)
    return answers


@dataclass
class MoveReport:
    completed: int = 0
    failed: int = 0
    warning: int = 0


def move(target: Target, calling_aet: str, move_aet: str, level: Level, identifiers: list[Dataset], timeout: float,
         on_response: Callable[[int, int], None] | None = None) -> MoveReport:  # fmt: skip
    """C-MOVE each identifier to ``move_aet`` over one association; raises on the first failure."""
    model = _model(level, find=False)
    report = MoveReport()
    with associate(target, calling_aet, [model], timeout) as assoc:
        for i, identifier in enumerate(identifiers):
            identifier.QueryRetrieveLevel = QR_LEVEL[level]
            code, last = None, None
            for status, _ in assoc.send_c_move(identifier, move_aet, model):
                code, last = getattr(status, "Status", None), status
                if on_response is not None:
                    on_response(i, len(identifiers))
            done = int(getattr(last, "NumberOfCompletedSuboperations", 0) or 0)
            failed = int(getattr(last, "NumberOfFailedSuboperations", 0) or 0)
            report.completed += done
            report.failed += failed
            report.warning += int(getattr(last, "NumberOfWarningSuboperations", 0) or 0)
            if code != 0:
                detail = f" ({failed} sub-operations failed, {done} completed)" if failed else ""
                if code == 0xA801:
                    detail = f" (move destination {move_aet!r} unknown to {target.aet})"
                raise ScuError(f"{_status(code, 'C-MOVE', target)}{detail}")
    return report
