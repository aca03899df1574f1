"""``POST /instances/{id}/anonymize`` and ``/modify``: the edited file is the answer; nothing is stored.

Orthanc's semantics (spec §4.1): one request is one UID map, every anonymization takes a new
``Anonymized<N>`` from the index-wide counter, ``/modify`` picks its level from what the body replaces (edge
case 72), and a lossy ``Transcode`` gives the result a new SOPInstanceUID (edge case 48). Bodies are JSON
whatever the Content-Type says (``curl -d`` sends form-encoded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydicom.uid import generate_uid

from node.archive.pseudonyms import NameCounter
from node.archive.store import Archive, _sql
from node.dicom import fileio
from node.dicom.apply import apply
from node.dicom.request import parse_anonymize, parse_modify
from node.dicom.transcode import transcode
from node.dicom.uidmap import MemoryUidMap
from node.rest.body import parse_json
from node.rest.errors import unknown_resource

router = APIRouter()


def file_of(archive: Archive, public_id: str) -> Path:
    """The stored file of an instance (404 if unknown): one indexed SELECT on this thread's connection."""
    db = archive.db
    db.connect(reuse_if_open=True)
    row = db.execute_sql(_sql(db, 'SELECT file_uuid FROM "instance" WHERE public_id = ?'), (public_id,)).fetchone()
    if row is None:
        raise unknown_resource(f"no instance with ID {public_id!r}")
    return archive.storage.locate(row[0])


def _edit(archive: Archive, counter: NameCounter, public_id: str, raw: bytes, anonymize: bool) -> list[Any]:
    body = parse_json(raw)
    mod = parse_anonymize(body) if anonymize else parse_modify(body)  # RequestError: 400 naming the field
    path = file_of(archive, public_id)
    number = counter.take() if mod.needs_name_counter else None
    try:
        loaded = fileio.load(path)
    except FileNotFoundError:  # deleted (or replaced by an overwrite) since it was looked up
        raise unknown_resource(f"instance {public_id!r} was deleted meanwhile") from None
    apply(loaded.ds, mod, MemoryUidMap(), patient_name_counter=number)
    syntax = None
    if mod.transcode and mod.transcode != loaded.transfer_syntax:
        if transcode(loaded.ds, mod.transcode):  # lossy: not the same instance any more
            loaded.ds.SOPInstanceUID = generate_uid()
            loaded.ds.file_meta.MediaStorageSOPInstanceUID = loaded.ds.SOPInstanceUID
        syntax = mod.transcode
    return fileio.encode(loaded, syntax)


@router.post("/instances/{public_id}/anonymize", summary="The instance anonymized (Orthanc /anonymize body)")
async def anonymize_instance(request: Request, public_id: str) -> Response:
    return await _respond(request, public_id, True)


@router.post("/instances/{public_id}/modify", summary="The instance modified (Orthanc /modify body)")
async def modify_instance(request: Request, public_id: str) -> Response:
    return await _respond(request, public_id, False)


async def _respond(request: Request, public_id: str, anonymize: bool) -> Response:
    state = request.app.state
    chunks = await run_in_threadpool(_edit, state.archive, state.name_counter, public_id, await request.body(),
                                     anonymize)  # fmt: skip
    return Response(b"".join(chunks), media_type="application/dicom")
