"""``POST /instances/{id}/anonymize`` and ``/modify``: the edited file is the answer; nothing is stored.

Orthanc's semantics (spec §4.1): one request is one UID map, every anonymization takes a new
``Anonymized<N>`` from the index-wide counter, ``/modify`` picks its level from what the body replaces (edge
case 72), and a lossy ``Transcode`` gives the result a new SOPInstanceUID (edge case 48). Bodies are JSON
whatever the Content-Type says (``curl -d`` sends form-encoded).
"""

from __future__ import annotations

import asyncio
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from pydicom.uid import generate_uid
from starlette.types import ASGIApp, Receive, Scope, Send

from node import logs
from node.archive.db import sql_for
from node.archive.pseudonyms import NameCounter
from node.archive.store import Archive
from node.dicom import fileio
from node.dicom.apply import apply
from node.dicom.errors import RequestError
from node.dicom.fastanon import anonymize_bytes
from node.dicom.request import Modification, parse_anonymize, parse_modify
from node.dicom.transcode import transcode
from node.dicom.uidmap import MemoryUidMap
from node.rest import errors
from node.rest.body import parse_json
from node.rest.errors import RestError, unknown_resource

router = APIRouter()
log = logs.get("dicom-node.rest")


def file_of(archive: Archive, public_id: str) -> Path:
    """The stored file of an instance (404 if unknown): one indexed SELECT on this thread's connection."""
    db = archive.db
    db.connect(reuse_if_open=True)
    row = db.execute_sql(sql_for(db, 'SELECT file_uuid FROM "instance" WHERE public_id = ?'), (public_id,)).fetchone()
    if row is None:
        raise unknown_resource(f"no instance with ID {public_id!r}")
    return archive.storage.locate(row[0])


def _edit(archive: Archive, counter: NameCounter, public_id: str, raw: bytes, anonymize: bool) -> list[Any]:
    body = parse_json(raw)
    mod = parse_anonymize(body) if anonymize else parse_modify(body)  # RequestError: 400 naming the field
    path = file_of(archive, public_id)
    number = counter.take() if mod.needs_name_counter else None
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # deleted (or replaced by an overwrite) since it was looked up
        raise unknown_resource(f"instance {public_id!r} was deleted meanwhile") from None
    try:
        return _rewrite(data, mod, anonymize, number)
    except RequestError:
        raise  # a 400 naming the field or value
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError, RecursionError, OSError,
            struct.error) as exc:  # fmt: skip
        # The stored instance itself cannot be rewritten: a UID tag stored with a numeric VR, an empty SOP class
        # that pydicom refuses in the file meta, sequences nested hundreds deep. A 400 naming the instance, not a
        # 500; pydicom's message may quote a value (PHI), so only its kind is said and logged. (OSError here is
        # an encoding failure: everything is in memory once the file is read.)
        log.warning("instance cannot be rewritten", instance=public_id, error=type(exc).__name__)
        raise RestError(400, 15, "Bad file format",
                        f"instance {public_id!r} cannot be rewritten: its stored file holds something the edit "
                        f"cannot read or write ({type(exc).__name__})") from None  # fmt: skip


def _rewrite(data: bytes, mod: Modification, anonymize: bool, number: int | None) -> list[Any]:
    if anonymize:
        chunks = anonymize_bytes(data, mod, MemoryUidMap(), patient_name_counter=number)
        if chunks is not None:  # the common request on explicit VR data: no pydicom Dataset (fastanon.py)
            return chunks
    loaded = fileio.load(data)
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


#: Threads for the edit routes. asyncio's executor, not anyio's ``run_in_threadpool``: its cancel scope and
#: capacity limiter cost about 0.1 ms a call, on a route that answers in about 1 ms.
_EXECUTOR = ThreadPoolExecutor(max_workers=8, thread_name_prefix="edit")
#: A larger body is refused: it is a JSON request, and it is held in memory.
MAX_BODY = 16 * 1024 * 1024


def _edit_joined(archive: Archive, counter: NameCounter, public_id: str, raw: bytes, anonymize: bool) -> bytes:
    """The answer's bytes, joined in the worker thread rather than on the event loop."""
    return b"".join(_edit(archive, counter, public_id, raw, anonymize))


async def _answer(state: Any, public_id: str, raw: bytes, anonymize: bool) -> Response:
    loop = asyncio.get_running_loop()
    content = await loop.run_in_executor(_EXECUTOR, _edit_joined, state.archive, state.name_counter, public_id, raw,
                                         anonymize)  # fmt: skip
    return Response(content, media_type="application/dicom")


async def _respond(request: Request, public_id: str, anonymize: bool) -> Response:
    return await _answer(request.app.state, public_id, await request.body(), anonymize)


_FRONT_PATH = re.compile(r"/instances/([^/]+)/(anonymize|modify)")


class EditFront:
    """A pure-ASGI front for the two routes above, in front of FastAPI's own dispatch (auth stays outside it).

    Why: scripts call ``/instances/{id}/anonymize`` once per instance, and FastAPI's dispatch (five middleware
    layers, included-router matching done twice, dependency solving) cost about as much CPU as anonymizing a CT
    instance on the fast path. Here the request goes straight to :func:`_edit`, and errors get the same Orthanc
    JSON body. The front takes every POST to these two paths, so the FastAPI routes above describe them in the
    OpenAPI document (their handlers do what the front does, and run only in an app built without it); requests
    the front does not take (another method, a trailing slash) get FastAPI's own answers.
    """

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _FRONT_PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        raw = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body", False):
                break
            if len(raw) > MAX_BODY:
                break
        try:
            if len(raw) > MAX_BODY:
                raise RestError(413, 8, "Bad request", f"the request body is over {MAX_BODY} bytes (a JSON request)")
            # the path in the scope is already percent-decoded, as FastAPI's path parameters are
            response = await _answer(self.state, match.group(1), bytes(raw), match.group(2) == "anonymize")
        except RestError as exc:
            response = errors.response(Request(scope), exc)
        except RequestError as exc:
            response = errors.response(Request(scope), errors.from_request_error(exc))
        await response(scope, receive, send)
