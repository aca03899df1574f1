"""Query/retrieve as Orthanc 1.10 does it: ``POST /modalities/{name}/query`` runs a C-FIND and keeps its answers
under ``/queries/{id}``, from where one answer or all of them are retrieved with a C-MOVE.

Queries live in memory (Orthanc's too), at most ``QueryRetrieveSize`` (100) of them, the oldest dropped first.
A query remembers the modality as it was when it ran, so a retrieve goes where the answers came from even if
the modality was changed since.

Answers, and the query as sent, are shown in Orthanc's full JSON format (``gggg,eeee`` → Name, Type, Value),
or with ``?simplify`` keyword → value, or with ``?short`` ``gggg,eeee`` → value (:mod:`node.dicom.dicomjson`).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from node.dicom.dicomjson import FULL, SHORT, SIMPLIFY, dataset_json
from node.dicom.levels import Level, parse_level
from node.dicom.maintags import INSTANCE_TAGS, PATIENT_TAGS, SERIES_TAGS, STUDY_TAGS
from node.dicom.tags import TagError, parse_tag
from node.net import qr
from node.net.scu import Target
from node.rest.body import parse_json
from node.rest.errors import RestError, bad_request, unknown_resource
from node.rest.jobs import JobContext
from node.rest.remote import Remote, aet_field, config, remote, timeout_field
from node.rest.sending import network_error

router = APIRouter()

#: Orthanc's ``QueryRetrieveSize`` default.
QUERY_RETRIEVE_SIZE = 100
_NUMERIC_VRS = frozenset({"US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"})

#: The tags a normalized query keeps at each level (Orthanc: the level's module and those above, plus the
#: level's computed counters).
_ALLOWED = {
    Level.PATIENT: {*PATIENT_TAGS, "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                    "NumberOfPatientRelatedInstances"},
    Level.STUDY: {*PATIENT_TAGS, *STUDY_TAGS, "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances", "SOPClassesInStudy"},
    Level.SERIES: {*PATIENT_TAGS, *STUDY_TAGS, *SERIES_TAGS, "NumberOfSeriesRelatedInstances"},
    Level.INSTANCE: {*PATIENT_TAGS, *STUDY_TAGS, *SERIES_TAGS, *INSTANCE_TAGS, "SOPClassUID"},
}  # fmt: skip
#: What a C-MOVE of an answer needs (Study Root: the UIDs of the levels above too).
_KEYS = {
    Level.PATIENT: ("PatientID",),
    Level.STUDY: ("StudyInstanceUID",),
    Level.SERIES: ("StudyInstanceUID", "SeriesInstanceUID"),
    Level.INSTANCE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}
#: Asked for in every query so that answers can be told apart and retrieved (Orthanc adds these too).
_RETURN_KEYS = {**_KEYS, Level.STUDY: ("AccessionNumber", "StudyInstanceUID")}


@dataclass
class Query:
    id: str
    modality: str
    target: Target
    local_aet: str
    level: Level
    query: Dataset
    answers: list[Dataset]
    timeout: float


class QueryArchive:
    """The queries of this process, oldest first, capped."""

    def __init__(self, size: int = QUERY_RETRIEVE_SIZE) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[str, Query] = OrderedDict()
        self._size = size

    def add(self, query: Query) -> None:
        with self._lock:
            self._items[query.id] = query
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def get(self, query_id: str) -> Query:
        with self._lock:
            found = self._items.get(query_id)
        if found is None:
            raise unknown_resource(f"no query with ID {query_id!r} (queries are kept in memory, at most "
                                   f"{self._size})")  # fmt: skip
        return found

    def remove(self, query_id: str) -> None:
        with self._lock:
            if self._items.pop(query_id, None) is None:
                raise unknown_resource(f"no query with ID {query_id!r}")

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._items)


_CREATE = threading.Lock()


def _archive(request: Request) -> QueryArchive:
    state = request.app.state
    with _CREATE:
        if getattr(state, "queries", None) is None:
            state.queries = QueryArchive()
    return state.queries  # type: ignore[no-any-return]


# -- JSON of datasets ------------------------------------------------------------------------------------------


def to_json(ds: Dataset, request: Request) -> dict[str, Any]:
    """Orthanc's full format, or ``?simplify`` / ``?short`` (Orthanc's ``DicomToJsonFormat`` arguments)."""
    params = request.query_params
    return dataset_json(ds, SHORT if "short" in params else SIMPLIFY if "simplify" in params else FULL)


# -- C-FIND ----------------------------------------------------------------------------------------------------


def level_field(body: dict[str, Any]) -> Level:
    value = body.get("Level")
    if not isinstance(value, str):
        raise bad_request(f"'Level' must be Patient, Study, Series or Instance, got {json.dumps(value)}")
    try:
        return parse_level(value)
    except ValueError as exc:
        raise bad_request(f"'Level': {exc}") from None


def add_element(ds: Dataset, key: str, value: Any, where: str) -> None:
    try:
        tag = parse_tag(key)
    except TagError as exc:
        raise bad_request(f"{where}: {exc}") from None
    if not isinstance(value, str):
        raise bad_request(f"{where}[{key!r}] must be a string (a C-FIND matching value), got {json.dumps(value)}")
    try:
        vr = dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        raise bad_request(f"{where}: {key!r} is not in the DICOM dictionary (private tags cannot be queried)") from None
    if vr == "SQ":
        raise bad_request(f"{where}: {key!r} is a sequence; sequence matching is not supported")
    if vr in _NUMERIC_VRS:
        number = float if vr in ("FL", "FD") else int
        try:
            ds.add_new(tag, vr, [number(v) for v in value.split("\\")] if value else None)
        except ValueError:
            raise bad_request(f"{where}[{key!r}]: {value!r} is not a number") from None
    else:
        ds.add_new(tag, vr, value)


def build_query(level: Level, query: dict[str, Any], normalize: bool) -> Dataset:
    ds = Dataset()
    for key, value in query.items():
        add_element(ds, key, value, "Query")
    if normalize:
        allowed = _ALLOWED[level] | {"SpecificCharacterSet"}
        for elem in list(ds):
            if elem.keyword not in allowed:
                del ds[elem.tag]
    for keyword in _RETURN_KEYS[level]:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def run_query(rem: Remote, level: Level, ds: Dataset) -> list[Dataset]:
    try:
        return qr.find(rem.target, rem.local_aet, level, ds, rem.timeout)
    except qr.ScuError as exc:
        raise network_error(f"C-FIND on modality {rem.name!r}: {exc}") from None


@router.post("/modalities/{name}/query", summary="C-FIND on a modality; the answers are kept under /queries/{id}")
async def query_modality(request: Request, name: str) -> dict[str, str]:
    body = parse_json(await request.body())
    if not isinstance(body, dict):
        raise bad_request('the body must be a JSON object {"Level", "Query", …}')
    level = level_field(body)
    query = body.get("Query", {})
    if not isinstance(query, dict):
        raise bad_request("'Query' must be a JSON object of tag: value")
    normalize = body.get("Normalize", True)
    if not isinstance(normalize, bool):
        raise bad_request("'Normalize' must be true or false")
    rem = remote(request, name, body)
    ds = build_query(level, query, normalize)
    answers = await run_in_threadpool(run_query, rem, level, ds)
    item = Query(str(uuid.uuid4()), name, rem.target, rem.local_aet, level, ds, answers, rem.timeout)
    _archive(request).add(item)
    return {"ID": item.id, "Path": f"/queries/{item.id}"}


@router.get("/queries", summary="The queries kept in memory")
def list_queries(request: Request) -> list[str]:
    return _archive(request).ids()


@router.get("/queries/{query_id}", summary="What can be done with a query")
def get_query(request: Request, query_id: str) -> list[str]:
    _archive(request).get(query_id)
    return ["answers", "level", "modality", "query", "retrieve"]


@router.delete("/queries/{query_id}", summary="Forget a query")
def delete_query(request: Request, query_id: str) -> Response:
    _archive(request).remove(query_id)
    return Response(content="", media_type="text/plain")


@router.get("/queries/{query_id}/answers", summary="Indexes of the answers (?expand: their tags)")
def list_answers(request: Request, query_id: str, expand: str | None = None) -> list[Any]:
    q = _archive(request).get(query_id)
    if expand is not None and expand.lower() != "false":
        return [to_json(a, request) for a in q.answers]
    return [str(i) for i in range(len(q.answers))]


def _answer(q: Query, index: str) -> tuple[int, Dataset]:
    if not index.isdigit() or int(index) >= len(q.answers):
        raise RestError(400, 3, "Parameter out of range", f"answer {index!r}: the query has {len(q.answers)} answers")
    return int(index), q.answers[int(index)]


@router.get("/queries/{query_id}/answers/{index}", summary="What can be done with one answer")
def get_answer(request: Request, query_id: str, index: str) -> list[str]:
    _answer(_archive(request).get(query_id), index)
    return ["content", "retrieve"]


@router.get("/queries/{query_id}/answers/{index}/content", summary="The tags of one answer")
def answer_content(request: Request, query_id: str, index: str) -> dict[str, Any]:
    return to_json(_answer(_archive(request).get(query_id), index)[1], request)


@router.get("/queries/{query_id}/level", summary="The query's level (text)")
def query_level(request: Request, query_id: str) -> Response:
    return Response(content=_archive(request).get(query_id).level.title, media_type="text/plain")


@router.get("/queries/{query_id}/modality", summary="The modality queried (text)")
def query_modality_name(request: Request, query_id: str) -> Response:
    return Response(content=_archive(request).get(query_id).modality, media_type="text/plain")


@router.get("/queries/{query_id}/query", summary="The query as sent")
def query_sent(request: Request, query_id: str) -> dict[str, Any]:
    return to_json(_archive(request).get(query_id).query, request)


# -- C-MOVE ----------------------------------------------------------------------------------------------------


def move_job(request: Request, rem: Remote, level: Level, identifiers: list[Dataset], target_aet: str,
             body: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Orthanc's ``DicomMoveScu`` job: one association, one C-MOVE per identifier."""
    for identifier in identifiers:
        identifier.QueryRetrieveLevel = qr.QR_LEVEL[level]
    content = {"Description": "REST API", "LocalAet": rem.local_aet, "RemoteAet": rem.target.aet,
               "Query": [dataset_json(i, SHORT) for i in identifiers], "TargetAet": target_aet}  # fmt: skip

    def work(ctx: JobContext) -> dict[str, Any]:
        def progress(done: int, total: int) -> None:
            ctx.check()
            ctx.progress(done, total)

        try:
            qr.move(rem.target, rem.local_aet, target_aet, level, identifiers, rem.timeout, progress)
        except qr.ScuError as exc:
            raise network_error(f"C-MOVE on modality {rem.name!r} to {target_aet}: {exc}") from None
        return content

    return request.app.state.jobs.run("DicomMoveScu", work, body)  # type: ignore[no-any-return]


def _identifier(q: Query, index: int) -> Dataset:
    answer = q.answers[index]
    ds = Dataset()
    for keyword in _KEYS[q.level]:
        value = str(answer.get(keyword, "") or "").strip()
        if not value:
            raise bad_request(f"answer {index} has no {keyword}: it cannot be retrieved")
        setattr(ds, keyword, value)
    return ds


async def _retrieve(request: Request, q: Query, indexes: list[int]) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = parse_json(raw)
    except RestError:  # Orthanc: a body that is not JSON is the target AE title
        body = {"TargetAet": raw.decode("utf-8", "replace").strip()}
    if isinstance(body, str):
        body = {"TargetAet": body}
    if not isinstance(body, dict):
        raise bad_request('the body must be the target AE title or a JSON object {"TargetAet", …}')
    cfg = config(request)
    target_aet = aet_field(body, "TargetAet", cfg["DicomAet"])
    rem = Remote(q.modality, q.target, q.local_aet, timeout_field(body, q.timeout), {})
    identifiers = [_identifier(q, i) for i in indexes]
    return await run_in_threadpool(move_job, request, rem, q.level, identifiers, target_aet, body)


@router.post("/queries/{query_id}/retrieve", summary="C-MOVE every answer (to TargetAet, default: this node)")
async def retrieve_all(request: Request, query_id: str) -> dict[str, Any]:
    q = _archive(request).get(query_id)
    return await _retrieve(request, q, list(range(len(q.answers))))


@router.post("/queries/{query_id}/answers/{index}/retrieve", summary="C-MOVE one answer")
async def retrieve_one(request: Request, query_id: str, index: str) -> dict[str, Any]:
    q = _archive(request).get(query_id)
    return await _retrieve(request, q, [_answer(q, index)[0]])
