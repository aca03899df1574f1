"""``POST /{patients|studies|series}/{id}/modify|anonymize`` and ``/tools/bulk-modify|bulk-anonymize``:
jobs that store their results (spec §4.2, §4.3).

Everything a request can get wrong is checked before the job starts (the body, the resources, Orthanc's
sanity checks for in-place modification and for moving a study to another patient), so a 4xx leaves the
archive untouched. A job that fails half-way removes what it had stored; sources are deleted
(``KeepSource: false``) only once every instance is stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from peewee import EXCLUDED

from node.archive import rewrite
from node.archive.db import write_transaction
from node.archive.models import Instance, Metadata, Patient, Series, Study, utcnow
from node.archive.outbox import enqueue
from node.archive.pseudonyms import NameCounter
from node.archive.storage import is_disk_error
from node.archive.store import Archive, Origin, delete_instance
from node.dicom.levels import Level
from node.dicom.maintags import PATIENT_TAGS
from node.dicom.request import PATIENT_ID, Modification, parse_anonymize, parse_modify
from node.logs import get as get_logger
from node.rest.body import json_object
from node.rest.errors import RestError, bad_request, unknown_resource
from node.rest.jobs import JobContext
from node.routing import rules

router = APIRouter()
log = get_logger("dicom-node.jobs")

_PLURAL = {"Patient": "patients", "Study": "studies", "Series": "series", "Instance": "instances"}
_URL_LEVEL = {"patients": Level.PATIENT, "studies": Level.STUDY, "series": Level.SERIES}
_LEVEL_NAME = {Level.PATIENT: "Patient", Level.STUDY: "Study", Level.SERIES: "Series", Level.INSTANCE: "Instance"}
_PATIENT_TAG_NUMBERS = {0x00100010: "PatientName", 0x00100020: "PatientID", 0x00100030: "PatientBirthDate",
                        0x00100040: "PatientSex", 0x00101000: "OtherPatientIDs"}  # fmt: skip
assert set(_PATIENT_TAG_NUMBERS.values()) == set(PATIENT_TAGS)


@dataclass(frozen=True)
class Source:
    """A stored instance a job reads, with its parents' public IDs (for ModifiedFrom at every level)."""

    instance: str
    series: str
    study: str
    patient: str
    file_uuid: str


def find_resource(public_id: str) -> tuple[str, Any]:
    """The level and row of any resource ID (Orthanc does not check that the URL's level matches)."""
    for name, model in (("Instance", Instance), ("Series", Series), ("Study", Study), ("Patient", Patient)):
        row = model.get_or_none(model.public_id == public_id)
        if row is not None:
            return name, row
    raise unknown_resource(f"no patient, study, series or instance with ID {public_id!r}")


def sources_of(public_ids: Iterable[str]) -> list[Source]:
    """Every instance below the given resources, once each, in storage order per resource."""
    out: dict[str, Source] = {}
    for public_id in public_ids:
        level, row = find_resource(public_id)
        query = (Instance.select(Instance.public_id, Series.public_id, Study.public_id, Patient.public_id,
                                 Instance.file_uuid)
                 .join(Series).join(Study).join(Patient))  # fmt: skip
        column = {"Instance": Instance.id, "Series": Series.id, "Study": Study.id, "Patient": Patient.id}[level]
        for inst, series, study, patient, uuid in query.where(column == row.id).order_by(Instance.id).tuples():
            out.setdefault(inst, Source(inst, series, study, patient, uuid))
    return list(out.values())


def keep_source_flag(body: dict[str, Any], default: bool) -> bool:
    value = body.get("KeepSource", default)
    if not isinstance(value, bool):
        raise bad_request("'KeepSource' must be true or false")
    return value


def sanity_checks(mod: Modification, keep_source: bool, overwrite: bool, studies: Sequence[str]) -> None:
    """Orthanc's ``ResourceModificationJob::PerformSanityChecks`` (edge cases 30-33), before the job starts."""
    # Orthanc checks the study and patient levels only; at the series and instance levels the same request
    # would "succeed" storing nothing (every output AlreadyStored) or overwrite in place: checked the same way.
    kept = {Level.INSTANCE: mod.keep_sop_uid, Level.SERIES: mod.keep_series_uid and mod.keep_sop_uid}
    in_place = (PATIENT_ID not in mod.replacements and not mod.is_anonymization
                and kept.get(mod.level, mod.keep_study_uid and mod.keep_series_uid and mod.keep_sop_uid))  # fmt: skip
    if in_place and not keep_source:
        raise bad_request("When keeping StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID, KeepSource must be "
                          "true: otherwise the modified instances would be deleted at the end of the job")  # fmt: skip
    if in_place and not overwrite:
        raise bad_request("When keeping StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID, the "
                          "'OverwriteInstances' configuration must be true to replace the modified "
                          "instances")  # fmt: skip
    replaced = {t: str(v) for t, v in mod.replacements.items() if t in _PATIENT_TAG_NUMBERS}
    if mod.level is not Level.STUDY or mod.is_anonymization or not replaced:
        return
    for study_id in studies:
        study = Study.get_or_none(Study.public_id == study_id)
        if study is None:
            continue
        own = Patient.get_by_id(study.patient_id)
        target_pid = replaced.get(PATIENT_ID, own.patient_id)
        target = Patient.get_or_none(Patient.patient_id == target_pid)
        if target is None:
            continue
        others = [s for (s,) in Study.select(Study.public_id).where(Study.patient == target.id).tuples()]
        if not [s for s in others if s != study_id]:
            continue  # the patient's only study: its patient tags may change freely
        target_tags = json.loads(target.main_tags)
        for tag, keyword in _PATIENT_TAG_NUMBERS.items():
            if keyword in target_tags and replaced.get(tag) != target_tags[keyword]:
                raise bad_request(
                    "Trying to change patient tags in a study. The patient already exists and has other studies: "
                    "all the 'Replace' tags must match the existing patient's main tags, and every patient main "
                    f"tag must be given. Use /patients/{{id}}/modify to modify the patient. Failing tag: {keyword}"
                )
            if keyword not in target_tags and tag in replaced:
                raise bad_request(
                    "Trying to change patient tags in a study. The patient already exists and has other studies, "
                    f"and has no value for {keyword}. Use /patients/{{id}}/modify to modify the patient."
                )


@dataclass
class Plan:
    """One rewriting job, checked and ready to run."""

    sources: list[Source]
    keep_source: bool
    parents: list[str]
    origin: Origin
    processes: int
    routes: Sequence[Any]
    mod: Modification | None = None  # None: split or merge (their transform is given to run_plan)

    @property
    def meta_name(self) -> str | None:
        if self.mod is None:
            return None
        return "AnonymizedFrom" if self.mod.is_anonymization else "ModifiedFrom"


def modify_transform(counter: NameCounter, mod: Modification) -> rewrite.ModifyTransform:
    """The job's transform: a fresh key (Orthanc's per-request UID map) and, for an anonymization, the job's
    ``Anonymized<N>`` drawn from the index-wide counter."""
    return rewrite.ModifyTransform(mod, os.urandom(32), counter.take() if mod.needs_name_counter else None)


def run_plan(archive: Archive, plan: Plan, ctx: JobContext, transform: rewrite.Transform) -> rewrite.Outcome:
    """Rewrite, store, tag the new parents, rebuild their main tags, queue the routing deliveries of the new
    instances, then (only then) drop the sources. A failure removes what the job had stored."""
    with archive.db.connection_context():  # this job thread's connection, closed when the job ends
        if ctx.attempt > 1:  # a resubmitted job: the archive may have changed since it was planned
            plan.sources = sources_of(plan.parents)
        by_instance = {s.instance: s for s in plan.sources}
        items = [(s.instance, str(archive.storage.locate(s.file_uuid))) for s in plan.sources]
        outcome = rewrite.Outcome()
        name = plan.meta_name
        try:
            rewrite.rewrite(
                archive, items, transform, plan.origin, processes=plan.processes, outcome=outcome,
                metadata=(lambda source: {name: source}) if name else (lambda source: {}),
                progress=ctx.progress, check=ctx.check,
            )  # fmt: skip
            if name:
                _tag_parents(outcome, by_instance, name)
                rewrite.rebuild_main_tags(archive, outcome)
            _queue_deliveries(archive, plan, outcome)
        except BaseException as exc:  # noqa: BLE001 - rolled back, then raised again
            removed, left = rewrite.rollback(archive, outcome)
            log.info("job failed; its new instances removed", removed=removed, left=left, error=str(exc))
            raise _job_error(exc, left) from None
        if not plan.keep_source:
            outputs = {s.result.ids.instance for s in outcome.stored}
            for source in plan.sources:
                if source.instance not in outputs:  # only the copy that was rewritten, never a newer one
                    delete_instance(archive, source.instance, file_uuid=source.file_uuid)
    return outcome


def _queue_deliveries(archive: Archive, plan: Plan, outcome: rewrite.Outcome) -> None:
    """The routing rules' deliveries of the job's new instances, queued in one transaction once the whole job
    succeeded (a half job is never forwarded)."""
    if not plan.routes:
        return
    where = rules.Origin(remote_host=plan.origin.remote_ip)
    rows = [(s.result.ids.instance, s.result.ids.study, rules.deliveries_for_file(plan.routes, str(s.result.path),
                                                                                   where))
            for s in outcome.stored if s.result.status == "Success"]  # fmt: skip
    rows = [r for r in rows if r[2]]
    if rows:
        now = utcnow()
        with write_transaction(archive.db):
            for instance, study, deliveries in rows:
                enqueue(archive.db, instance, study, deliveries, now)


def _job_error(exc: BaseException, left: list[str]) -> BaseException:
    tail = f" (could not remove the new instances {', '.join(left)})" if left else ""
    if isinstance(exc, rewrite.RewriteError):
        return RestError(500, 2018, "Cannot store an instance", f"{exc}{tail}")
    if isinstance(exc, OSError) and is_disk_error(exc):
        return RestError(507, 2019, "Storage full", f"storage failure: {exc.strerror}{tail}")
    if left and isinstance(exc, RestError):
        return RestError(exc.http_status, exc.orthanc_status, exc.orthanc_error, f"{exc.details}{tail}")
    return exc


def _tag_parents(outcome: rewrite.Outcome, sources: dict[str, Source], name: str) -> None:
    """``ModifiedFrom``/``AnonymizedFrom`` on each new series, study and patient whose ID differs from its
    source's (Orthanc's rule: an in-place modification does not say it was modified from itself)."""
    rows = {}
    for stored in outcome.stored:
        if stored.result.status != "Success":  # Orthanc writes nothing for an AlreadyStored output
            continue
        src, ids = sources[stored.source], stored.result.ids
        for new, old in ((ids.series, src.series), (ids.study, src.study), (ids.patient, src.patient)):
            if new != old:
                rows.setdefault(new, old)
    if rows:
        Metadata.insert_many(
            [(k, name, v) for k, v in rows.items()], fields=[Metadata.public_id, Metadata.name, Metadata.value]
        ).on_conflict(
            conflict_target=[Metadata.public_id, Metadata.name], update={Metadata.value: EXCLUDED.value}
        ).execute()


def _origin(request: Request) -> Origin:
    return Origin("RestApi", "", "", request.client.host if request.client else "")


def _single_output(mod: Modification, plan: Plan, outcome: rewrite.Outcome, url_level: Level) -> dict[str, Any]:
    out: dict[str, Any] = {"Description": "REST API", "FailedInstancesCount": 0,
                           "InstancesCount": len(outcome.stored), "IsAnonymization": mod.is_anonymization,
                           "ParentResources": plan.parents}  # fmt: skip
    if outcome.stored:
        ids = outcome.stored[0].result.ids
        new_id = {Level.PATIENT: ids.patient, Level.STUDY: ids.study, Level.SERIES: ids.series}[url_level]
        level = _LEVEL_NAME[url_level]
        out.update({"ID": new_id, "Path": f"/{_PLURAL[level]}/{new_id}", "PatientID": ids.patient, "Type": level})
    if mod.transcode:
        out["Transcode"] = mod.transcode
    return out


def _bulk_output(mod: Modification, plan: Plan, outcome: rewrite.Outcome) -> dict[str, Any]:
    groups: dict[str, set[str]] = {"Instance": set(), "Series": set(), "Study": set(), "Patient": set()}
    for s in outcome.stored:
        ids = s.result.ids
        groups["Instance"].add(ids.instance)
        groups["Series"].add(ids.series)
        groups["Study"].add(ids.study)
        groups["Patient"].add(ids.patient)
    resources = [{"ID": i, "Path": f"/{_PLURAL[t]}/{i}", "Type": t} for t, ids in groups.items() for i in sorted(ids)]
    out = {"Description": "REST API", "FailedInstancesCount": 0, "InstancesCount": len(outcome.stored),
           "IsAnonymization": mod.is_anonymization, "ParentResources": plan.parents,
           "Resources": resources}  # fmt: skip
    if mod.transcode:
        out["Transcode"] = mod.transcode
    return out


def plan_for(request: Request, parents: list[str], keep_source: bool, mod: Modification | None = None) -> Plan:
    """Resolve the resources to their instances (404 for an unknown one) and run the sanity checks."""
    archive: Archive = request.app.state.archive
    with archive.db.connection_context():
        sources = sources_of(parents)
        if mod is not None:
            sanity_checks(mod, keep_source, archive.overwrite, sorted({s.study for s in sources}))
    return Plan(sources, keep_source, parents, _origin(request), int(request.app.state.cfg["JobsProcesses"]),
                request.app.state.cfg.routes, mod)  # fmt: skip


def _register(url_level: str, anonymize: bool) -> None:
    level = _URL_LEVEL[url_level]

    async def handler(request: Request, public_id: str) -> dict[str, Any]:
        body = json_object(await request.body())
        mod = parse_anonymize(body) if anonymize else parse_modify(body, level=level)
        plan = await run_in_threadpool(plan_for, request, [public_id], keep_source_flag(body, True), mod)
        archive = request.app.state.archive

        counter = request.app.state.name_counter

        def work(ctx: JobContext) -> dict[str, Any]:
            return _single_output(mod, plan, run_plan(archive, plan, ctx, modify_transform(counter, mod)), level)

        return await request.app.state.jobs.run_async("ResourceModification", work, body)

    verb = "anonymize" if anonymize else "modify"
    router.add_api_route(f"/{url_level}/{{public_id}}/{verb}", handler, methods=["POST"],
                         summary=f"{verb.capitalize()} every instance of one of the {url_level} into new stored "
                                 "instances (a job; Orthanc's body)")  # fmt: skip


for _url_level in _URL_LEVEL:
    _register(_url_level, anonymize=False)
    _register(_url_level, anonymize=True)


def _resources(body: dict[str, Any]) -> list[str]:
    resources = body.get("Resources")
    if not isinstance(resources, list) or not resources or not all(isinstance(r, str) for r in resources):
        raise bad_request("'Resources' must be a non-empty list of Orthanc IDs (patients, studies, series or "
                          "instances)")  # fmt: skip
    return list(dict.fromkeys(resources))


def _bulk_level(body: dict[str, Any]) -> Level | None:
    if "Level" not in body:
        return None
    value = body["Level"]
    names = {n.lower(): lvl for lvl, n in _LEVEL_NAME.items()}
    if not isinstance(value, str) or value.lower() not in names:
        raise bad_request(f"'Level' must be Patient, Study, Series or Instance, got {value!r}")
    return names[value.lower()]


async def _bulk(request: Request, anonymize: bool) -> dict[str, Any]:
    body = json_object(await request.body())
    parents = _resources(body)
    mod = parse_anonymize(body) if anonymize else parse_modify(body, level=_bulk_level(body))
    plan = await run_in_threadpool(plan_for, request, parents, keep_source_flag(body, True), mod)
    archive = request.app.state.archive

    counter = request.app.state.name_counter

    def work(ctx: JobContext) -> dict[str, Any]:
        return _bulk_output(mod, plan, run_plan(archive, plan, ctx, modify_transform(counter, mod)))

    return await request.app.state.jobs.run_async("ResourceModification", work, body)


@router.post("/tools/bulk-modify", summary="Modify several resources in one job (one UID map): Resources, Level")
async def bulk_modify(request: Request) -> dict[str, Any]:
    return await _bulk(request, anonymize=False)


@router.post("/tools/bulk-anonymize", summary="Anonymize several resources in one job (one UID map): Resources")
async def bulk_anonymize(request: Request) -> dict[str, Any]:
    return await _bulk(request, anonymize=True)
