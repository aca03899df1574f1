"""``POST /studies/{id}/split`` and ``/merge`` (spec §4.4): move series or instances to a new study, or into an
existing one. Jobs like modify's (same rewriting pool, same roll-back), but Orthanc's defaults differ:
``KeepSource`` is false, so the moved instances leave their source study once every one is stored.

A moved instance gets a fresh SOPInstanceUID and one new SeriesInstanceUID per source series, as in Orthanc;
nothing else is remapped (references are not followed, unlike anonymization).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydicom.datadict import dictionary_VR
from pydicom.uid import generate_uid

from node.archive.models import Instance, Series, Study
from node.archive.rewrite import MoveTransform
from node.dicom import fileio
from node.dicom.modules import PATIENT_MODULE, SPLIT_ALLOWED, STUDY_MODULE, STUDY_UID
from node.dicom.tags import TagError, parse_tag
from node.rest.body import json_object
from node.rest.errors import bad_request, unknown_resource
from node.rest.jobs import JobContext
from node.rest.modify import Plan, find_resource, keep_source_flag, plan_for, run_plan

router = APIRouter()

#: Values longer than this, and sequences, are not copied by a merge (Orthanc's rule): the tag is removed.
MERGE_MAX_LENGTH = 256


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"'{key}' must be a list of strings")
    return value


def _split_tag(token: str, field: str) -> int:
    try:
        tag = int(parse_tag(token))
    except TagError as exc:
        raise bad_request(f"'{field}': {exc}") from None
    if tag not in SPLIT_ALLOWED or dictionary_VR(tag) == "SQ":
        raise bad_request(f"Cannot modify the following tag while splitting a study (only the patient and study "
                          f"modules may change, except StudyInstanceUID, SeriesInstanceUID and sequences): "
                          f"{token}")  # fmt: skip
    return tag


def _study(public_id: str) -> Study:
    study = Study.get_or_none(Study.public_id == public_id)
    if study is None:
        raise unknown_resource(f"no study with ID {public_id!r}")
    return study


def _split_plan(request: Request, study_id: str, body: dict[str, Any]) -> tuple[Plan, MoveTransform]:
    series, instances = _strings(body, "Series"), _strings(body, "Instances")
    replace = body.get("Replace", {})
    if not isinstance(replace, dict) or not all(isinstance(v, str) for v in replace.values()):
        raise bad_request("'Replace' must be an object whose values are strings")
    replacements = tuple((_split_tag(k, "Replace"), v) for k, v in replace.items())
    removals = tuple(_split_tag(k, "Remove") for k in _strings(body, "Remove"))
    archive = request.app.state.archive
    with archive.db.connection_context():
        study = _study(study_id)
        if not series and not instances:
            raise bad_request("Both the Series and the Instances fields are missing")
        for sid in series:
            row = Series.get_or_none(Series.public_id == sid)
            if row is None or row.study_id != study.id:
                raise unknown_resource(f"series {sid!r} does not belong to the study to be split")
        for iid in instances:
            row = Instance.get_or_none(Instance.public_id == iid)
            if row is None or Series.get_by_id(row.series_id).study_id != study.id:
                raise unknown_resource(f"instance {iid!r} does not belong to the study to be split")
    plan = plan_for(request, list(dict.fromkeys(series + instances)), keep_source_flag(body, False))
    transform = MoveTransform(os.urandom(32), removals, (*replacements, (STUDY_UID, str(generate_uid()))))
    return plan, transform


@router.post("/studies/{public_id}/split", summary="Move series or instances of a study to a new study (a job)")
async def split(request: Request, public_id: str) -> dict[str, Any]:
    body = json_object(await request.body())
    plan, transform = await run_in_threadpool(_split_plan, request, public_id, body)
    archive = request.app.state.archive

    def work(ctx: JobContext) -> dict[str, Any]:
        outcome = run_plan(archive, plan, ctx, transform)
        target = outcome.stored[0].result.ids.study if outcome.stored else None
        return {"Description": "REST API", "FailedInstancesCount": 0, "InstancesCount": len(outcome.stored),
                "TargetStudy": target, "TargetStudyUID": dict(transform.replace)[STUDY_UID]}  # fmt: skip

    return await request.app.state.jobs.run_async("SplitStudy", work, body)


def _target_values(archive: Any, study: Study) -> tuple[tuple[int, str | None], ...]:
    """The target study's patient and study module values, read from one of its instances: what every merged
    instance gets (a tag the target lacks, holds as a sequence or as a long value is removed from them)."""
    row = Instance.select().join(Series).where(Series.study == study.id).order_by(Instance.id).first()
    if row is None:
        raise unknown_resource(f"study {study.public_id} has no instance to merge into")
    ds = fileio.read_header(archive.storage.locate(row.file_uuid))
    out: list[tuple[int, str | None]] = []
    for tag in PATIENT_MODULE + STUDY_MODULE:
        elem = ds.get(tag)
        value = None
        if elem is not None and elem.VR != "SQ" and elem.value is not None:
            text = "\\".join(str(v) for v in elem.value) if elem.VM > 1 else str(elem.value)
            if len(text) <= MERGE_MAX_LENGTH:
                value = text
        out.append((tag, value))
    return tuple(out)


def _merge_plan(request: Request, study_id: str, body: dict[str, Any]) -> tuple[Plan, MoveTransform]:
    resources = body.get("Resources")
    if not isinstance(resources, list) or not resources or not all(isinstance(r, str) for r in resources):
        raise bad_request("'Resources' must be a non-empty list of study, series or instance IDs to merge")
    archive = request.app.state.archive
    with archive.db.connection_context():
        target = _study(study_id)
        for rid in resources:
            level, row = find_resource(rid)
            if level == "Patient":
                raise unknown_resource(f"{rid!r} is a patient: merge studies, series or instances")
            if level == "Study" and row.id == target.id:
                raise unknown_resource(f"study {rid!r} is the target of the merge")
            if level == "Series" and row.study_id == target.id:
                raise unknown_resource(f"series {rid!r} is already in the target study")
            if level == "Instance" and Series.get_by_id(row.series_id).study_id == target.id:
                raise unknown_resource(f"instance {rid!r} is already in the target study")
        values = _target_values(archive, target)
    plan = plan_for(request, list(dict.fromkeys(resources)), keep_source_flag(body, False))
    return plan, MoveTransform(os.urandom(32), (), values)


@router.post("/studies/{public_id}/merge", summary="Move studies, series or instances into this study (a job)")
async def merge(request: Request, public_id: str) -> dict[str, Any]:
    body = json_object(await request.body())
    plan, transform = await run_in_threadpool(_merge_plan, request, public_id, body)
    archive = request.app.state.archive

    def work(ctx: JobContext) -> dict[str, Any]:
        outcome = run_plan(archive, plan, ctx, transform)
        return {"Description": "REST API", "FailedInstancesCount": 0, "InstancesCount": len(outcome.stored),
                "TargetStudy": public_id}  # fmt: skip

    return await request.app.state.jobs.run_async("MergeStudy", work, body)
