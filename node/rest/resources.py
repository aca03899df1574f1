"""Browsing the archive: ``/patients``, ``/studies``, ``/series``, ``/instances`` and one resource of each, in
Orthanc 1.10's JSON shapes (``ID``, ``Type``, ``MainDicomTags``, parents and children, ``IsStable``,
``LastUpdate``), and an instance's file.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse
from peewee import Model

from node.archive.models import Instance, Metadata, Patient, Series, Study
from node.archive.store import Archive, delete_instance
from node.rest.errors import bad_request, unknown_resource

router = APIRouter()

#: Bounds of integer query parameters (SQLite's and PostgreSQL's BIGINT).
MAX_INT = 2**63 - 1

LEVELS: dict[str, type[Model]] = {"patients": Patient, "studies": Study, "series": Series, "instances": Instance}


def _archive(request: Request) -> Archive:
    return request.app.state.archive  # type: ignore[no-any-return]


def stamp(value: dt.datetime | str | None) -> str:
    """Orthanc's ``LastUpdate`` format: ``20261122T130400``."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.strftime("%Y%m%dT%H%M%S")


def _ids(query: Any) -> list[str]:
    return [r for (r,) in query.tuples()]


def describe(row: Model) -> dict[str, Any]:
    """One resource as Orthanc's ``GET /{level}/{id}`` shows it."""
    tags = json.loads(row.main_tags)
    if isinstance(row, Patient):
        studies = list(Study.select(Study.public_id, Study.stable_pending).where(Study.patient == row.id).tuples())
        return {"ID": row.public_id, "IsStable": not any(p for _, p in studies), "Labels": [],
                "LastUpdate": stamp(row.last_update), "MainDicomTags": tags, "Studies": [s for s, _ in studies],
                "Type": "Patient"}  # fmt: skip
    if isinstance(row, Study):
        patient = Patient.get_by_id(row.patient_id)
        series = _ids(Series.select(Series.public_id).where(Series.study == row.id).order_by(Series.id))
        return {"ID": row.public_id, "IsStable": not row.stable_pending, "Labels": [],
                "LastUpdate": stamp(row.last_update), "MainDicomTags": tags, "ParentPatient": patient.public_id,
                "PatientMainDicomTags": json.loads(patient.main_tags), "Series": series, "Type": "Study"}  # fmt: skip
    if isinstance(row, Series):
        study = Study.get_by_id(row.study_id)
        instances = _ids(Instance.select(Instance.public_id).where(Instance.series == row.id).order_by(Instance.id))
        return {"ExpectedNumberOfInstances": None, "ID": row.public_id, "Instances": instances,
                "IsStable": not row.stable_pending, "Labels": [], "LastUpdate": stamp(row.last_update),
                "MainDicomTags": tags, "ParentStudy": study.public_id, "Status": "Unknown",
                "Type": "Series"}  # fmt: skip
    series = Series.get_by_id(row.series_id)
    return {"FileSize": row.file_size, "FileUuid": row.file_uuid, "ID": row.public_id,
            "IndexInSeries": row.index_in_series, "Labels": [], "MainDicomTags": tags,
            "ParentSeries": series.public_id, "Type": "Instance"}  # fmt: skip


def _get(model: type[Model], public_id: str, level: str) -> Model:
    row = model.get_or_none(model.public_id == public_id)
    if row is None:
        raise unknown_resource(f"no {level[:-1] if level != 'series' else 'series'} with ID {public_id!r}")
    return row


def _list(level: str, request: Request, expand: str | None, since: int, limit: int) -> Any:
    model = LEVELS[level]
    if since < 0 or limit < 0:
        raise bad_request("'since' and 'limit' must be non-negative integers")
    with _archive(request).db.connection_context():
        query = model.select().order_by(model.id).offset(since)
        if limit:
            query = query.limit(limit)
        rows = list(query)
        # ?expand (any value but "false", as Orthanc) gives the resources themselves instead of their IDs
        if expand is not None and expand.lower() != "false":
            return [describe(r) for r in rows]
        return [r.public_id for r in rows]


def _one(level: str, request: Request, public_id: str) -> dict[str, Any]:
    with _archive(request).db.connection_context():
        return describe(_get(LEVELS[level], public_id, level))


def _register(level: str) -> None:
    def list_resources(request: Request, expand: str | None = None, since: int = Query(0, ge=0, le=MAX_INT),
                       limit: int = Query(0, ge=0, le=MAX_INT)) -> Any:  # fmt: skip
        return _list(level, request, expand, since, limit)

    def one_resource(request: Request, public_id: str) -> dict[str, Any]:
        return _one(level, request, public_id)

    router.add_api_route(f"/{level}", list_resources, methods=["GET"], summary=f"List the {level}")
    router.add_api_route(f"/{level}/{{public_id}}", one_resource, methods=["GET"], summary=f"One of the {level}")


for _level in LEVELS:
    _register(_level)


@router.get("/instances/{public_id}/file", summary="The instance's DICOM file, as stored")
def instance_file(request: Request, public_id: str) -> FileResponse:
    archive = _archive(request)
    with archive.db.connection_context():
        row = _get(Instance, public_id, "instances")
    path = archive.storage.locate(row.file_uuid)  # a storage uuid, never a DICOM value
    return FileResponse(path, media_type="application/dicom", filename=f"{public_id}.dcm")


# -- children and parents ---------------------------------------------------------------------------------------

#: (child level, how to select the child rows of one parent row)
_PATH_DOWN = {"patients": ("studies", "series", "instances"), "studies": ("series", "instances"),
              "series": ("instances",)}  # fmt: skip
_SINGULAR = {"patients": "patient", "studies": "study", "series": "series", "instances": "instance"}


def _children(level: str, row: Model, child_level: str) -> list[Model]:
    """Every descendant of ``row`` at ``child_level``, in insertion order."""
    rows: list[Model] = [row]
    current = level
    for nxt in _PATH_DOWN[level]:
        model = LEVELS[nxt]
        parent_field = {"studies": Study.patient, "series": Series.study, "instances": Instance.series}[nxt]
        ids = [r.id for r in rows]
        rows = list(model.select().where(parent_field.in_(ids)).order_by(model.id)) if ids else []
        current = nxt
        if current == child_level:
            return rows
    raise unknown_resource(f"{child_level} is not below {level}")


def _parent(row: Model, parent_level: str) -> Model:
    if isinstance(row, Instance):
        row = Series.get_by_id(row.series_id)
        if parent_level == "series":
            return row
    if isinstance(row, Series):
        row = Study.get_by_id(row.study_id)
        if parent_level == "studies":
            return row
    if isinstance(row, Study):
        return Patient.get_by_id(row.patient_id)
    raise unknown_resource(f"no {parent_level} above this resource")


def _register_family(level: str) -> None:
    for child in _PATH_DOWN.get(level, ()):

        def children(request: Request, public_id: str, expand: str | None = None, _child: str = child) -> Any:
            with _archive(request).db.connection_context():
                rows = _children(level, _get(LEVELS[level], public_id, level), _child)
                if expand is not None and expand.lower() == "false":
                    return [r.public_id for r in rows]
                return [describe(r) for r in rows]  # Orthanc expands child lists by default

        router.add_api_route(f"/{level}/{{public_id}}/{child}", children, methods=["GET"],
                             summary=f"The {child} of one of the {level}")  # fmt: skip
    order = list(LEVELS)
    for parent in order[: order.index(level)]:

        def parent_of(request: Request, public_id: str, _parent_level: str = parent) -> dict[str, Any]:
            with _archive(request).db.connection_context():
                return describe(_parent(_get(LEVELS[level], public_id, level), _parent_level))

        router.add_api_route(f"/{level}/{{public_id}}/{_SINGULAR[parent]}", parent_of, methods=["GET"],
                             summary=f"The {_SINGULAR[parent]} of one of the {level}")  # fmt: skip


for _level in LEVELS:
    _register_family(_level)


def _register_metadata(level: str) -> None:
    def names(request: Request, public_id: str, expand: str | None = None) -> Any:
        with _archive(request).db.connection_context():
            values = _metadata(_get(LEVELS[level], public_id, level))
        return values if expand is not None and expand.lower() != "false" else list(values)

    def value(request: Request, public_id: str, name: str) -> Any:
        with _archive(request).db.connection_context():
            values = _metadata(_get(LEVELS[level], public_id, level))
        if name not in values:
            raise unknown_resource(f"{level} {public_id} has no metadata {name!r} (it has: {', '.join(values)})")
        return PlainTextResponse(values[name])

    router.add_api_route(
        f"/{level}/{{public_id}}/metadata",
        names,
        methods=["GET"],
        summary=f"Names (or, with ?expand, values) of the metadata of one of the {level}",
    )
    router.add_api_route(f"/{level}/{{public_id}}/metadata/{{name}}", value, methods=["GET"],
                         summary=f"One metadata value of one of the {level} (text)")  # fmt: skip


def _metadata(row: Model) -> dict[str, str]:
    """Orthanc's metadata: for an instance, what the index keeps about its reception; at every level,
    ``LastUpdate`` where kept, and the rows of the Metadata table (``ModifiedFrom``, ``AnonymizedFrom``)."""
    out: dict[str, str] = {}
    if isinstance(row, Instance):
        out = {"IndexInSeries": "" if row.index_in_series is None else str(row.index_in_series),
               "Origin": row.origin, "ReceptionDate": stamp(row.received_at), "RemoteAET": row.remote_aet,
               "RemoteIP": row.remote_ip, "CalledAET": row.called_aet, "SopClassUid": row.sop_class_uid,
               "TransferSyntax": row.transfer_syntax}  # fmt: skip
        out = {k: v for k, v in out.items() if v != "" or k in ("RemoteAET", "RemoteIP")}
    else:
        out["LastUpdate"] = stamp(row.last_update)
    rows = Metadata.select(Metadata.name, Metadata.value).where(Metadata.public_id == row.public_id)
    out.update(dict(rows.tuples()))
    return out


for _level in LEVELS:
    _register_metadata(_level)


def _delete(level: str, request: Request, public_id: str) -> dict[str, Any]:
    archive = _archive(request)
    with archive.db.connection_context():
        row = _get(LEVELS[level], public_id, level)
        instances = [row] if level == "instances" else _children(level, row, "instances")
        parent = None if level == "patients" else _parent(row, list(LEVELS)[list(LEVELS).index(level) - 1])
        for inst in instances:
            delete_instance(archive, inst.public_id)
        remaining = None
        if parent is not None:
            still = type(parent).get_or_none(type(parent).public_id == parent.public_id)
            if still is not None:
                plural = {Patient: "patients", Study: "studies", Series: "series"}[type(parent)]
                remaining = {"ID": still.public_id, "Path": f"/{plural}/{still.public_id}",
                             "Type": type(still).__name__}  # fmt: skip
    return {"RemainingAncestor": remaining}


def _register_delete(level: str) -> None:
    def delete(request: Request, public_id: str) -> dict[str, Any]:
        return _delete(level, request, public_id)

    router.add_api_route(f"/{level}/{{public_id}}", delete, methods=["DELETE"],
                         summary=f"Delete one of the {level} (files and index rows)")  # fmt: skip


for _level in LEVELS:
    _register_delete(_level)
