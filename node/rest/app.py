"""The FastAPI application: Orthanc's routes over the node's archive.

``create_app`` takes an open :class:`~node.archive.store.Archive`; ``serve`` runs it with uvicorn next to the
DICOM server. Every error, ours or FastAPI's (bad parameters, unknown route), answers Orthanc's error body.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import uuid
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from peewee import fn
from pydicom.uid import generate_uid
from starlette.exceptions import HTTPException

from node import __version__
from node.archive.models import Change, Instance, Patient, Series, Study
from node.archive.pseudonyms import NameCounter
from node.archive.query import statistics
from node.archive.store import Archive
from node.config import Config
from node.dicom.errors import RequestError
from node.rest import content, edit, errors, find, gateway, jobs, modalities, modify, resources, split_merge, upload
from node.rest.errors import RestError, bad_request

API_VERSION = 18  # Orthanc 1.10.1's ApiVersion: what clients check before using a route


def _authorised(header: str, users: dict[bytes, bytes]) -> bool:
    """HTTP basic against ``RegisteredUsers``, compared in constant time."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).partition(b":")
    except (ValueError, binascii.Error):
        return False
    expected = users.get(user)
    return bool(sep) and expected is not None and hmac.compare_digest(password, expected)


def create_app(cfg: Config, archive: Archive) -> FastAPI:
    app = FastAPI(title="dicom-node", version=__version__,
                  description="Orthanc-compatible REST API of dicom-node")  # fmt: skip
    app.state.archive = archive
    app.state.cfg = cfg
    app.state.jobs = jobs.JobEngine(cfg["ConcurrentJobs"])
    app.state.name_counter = NameCounter(archive.db)
    app.add_middleware(edit.EditFront, state=app.state)  # added before the auth middleware: inside it
    if cfg["AuthenticationEnabled"]:
        users = {u.encode(): p.encode() for u, p in cfg["RegisteredUsers"].items()}

        @app.middleware("http")
        async def basic_auth(request: Request, call_next: Any) -> Any:
            if not _authorised(request.headers.get("authorization", ""), users):
                err = RestError(401, 8, "Unauthorized", "HTTP basic authentication with a RegisteredUsers account")
                resp = errors.response(request, err)
                resp.headers["WWW-Authenticate"] = 'Basic realm="dicom-node"'
                return resp
            return await call_next(request)

    @app.exception_handler(RestError)
    def on_rest_error(request: Request, exc: RestError) -> JSONResponse:
        return errors.response(request, exc)

    @app.exception_handler(RequestError)
    def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return errors.response(request, errors.from_request_error(exc))

    @app.exception_handler(RequestValidationError)
    def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return errors.response(request, bad_request(where))

    @app.exception_handler(HTTPException)
    def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return errors.response(request, RestError(404, 17, "Unknown resource", f"no route {request.url.path}"))
        return errors.response(request, RestError(exc.status_code, 8, "Bad request", str(exc.detail)))

    @app.get("/system", summary="Name, version, AE title and ports of this node")
    def system() -> dict[str, Any]:
        return {"Name": cfg["Name"], "Version": __version__, "ApiVersion": API_VERSION, "DicomAet": cfg["DicomAet"],
                "DicomPort": cfg["DicomPort"], "HttpPort": cfg["HttpPort"], "DatabaseBackendPlugin": None,
                "StorageAreaPlugin": None, "PluginsEnabled": False, "CheckRevisions": False,
                "OverwriteInstances": cfg["OverwriteInstances"], "IsHttpServerSecure": True}  # fmt: skip

    @app.get("/statistics", summary="Counts per level and disk usage")
    def stats() -> dict[str, Any]:
        return statistics(archive).as_orthanc()

    @app.get("/tools/now", summary="The server's time, UTC, in DICOM's format")
    def now() -> str:
        return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")

    @app.get("/tools/now-local", summary="The server's local time in DICOM's format")
    def now_local() -> str:
        return dt.datetime.now().strftime("%Y%m%dT%H%M%S")

    @app.get("/tools/generate-uid", summary="A new UID (level: patient, study, series or instance)")
    def new_uid(level: str) -> Any:
        if level not in ("patient", "study", "series", "instance"):
            raise bad_request(f"level must be one of patient, study, series, instance; got {level!r}")
        return str(uuid.uuid4()) if level == "patient" else str(generate_uid())

    @app.get("/changes", summary="The changes log (NewInstance, NewSeries, StableStudy, Deleted…) after 'since'")
    def changes(since: int = Query(0, ge=0, le=resources.MAX_INT), limit: int = 100,
                last: str | None = None) -> dict[str, Any]:  # fmt: skip
        plural = {"Patient": "patients", "Study": "studies", "Series": "series", "Instance": "instances"}
        with archive.db.connection_context():
            if last is not None:  # ?last: only the newest change
                row = Change.select().order_by(Change.seq.desc()).first()
                rows = [row] if row is not None else []
            else:
                if since < 0 or not 0 < limit <= 10000:
                    raise bad_request("'since' must be >= 0 and 'limit' in 1..10000")
                rows = list(Change.select().where(Change.seq > since).order_by(Change.seq).limit(limit + 1))
            done = last is not None or len(rows) <= limit
            rows = rows[:limit]
            newest = Change.select(fn.MAX(Change.seq)).scalar() or 0
        out = [{"ChangeType": c.change_type, "Date": resources.stamp(c.date), "ID": c.public_id,
                "Path": f"/{plural[c.level]}/{c.public_id}", "ResourceType": c.level, "Seq": c.seq}
               for c in rows]  # fmt: skip
        return {"Changes": out, "Done": done, "Last": rows[-1].seq if rows else newest}

    @app.post("/tools/lookup", summary="The resources whose PatientID, AccessionNumber or UID is the body")
    async def lookup(request: Request) -> list[dict[str, str]]:
        value = (await request.body()).decode("utf-8", "replace").strip()
        if not value:
            raise bad_request("send the identifier to look up (PatientID, AccessionNumber or a UID) as the body")
        found = []
        with archive.db.connection_context():
            for model, column, plural in (
                (Patient, Patient.patient_id, "patients"), (Study, Study.study_uid, "studies"),
                (Study, Study.accession_number, "studies"), (Series, Series.series_uid, "series"),
                (Instance, Instance.sop_uid, "instances"),
            ):  # fmt: skip
                for (public_id,) in model.select(model.public_id).where(column == value).tuples():
                    found.append({"ID": public_id, "Path": f"/{plural}/{public_id}", "Type": model.__name__})
        return found

    app.include_router(edit.router)  # first: routes are matched in order, and scripts call these per instance
    app.include_router(resources.router)
    app.include_router(upload.router)
    app.include_router(content.router)
    app.include_router(jobs.router)
    app.include_router(modify.router)
    app.include_router(split_merge.router)
    app.include_router(find.router)
    app.include_router(modalities.router)
    app.include_router(gateway.router)
    return app
