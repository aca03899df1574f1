"""The SCU side: C-ECHO and C-STORE of files to a remote AE (the ``echo`` and ``store`` commands).

Files are sent as they are on disk (pynetdicom's chunked send: no decode, no re-encode), over one association
that proposes exactly the (SOP class, transfer syntax) pairs of the files, so a JPEG 2000 study goes out as JPEG
2000 and memory stays flat for large files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.dicom.fileio import MEDIA_STORAGE_DIRECTORY

MAX_CONTEXTS = 128  # DICOM PS3.8: presentation context IDs are odd numbers 1..255


class TargetError(ValueError):
    """``AET@host:port`` could not be parsed."""


@dataclass(frozen=True, slots=True)
class Target:
    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def parse_target(text: str) -> Target:
    """``AET@host:port`` (IPv6 hosts in brackets: ``AET@[::1]:104``)."""
    m = re.fullmatch(r"([^@]{1,16})@(\[[^\]]+\]|[^:@]+):(\d{1,5})", text.strip())
    if not m:
        raise TargetError(f"expected AET@host:port, got {text!r}")
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise TargetError(f"port out of range in {text!r}")
    return Target(m.group(1).strip(), m.group(2).strip("[]"), port)


def _ae(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = 0
    return ae


def echo(target: Target, calling_aet: str = "DICOMNODE", timeout: float = 10) -> tuple[bool, str]:
    """C-ECHO; returns (ok, human-readable outcome)."""
    ae = _ae(calling_aet, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(target.host, target.port, ae_title=target.aet)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
        return False, f"association {why}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        return False, "no response"
    return code == 0, f"status 0x{code:04X}"


def no_reactor_reads(assoc: Association) -> None:
    """Keep pynetdicom's association reactor away from this requestor's DIMSE responses.

    The reactor thread polls the message queue for incoming requests. ``send_c_store`` "pauses" it through a
    flag the reactor sets *before* waiting, so right after one C-STORE the next may find the flag still set
    while the reactor is already resuming: the reactor then takes the next C-STORE-RSP off the queue and drops
    it, and the sender waits a whole DIMSE timeout for a response it was sent (seen here about once in a few
    hundred C-STOREs to DCMTK storescp: a 30 s stall and a duplicate after the retry). An SCU that only sends
    C-STOREs serves no incoming request, so the reactor's non-blocking reads get nothing.
    """
    dimse = assoc.dimse
    blocking_get = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return blocking_get(block=True) if block else (None, None)

    dimse.get_msg = get_msg  # type: ignore[method-assign]


class NotAnInstance(InvalidDicomError):
    """A DICOM file that is not a storable instance (a DICOMDIR)."""


@dataclass(frozen=True, slots=True)
class FileToSend:
    path: Path
    sop_class: str
    transfer_syntax: str
    raw: bool = True  # False: a dataset without file meta, read and re-encoded by pydicom to be sent


@dataclass
class StoreReport:
    sent: int = 0
    warnings: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def inspect(path: Path) -> FileToSend:
    """SOP class and transfer syntax of a file (raises ``InvalidDicomError``/``OSError``).

    A bare dataset without the Part-10 header (as some old archives hold) is accepted, as DCMTK's storescu
    does: it is decoded and sent in the encoding pydicom found.
    """
    tags = ["SOPClassUID", "SOPInstanceUID"]
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except InvalidDicomError:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags, force=True)
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise
        ts = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
        return FileToSend(path, str(ds.SOPClassUID), ts, raw=False)
    meta = ds.file_meta
    sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    ts = str(getattr(meta, "TransferSyntaxUID", ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        raise NotAnInstance("a DICOMDIR, not an instance")
    if not sop_class or not ts:
        raise InvalidDicomError("no SOP class or transfer syntax in the file meta")
    return FileToSend(path, sop_class, ts)


def _payload(f: FileToSend) -> Path | Dataset:
    if f.raw:
        return f.path
    ds = pydicom.dcmread(f.path, force=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = f.transfer_syntax
    return ds


def _batches(files: list[FileToSend]) -> Iterator[list[FileToSend]]:
    """Split files so that no association needs more than 128 presentation contexts."""
    batch: list[FileToSend] = []
    pairs: set[tuple[str, str]] = set()
    for f in files:
        pair = (f.sop_class, f.transfer_syntax)
        if pair not in pairs and len(pairs) == MAX_CONTEXTS:
            yield batch
            batch, pairs = [], set()
        pairs.add(pair)
        batch.append(f)
    if batch:
        yield batch


def store_files(
    files: list[FileToSend],
    target: Target,
    calling_aet: str = "DICOMNODE",
    timeout: float = 30,
    on_done: Callable[[FileToSend, bool, str], None] | None = None,
) -> StoreReport:
    """C-STORE every file; one association per batch of up to 128 presentation contexts."""
    report = StoreReport()
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes on disk, no decoding

    def done(f: FileToSend, ok: bool, why: str) -> None:
        if not ok:
            report.failures.append((f.path, why))
        if on_done:
            on_done(f, ok, why)

    for batch in _batches(files):
        ae = _ae(calling_aet, timeout)
        for sop_class, ts in sorted({(f.sop_class, f.transfer_syntax) for f in batch}):
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(target.host, target.port, ae_title=target.aet)
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "association failed (no connection or aborted)"
            for f in batch:
                done(f, False, why)
            continue
        no_reactor_reads(assoc)
        try:
            for f in batch:
                if not assoc.is_established:
                    done(f, False, "association lost")
                    continue
                try:
                    status = assoc.send_c_store(_payload(f))
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                    done(f, False, f"{type(exc).__name__}: {exc}")
                    continue
                code = getattr(status, "Status", None)
                if code is None:
                    done(f, False, "no response (association aborted or timed out)")
                elif code == 0:
                    report.sent += 1
                    done(f, True, "")
                elif code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
                    report.sent += 1
                    report.warnings += 1
                    done(f, True, f"warning 0x{code:04X}")
                else:
                    comment = getattr(status, "ErrorComment", "") or ""
                    done(f, False, f"status 0x{code:04X} {comment}".strip())
        finally:
            if assoc.is_established:
                assoc.release()
    return report
