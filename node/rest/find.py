"""``POST /tools/find``: Orthanc's search of the local index, with C-FIND's matching (:mod:`node.dicom.matching`).

The body is Orthanc's: ``{"Level": "Study", "Query": {"PatientName": "DOE*", "StudyDate": "2020-"},
"Expand": false, "Limit": 0, "Since": 0, "CaseSensitive": false, "RequestedTags": [...]}``. It is read as JSON
whatever the Content-Type says (``curl -d`` sends form-encoded), and every field is checked before the index is
touched, so a typo answers 400 naming the field instead of a silently wider search.

``CaseSensitive`` defaults to the ``CaseSensitivePN`` option (false), as Orthanc: its code reads
``caseSensitive = false`` unless the body says otherwise, and applies it to every tag of the query.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from node.archive.find import find, inherited_tags
from node.archive.store import Archive
from node.config import Config
from node.dicom.levels import Level, parse_level
from node.dicom.matching import Constraint, UnknownQueryTag, parse_query, resolve_tag
from node.rest.body import parse_json
from node.rest.errors import bad_request
from node.rest.resources import describe

router = APIRouter()

_FIELDS = ("Level", "Query", "Expand", "Limit", "Since", "CaseSensitive", "RequestedTags")


@dataclass(frozen=True)
class FindRequest:
    """A checked ``/tools/find`` body."""

    level: Level
    constraints: list[Constraint]
    expand: bool = False
    limit: int = 0
    since: int = 0
    requested_tags: tuple[str, ...] = ()


def _count(body: dict[str, Any], key: str) -> int:
    value = body.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f'field "{key}" should be an integer, got {json.dumps(value)}')
    if value < 0:
        raise bad_request(f'field "{key}" should be a positive integer, got {value}')
    return value


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise bad_request(f'field "{key}" should be a Boolean (true or false), got {json.dumps(value)}')
    return value


def parse_request(body: Any, case_sensitive_default: bool = False) -> FindRequest:
    """Check a body as Orthanc does (same field names and rules), raising a 400 that names the field at fault.

    A missing ``Query`` is an empty query, as Orthanc lets it through; one that is not an object is refused.
    """
    if not isinstance(body, dict):
        raise bad_request(f"the body must contain a JSON object with {', '.join(_FIELDS)}")
    if "Level" not in body:
        raise bad_request('field "Level" is missing (Patient, Study, Series or Instance)')
    if not isinstance(body["Level"], str):
        raise bad_request(f'field "Level" should be a string, got {json.dumps(body["Level"])}')
    try:
        level = parse_level(body["Level"])
    except ValueError as exc:
        raise bad_request(f'field "Level": {exc}') from None
    query = body.get("Query", {})
    if not isinstance(query, dict):
        raise bad_request(f'field "Query" should be a JSON object {{tag: value}}, got {json.dumps(query)}')
    expand = _flag(body, "Expand", False)
    case_sensitive = _flag(body, "CaseSensitive", case_sensitive_default)
    limit, since = _count(body, "Limit"), _count(body, "Since")
    requested = body.get("RequestedTags", [])
    if not isinstance(requested, list) or not all(isinstance(t, str) for t in requested):
        raise bad_request(f'field "RequestedTags" should be a list of tag names, got {json.dumps(requested)}')
    keywords = []
    for name in requested:
        tag, keyword, _ = resolve_tag(name)  # UnknownQueryTag: 400 naming it
        if not keyword:
            raise UnknownQueryTag(f"RequestedTags: {name!r} ({tag}) has no keyword the index could keep")
        keywords.append(keyword)
    constraints = parse_query(query, case_sensitive=case_sensitive)  # QueryError: 400 naming the tag
    return FindRequest(level, constraints, expand, limit, since, tuple(keywords))


def _cap(cfg: Config, level: Level) -> int:
    """Orthanc's ``LimitFindInstances`` (instance level) or ``LimitFindResults`` (others), 0 when not set."""
    key = "LimitFindInstances" if level is Level.INSTANCE else "LimitFindResults"
    value = cfg.values.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def run(archive: Archive, cfg: Config, raw: bytes) -> list[Any]:
    """Parse, check and answer one request (in a worker thread: the index is read synchronously)."""
    req = parse_request(parse_json(raw), bool(cfg.values.get("CaseSensitivePN", False)))
    with archive.db.connection_context():
        rows = find(archive.db, req.level, req.constraints, since=req.since, limit=req.limit,
                    max_results=_cap(cfg, req.level))  # fmt: skip
        if not req.expand:
            return [row.public_id for row in rows]
        out = []
        for row in rows:
            item = describe(row)
            if req.requested_tags:
                tags = inherited_tags(row)
                item["RequestedTags"] = {k: tags[k] for k in req.requested_tags if k in tags}
            out.append(item)
        return out


@router.post("/tools/find", summary="Resources of one level whose DICOM tags match a C-FIND-like query")
async def tools_find(request: Request) -> Any:
    app = request.app
    return await run_in_threadpool(run, app.state.archive, app.state.cfg, await request.body())
