"""``POST /instances``: store uploaded DICOM files, as the C-STORE receiver does (same durability, same
``OverwriteInstances``, same routing rules), and answer Orthanc's ``{"ID", "Path", "Status", "Parent…"}``.

Three kinds of body, told apart by their content rather than by a Content-Type clients often get wrong:

- a DICOM file: one answer object, as before;
- a ZIP archive (starts with ``PK``, as Orthanc's ``ZipReader::IsZipMemoryBuffer``): every member that is a DICOM
  instance is stored, and the answer is the array of their answers. Members that are not DICOM, and DICOM files
  without the study/series/SOP UIDs (a DICOMDIR), are left out as Orthanc leaves them out; a member that looks
  like DICOM but cannot be stored (truncated, an empty UID, a damaged entry) gets ``{"Status": "Failure",
  "Details": …}`` and the others are stored all the same (Orthanc logs unparsable members and aborts the whole
  upload on other errors: the client never learns which file was not stored);
- ``multipart/form-data`` (``curl -F file=@a.dcm -F file=@b.dcm``, HTML forms): each file part is one of the
  above. One part answers as that part would alone; several answer one array (Orthanc stores the parts too,
  but answers an empty body).

Nothing is ever held in memory whole: the body is streamed into a spool file of the storage area, ZIP members are
extracted chunk by chunk into spool files of their own, multipart parts are split while they arrive. No name
from the request (member or part file name) is ever used as a path. A ZIP is checked before anything is
extracted: too many members, too much declared data, or a compression ratio no DICOM file has (a zip bomb)
refuse the whole archive with 400 and nothing stored; extraction never goes beyond the declared sizes.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable
from email.message import Message
from email.parser import HeaderParser
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from peewee import PeeweeException
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError

from node.archive.storage import SpoolFile, is_disk_error
from node.archive.store import Archive, Origin, store
from node.dicom.maintags import IndexTags, MalformedDataset, read_index_tags
from node.logs import get as get_logger
from node.rest.errors import RestError, bad_request
from node.routing import rules

router = APIRouter()
log = get_logger("dicom-node.rest")

ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
ZIP_MAX_MEMBERS = 100_000
ZIP_MAX_TOTAL = 64 * 1024**3  # bytes of declared (uncompressed) content per archive
#: Uncompressed / compressed beyond which a large archive or member is a bomb. A blank image deflates ~1000:1,
#: so the ratio only counts above :data:`ZIP_RATIO_FLOOR`: small members cannot hurt whatever their ratio.
ZIP_MAX_RATIO = 200
ZIP_RATIO_FLOOR = 64 * 1024**2
_CHUNK = 1024 * 1024
_MAX_PART_HEADERS = 16 * 1024
#: Each file part keeps its spool file open until it is stored: a bound on the descriptors one request holds.
MAX_FILE_PARTS = 256


def _storage_full(spool: SpoolFile) -> RestError:
    assert spool.error is not None
    return RestError(507, 2019, "Storage full", f"storage write failed: {spool.error.strerror}")


def _read_tags(routes: Any, spool: SpoolFile, origin: Origin) -> tuple[IndexTags, Any]:
    """The index tags and routing deliveries of a spooled file (``MalformedDataset`` if it cannot be stored)."""
    tags = read_index_tags(spool.name)
    deliveries = rules.deliveries_for_file(routes, spool.name, rules.Origin(remote_host=origin.remote_ip))
    return tags, deliveries


def _commit(archive: Archive, spool: SpoolFile, tags: IndexTags, deliveries: Any, origin: Origin) -> dict[str, Any]:
    try:
        archive.db.connect(reuse_if_open=True)
        result = store(archive, spool, tags, origin, deliveries)
    except OSError as exc:
        if is_disk_error(exc):
            raise RestError(507, 2019, "Storage full", f"storage failure: {exc.strerror}") from None
        raise RestError(500, 2018, "Cannot store an instance", f"storage failure: {exc}") from None
    except PeeweeException as exc:
        log.error("index failure", error=str(exc))
        raise RestError(500, 2018, "Cannot store an instance", "database failure") from None
    ids = result.ids
    log.info("stored", sop_instance_uid=tags.sop_uid, status=result.status, instance=ids.instance,
             series=ids.series, study=ids.study, patient=ids.patient, bytes=result.size, origin="RestApi",
             peer=origin.remote_ip)  # fmt: skip
    return {"ID": ids.instance, "ParentPatient": ids.patient, "ParentSeries": ids.series, "ParentStudy": ids.study,
            "Path": f"/instances/{ids.instance}", "Status": result.status}  # fmt: skip


def _store(archive: Archive, routes: Any, spool: SpoolFile, origin: Origin) -> dict[str, Any]:
    """One DICOM file: its answer, or a ``RestError`` (400 when it is not a storable instance)."""
    try:
        tags, deliveries = _read_tags(routes, spool, origin)
    except MalformedDataset as exc:
        raise RestError(400, 15, "Bad file format", f"not a storable DICOM instance: {exc}") from None
    return _commit(archive, spool, tags, deliveries, origin)


def _head(path: str, size: int = 132) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(size)


def _looks_like_dicom(head: bytes) -> bool:
    """A Part-10 file (``DICM`` at 128), or a bare dataset starting with a low group (0002 or 0008)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    return int.from_bytes(head[:2], "little") in (2, 8) or int.from_bytes(head[:2], "big") in (2, 8)


def _failure(details: str) -> dict[str, Any]:
    return {"Details": details, "Status": "Failure"}


def _member(archive: Archive, routes: Any, spool: SpoolFile, origin: Origin, name: str) -> dict[str, Any] | None:
    """The answer for one extracted ZIP member, or None when it is left out (not DICOM, or a DICOMDIR)."""
    if not _looks_like_dicom(_head(spool.name)):
        log.info("zip upload: not a DICOM file, left out", member=name)
        return None
    try:
        tags, deliveries = _read_tags(routes, spool, origin)
    except MalformedDataset as exc:
        if str(exc).startswith("missing "):  # no study/series/SOP UID: a DICOMDIR (Orthanc's InexistentTag)
            log.info("zip upload: no instance UIDs (a DICOMDIR?), left out", member=name)
            return None
        return _failure(f"{name!r}: not a storable DICOM instance: {exc}")
    try:
        return _commit(archive, spool, tags, deliveries, origin)
    except RestError as exc:
        if exc.http_status == 507:
            raise  # the storage is full: the next members would fail too
        return _failure(f"{name!r}: {exc.details or exc.orthanc_error}")


def _check_zip(infos: list[zipfile.ZipInfo], archive_size: int) -> None:
    """Refuse an archive whose declared content is too large or compressed beyond any real DICOM data."""
    if len(infos) > ZIP_MAX_MEMBERS:
        raise bad_request(f"ZIP archive refused: {len(infos)} members (at most {ZIP_MAX_MEMBERS})")
    total = sum(i.file_size for i in infos)
    if total > ZIP_MAX_TOTAL:
        raise bad_request(f"ZIP archive refused: it declares {total} bytes of content (at most {ZIP_MAX_TOTAL})")
    if total > ZIP_RATIO_FLOOR and total > ZIP_MAX_RATIO * max(archive_size, 1):
        raise bad_request(f"ZIP archive refused as a zip bomb: {total} bytes declared in {archive_size} "
                          f"(more than {ZIP_MAX_RATIO}:1)")  # fmt: skip
    for i in infos:
        if i.file_size > ZIP_RATIO_FLOOR and i.file_size > ZIP_MAX_RATIO * max(i.compress_size, 1):
            raise bad_request(f"ZIP archive refused as a zip bomb: member {i.filename!r} declares {i.file_size} "
                              f"bytes in {i.compress_size} (more than {ZIP_MAX_RATIO}:1)")  # fmt: skip


def _ingest_zip(archive: Archive, routes: Any, body: SpoolFile, origin: Origin) -> list[dict[str, Any]]:
    try:
        zf = zipfile.ZipFile(body.name)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise bad_request(f"the body starts like a ZIP archive but is not a readable one: {exc}") from None
    answers: list[dict[str, Any]] = []
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir() and i.file_size > 0]
        _check_zip(infos, body.size)
        for info in infos:
            spool = archive.storage.new_spool()
            try:
                try:
                    with zf.open(info) as src:  # reads at most the declared size, checks the CRC at the end
                        while chunk := src.read(_CHUNK):
                            spool.write(chunk)
                except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError, ValueError) as exc:
                    answers.append(_failure(f"{info.filename!r}: cannot be extracted: {exc}"))
                    continue
                if spool.error is not None:
                    raise _storage_full(spool)
                answer = _member(archive, routes, spool, origin, info.filename)
                if answer is not None:
                    answers.append(answer)
            finally:
                spool.close()
                if not spool.committed:
                    archive.storage.discard_spool(spool.uuid)
    return answers


def _ingest(archive: Archive, routes: Any, spool: SpoolFile, origin: Origin) -> dict[str, Any] | list[dict[str, Any]]:
    """One spooled body (or part): a ZIP archive's answers, or one file's answer."""
    if spool.size == 0:
        raise bad_request("empty body: send the DICOM file (or a ZIP of DICOM files) as the request body")
    if _head(spool.name, 4) in ZIP_SIGNATURES:
        return _ingest_zip(archive, routes, spool, origin)
    return _store(archive, routes, spool, origin)


# -- multipart/form-data ---------------------------------------------------------------------------------------


class MultipartError(ValueError):
    """A multipart body that cannot be split into its parts."""


class MultipartSplitter:
    """Splits a ``multipart/form-data`` stream while it arrives (python-multipart's streaming parser): each file
    part goes to its own sink.

    ``open_part(headers)`` gets a part's headers and returns where its content goes (or None to drop a plain
    form field). Only the part headers are ever buffered.
    """

    def __init__(self, boundary: str, open_part: Callable[[Message], SpoolFile | None]) -> None:
        self.open_part = open_part
        self.sink: SpoolFile | None = None
        self.done = False
        self._headers: list[str] = []
        self._field = self._value = b""
        self._delimiter = b"--" + boundary.encode("latin-1")
        self._preamble: bytes | None = b""  # RFC 2046 allows text before the first boundary; the parser does not

        def header_field(data: bytes, start: int, end: int) -> None:
            self._field += data[start:end]

        def header_value(data: bytes, start: int, end: int) -> None:
            self._value += data[start:end]

        def header_end() -> None:
            self._headers.append(f"{self._field.decode('latin-1')}: {self._value.decode('latin-1')}")
            self._field = self._value = b""

        def headers_finished() -> None:
            self.sink = self.open_part(HeaderParser().parsestr("\r\n".join(self._headers)))
            self._headers = []

        def part_data(data: bytes, start: int, end: int) -> None:
            if self.sink is not None:
                self.sink.write(data[start:end])

        def part_end() -> None:
            self.sink = None

        def end() -> None:
            self.done = True

        callbacks = {"on_header_field": header_field, "on_header_value": header_value, "on_header_end": header_end,
                     "on_headers_finished": headers_finished, "on_part_data": part_data, "on_part_end": part_end,
                     "on_end": end}  # fmt: skip
        self._parser = MultipartParser(boundary, callbacks, max_header_size=_MAX_PART_HEADERS)  # type: ignore[arg-type]

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        if self._preamble is not None:
            self._preamble += data
            i = self._preamble.find(self._delimiter)
            if i < 0:
                if len(self._preamble) > _MAX_PART_HEADERS:
                    raise MultipartError(f"no boundary in the first {_MAX_PART_HEADERS} bytes")
                return
            data, self._preamble = self._preamble[i:], None
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise MultipartError(str(exc)) from None


def form_boundary(content_type: str) -> str | None:
    """The boundary of a ``multipart/form-data`` Content-Type, else None."""
    msg = Message()
    msg["content-type"] = content_type
    if msg.get_content_type() != "multipart/form-data":
        return None
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise bad_request("multipart/form-data without a boundary")
    return boundary


async def _upload_multipart(request: Request, archive: Archive, boundary: str, origin: Origin) -> Any:
    spools: list[SpoolFile] = []

    def open_part(headers: Message) -> SpoolFile | None:
        if headers.get_param("filename", header="content-disposition") is None:
            return None  # a plain form field, not a file
        if len(spools) >= MAX_FILE_PARTS:
            raise MultipartError(f"more than {MAX_FILE_PARTS} file parts (send a ZIP instead)")
        spool = archive.storage.new_spool()
        spools.append(spool)
        return spool

    splitter = MultipartSplitter(boundary, open_part)
    try:
        try:
            async for chunk in request.stream():
                splitter.feed(chunk)
        except MultipartError as exc:
            raise bad_request(f"malformed multipart body: {exc}") from None
        if not splitter.done:
            raise bad_request("malformed multipart body: it ends before its closing boundary")
        for spool in spools:
            if spool.error is not None:
                raise _storage_full(spool)
        if not spools:
            raise bad_request("the multipart body has no file part (send files as curl -F file=@a.dcm)")
        routes = request.app.state.cfg.routes
        if len(spools) == 1:
            return await run_in_threadpool(_ingest, archive, routes, spools[0], origin)
        answers: list[dict[str, Any]] = []
        for spool in spools:
            try:
                answer = await run_in_threadpool(_ingest, archive, routes, spool, origin)
            except RestError as exc:
                if exc.http_status == 507:
                    raise
                answers.append(_failure(exc.details or exc.orthanc_error))
                continue
            answers.extend(answer if isinstance(answer, list) else [answer])
        return answers
    finally:
        for spool in spools:
            spool.close()
            if not spool.committed:
                archive.storage.discard_spool(spool.uuid)


@router.post("/instances", summary="Store a DICOM file, a ZIP of DICOM files, or multipart/form-data file parts")
async def upload(request: Request) -> Any:
    archive: Archive = request.app.state.archive
    host = request.client.host if request.client else ""
    origin = Origin("RestApi", "", "", host)
    boundary = form_boundary(request.headers.get("content-type", ""))
    if boundary is not None:
        return await _upload_multipart(request, archive, boundary, origin)
    spool = archive.storage.new_spool()
    try:
        async for chunk in request.stream():
            spool.write(chunk)
        if spool.error is not None:
            raise _storage_full(spool)
        return await run_in_threadpool(_ingest, archive, request.app.state.cfg.routes, spool, origin)
    finally:
        spool.close()
        if not spool.committed:
            archive.storage.discard_spool(spool.uuid)
