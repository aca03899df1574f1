"""What is *inside* the stored files, in Orthanc 1.10's shapes: an instance's tags (full, ``?simplify``, ``?short``),
the tags shared by a resource's instances, raw content browsing, per-resource statistics and ZIP archives.

Archives are streamed: the ZIP is written into a small in-memory sink that the response drains after every
chunk of every file (ZIP64 when a file needs it), so a study of any size costs a few MB of memory and starts
downloading at once. The folder names follow Orthanc (``PatientID PatientName/AccessionNumber
StudyDescription/Modality SeriesDescription/CT000000.dcm``, Orthanc's ``HierarchicalZipWriter`` filtering), and
go further: no component is ever ``.``, ``..`` or empty, nor longer than :data:`MAX_NAME`, whatever the DICOM
values are — the names are the only part of a download a hostile sender controls.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from peewee import Model

from node.archive.models import Instance
from node.archive.store import Archive
from node.dicom import dicomjson
from node.dicom.browse import NotFound, Value, browse
from node.logs import get as get_logger
from node.rest.errors import RestError, bad_request, unknown_resource
from node.rest.resources import LEVELS, _children, _get, _parent

router = APIRouter()
log = get_logger("dicom-node.rest")

MEGA = 1024 * 1024
MAX_NAME = 64  # longest folder or file name in an archive
_CHUNK = 1024 * 1024


def _archive(request: Request) -> Archive:
    return request.app.state.archive  # type: ignore[no-any-return]


def _format(request: Request) -> str:
    """Orthanc's ``GetDicomFormat``: ``?simplify`` wins over ``?short``, whatever their values."""
    query = request.query_params
    if "simplify" in query:
        return dicomjson.SIMPLIFY
    if "short" in query:
        return dicomjson.SHORT
    return dicomjson.FULL


def _file_of(archive: Archive, row: Instance) -> Path:
    return archive.storage.locate(row.file_uuid)  # a storage uuid, never a DICOM value


def _full(path: Path, public_id: str, sequences: bool = True) -> dict[str, Any]:
    try:
        ds = dicomjson.read(path)
    except FileNotFoundError:
        raise RestError(500, 13, "Inexistent file", f"the file of instance {public_id} is missing") from None
    except Exception as exc:  # noqa: BLE001 - pydicom's errors are many: all mean an unreadable file
        raise RestError(500, 15, "Bad file format", f"instance {public_id}: {type(exc).__name__}: {exc}") from None
    return dicomjson.to_full(ds, sequences=sequences)


# -- tags ------------------------------------------------------------------------------------------------------


def _instance_tags(request: Request, public_id: str, fmt: str) -> dict[str, Any]:
    archive = _archive(request)
    with archive.db.connection_context():
        row = _get(Instance, public_id, "instances")
    return dicomjson.simplify(_full(_file_of(archive, row), public_id), fmt)


@router.get("/instances/{public_id}/tags", summary="The instance's DICOM tags (?simplify, ?short)")
def instance_tags(request: Request, public_id: str) -> dict[str, Any]:
    return _instance_tags(request, public_id, _format(request))


@router.get("/instances/{public_id}/simplified-tags", summary="The instance's DICOM tags, keyed by name")
def instance_simplified_tags(request: Request, public_id: str) -> dict[str, Any]:
    return _instance_tags(request, public_id, dicomjson.SIMPLIFY)


def _instances_of(request: Request, level: str, public_id: str) -> list[tuple[str, Path]]:
    archive = _archive(request)
    with archive.db.connection_context():
        row = _get(LEVELS[level], public_id, level)
        rows = [row] if level == "instances" else _children(level, row, "instances")
        return [(r.public_id, _file_of(archive, r)) for r in rows]


def _register_tags(level: str) -> None:
    def shared_tags(request: Request, public_id: str) -> dict[str, Any]:
        fmt = _format(request)
        files = _instances_of(request, level, public_id)
        fulls = (_full(path, iid, sequences=False) for iid, path in files)
        return dicomjson.simplify(dicomjson.shared(fulls), fmt)

    def instances_tags(request: Request, public_id: str) -> dict[str, Any]:
        fmt = _format(request)
        files = _instances_of(request, level, public_id)
        return {iid: dicomjson.simplify(_full(path, iid), fmt) for iid, path in files}

    router.add_api_route(f"/{level}/{{public_id}}/shared-tags", shared_tags, methods=["GET"],
                         summary=f"The tags with the same value in every instance of one of the {level}")  # fmt: skip
    router.add_api_route(f"/{level}/{{public_id}}/instances-tags", instances_tags, methods=["GET"],
                         summary=f"The tags of every instance of one of the {level}, by instance ID")  # fmt: skip


for _level in ("patients", "studies", "series"):
    _register_tags(_level)


# -- raw content -----------------------------------------------------------------------------------------------


def _file_range(path: str, offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left > 0:
            chunk = fh.read(min(left, 64 * 1024))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


def _content(request: Request, public_id: str, path: str) -> Response:
    archive = _archive(request)
    with archive.db.connection_context():
        row = _get(Instance, public_id, "instances")
    parts = [p for p in path.split("/") if p]
    try:
        found = browse(_file_of(archive, row), parts)
    except NotFound as exc:
        raise unknown_resource(f"instance {public_id} has no content /{'/'.join(parts)}: {exc}") from None
    except FileNotFoundError:
        raise RestError(500, 13, "Inexistent file", f"the file of instance {public_id} is missing") from None
    if isinstance(found, list):
        return JSONResponse(found)
    assert isinstance(found, Value)
    if found.data is not None:
        return Response(found.data, media_type="application/octet-stream")
    return StreamingResponse(_file_range(found.path, found.offset, found.length), media_type="application/octet-stream",
                             headers={"Content-Length": str(found.length)})  # fmt: skip


@router.get("/instances/{public_id}/content", summary="The instance's top-level tags, as gggg-eeee")
def instance_content_root(request: Request, public_id: str) -> Response:
    return _content(request, public_id, "")


@router.get("/instances/{public_id}/content/{path:path}",
            summary="Raw content: a tag's value, a sequence's item indexes, an item's tags")  # fmt: skip
def instance_content(request: Request, public_id: str, path: str) -> Response:
    return _content(request, public_id, path)


# -- statistics ------------------------------------------------------------------------------------------------


def _statistics(request: Request, level: str, public_id: str) -> dict[str, Any]:
    with _archive(request).db.connection_context():
        row = _get(LEVELS[level], public_id, level)
        instances = [row] if level == "instances" else _children(level, row, "instances")
        size = sum(int(i.file_size or 0) for i in instances)
        out: dict[str, Any] = {}
        if level == "patients":
            out["CountStudies"] = len(_children(level, row, "studies"))
        if level in ("patients", "studies"):
            out["CountSeries"] = len(_children(level, row, "series"))
        if level != "instances":
            out["CountInstances"] = len(instances)
    # Only the DICOM file is stored per instance: every size is its size (no compression, no JSON attachment).
    for key in ("DiskSize", "UncompressedSize", "DicomDiskSize", "DicomUncompressedSize"):
        out[key] = str(size)
        out[key + "MB"] = size // MEGA
    return out


def _register_statistics(level: str) -> None:
    def statistics(request: Request, public_id: str) -> dict[str, Any]:
        return _statistics(request, level, public_id)

    router.add_api_route(f"/{level}/{{public_id}}/statistics", statistics, methods=["GET"],
                         summary=f"Counts and sizes of one of the {level}")  # fmt: skip


for _level in LEVELS:
    _register_statistics(_level)


# -- archives --------------------------------------------------------------------------------------------------

_SPACES = " \t\n\v\f\r"


def _keep_alphanumeric(text: str) -> str:
    """Orthanc's ``HierarchicalZipWriter::Index::KeepAlphanumeric``: ``^`` is a space, runs of spaces are one,
    only ASCII letters, digits, ``.`` and ``_`` stay."""
    out: list[str] = []
    last_space = False
    for c in text:
        if c == "^":
            c = " "
        if c in _SPACES:
            if not last_space:
                out.append(" ")
                last_space = True
        elif c.isascii() and (c.isalnum() or c in "._"):
            out.append(c)
            last_space = False
    return "".join(out).strip(" ")


def zip_name(text: str, fallback: str) -> str:
    """One folder or file name of an archive: Orthanc's filtering, then never ``..``, a leading or trailing dot,
    nothing empty, at most :data:`MAX_NAME` characters (so no path can leave the folder it is unzipped in)."""
    name = re.sub(r"\.{2,}", ".", _keep_alphanumeric(text)).strip(". ")
    name = name[:MAX_NAME].rstrip(". ")
    return name or fallback


def _ascii(text: str) -> str:
    """Orthanc's ``StripSpaces(ConvertToAscii(...))``: printable ASCII only."""
    return "".join(c for c in text if 32 <= ord(c) < 127).strip(" ")


@dataclass(frozen=True, slots=True)
class ZipEntry:
    name: str
    path: Path
    size: int


class _Names:
    """Unique names per folder, as Orthanc's ``EnsureUniqueFilename``: ``x``, ``x-2``, ``x-3``…"""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], int] = {}

    def unique(self, folder: str, name: str) -> str:
        count = self.seen.get((folder, name), 0) + 1
        self.seen[(folder, name)] = count
        return name if count == 1 else f"{name}-{count}"


def _tags(row: Model) -> dict[str, str]:
    return json.loads(row.main_tags)  # type: ignore[no-any-return]


def _folder(level: str, tags: dict[str, str]) -> str:
    first, second = {"Patient": ("PatientID", "PatientName"), "Study": ("AccessionNumber", "StudyDescription"),
                     "Series": ("Modality", "SeriesDescription")}[level]  # fmt: skip
    path = _ascii(f"{tags.get(first, '')} {tags.get(second, '')}") or f"Unknown {level}"
    return zip_name(path, f"Unknown {level}")


def _file_format(modality: str) -> str:
    """Orthanc's instance names: the first two letters of the modality (upper case) and a counter, ``CT000000``."""
    prefix = "".join(c.upper() for c in modality[:2])
    return prefix + "{:0" + str(8 - len(prefix)) + "d}.dcm"


def archive_entries(archive: Archive, level: str, public_id: str) -> list[ZipEntry]:
    """Every file of a resource with its path in the archive (the patient is always the top folder)."""
    names = _Names()
    out: list[ZipEntry] = []
    with archive.db.connection_context():
        row = _get(LEVELS[level], public_id, level)
        patient = row if level == "patients" else _parent(row, "patients")
        if level == "patients":
            studies = sorted(_children("patients", row, "studies"), key=lambda r: r.public_id)
        else:
            studies = [row if level == "studies" else _parent(row, "studies")]
        p_dir = names.unique("", _folder("Patient", _tags(patient)))
        for study in studies:
            s_dir = p_dir + "/" + names.unique(p_dir, _folder("Study", _tags(study)))
            if level in ("patients", "studies"):
                series_rows = sorted(_children("studies", study, "series"), key=lambda r: r.public_id)
            else:
                series_rows = [row if level == "series" else _parent(row, "series")]
            for series in series_rows:
                tags = _tags(series)
                se_dir = s_dir + "/" + names.unique(s_dir, _folder("Series", tags))
                pattern = _file_format(tags.get("Modality", ""))
                instances = [row] if level == "instances" else _children("series", series, "instances")
                for i, inst in enumerate(instances):
                    name = names.unique(se_dir, zip_name(pattern.format(i), f"{i:08d}.dcm"))
                    out.append(ZipEntry(f"{se_dir}/{name}", _file_of(archive, inst), int(inst.file_size or 0)))
    return out


class _Sink:
    """Where zipfile writes: not seekable (so it streams, with data descriptors), drained by the response."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


def zip_stream(entries: list[ZipEntry]) -> Iterator[bytes]:
    """The ZIP of ``entries``, produced while it is sent: memory holds about one chunk of one file."""
    sink = _Sink()
    stamp = dt.datetime.now().timetuple()[:6]
    target = cast(IO[bytes], sink)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as zf:
        for entry in entries:
            try:
                fh = open(entry.path, "rb")  # noqa: SIM115 - closed below, around the yields
            except FileNotFoundError:
                log.error("archive: a file is missing, left out", file=str(entry.path), name=entry.name)
                continue
            info = zipfile.ZipInfo(entry.name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.file_size = entry.size
            with fh, zf.open(info, "w", force_zip64=entry.size * 1.05 >= zipfile.ZIP64_LIMIT) as out:
                while chunk := fh.read(_CHUNK):
                    out.write(chunk)
                    data = sink.drain()
                    if data:
                        yield data
            data = sink.drain()
            if data:
                yield data
    yield sink.drain()  # the central directory


def _zip_response(entries: list[ZipEntry], public_id: str) -> StreamingResponse:
    return StreamingResponse(zip_stream(entries), media_type="application/zip",
                             headers={"Content-Disposition": f'filename="{public_id}.zip"'})  # fmt: skip


def _register_archive(level: str) -> None:
    def get_archive(request: Request, public_id: str) -> StreamingResponse:
        return _zip_response(archive_entries(_archive(request), level, public_id), public_id)

    async def post_archive(request: Request, public_id: str) -> StreamingResponse:
        body = (await request.body()).strip()
        options: Any = {}
        if body:
            try:
                options = json.loads(body)
            except ValueError:
                raise bad_request("the body must be a JSON object (or empty)") from None
        if not isinstance(options, dict):
            raise bad_request("the body must be a JSON object (or empty)")
        if options.get("Asynchronous") is True or options.get("Synchronous") is False:
            raise bad_request("asynchronous archive jobs are not supported: the archive is streamed as the answer")
        if "Transcode" in options:
            raise bad_request("'Transcode' is not supported for archives: files are sent as stored")
        entries = await run_in_threadpool(archive_entries, _archive(request), level, public_id)
        return _zip_response(entries, public_id)

    router.add_api_route(f"/{level}/{{public_id}}/archive", get_archive, methods=["GET"],
                         summary=f"A ZIP of the files of one of the {level}, streamed")  # fmt: skip
    router.add_api_route(f"/{level}/{{public_id}}/archive", post_archive, methods=["POST"],
                         summary=f"A ZIP of the files of one of the {level}, streamed (synchronous only)")  # fmt: skip


for _level in LEVELS:
    _register_archive(_level)
