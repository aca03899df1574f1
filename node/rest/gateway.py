"""The gateway's state over REST: the routing rules with their queues, the outbox, and the operator's levers
(retry, discard, replay). No Orthanc equivalent; the shapes follow Orthanc's conventions (CamelCase keys).

The data are the CLI's (``dicom-node queue show --json``, ``queue retry|discard``, ``replay``), from the same
functions of :mod:`node.archive.outbox` and :mod:`node.routing.replay`, so the two never disagree. The
routing workers run in other processes and pick retried or replayed rows up within a fraction of a second.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from node.archive import outbox
from node.archive.models import Study
from node.rest.body import parse_json
from node.rest.errors import bad_request, unknown_resource
from node.rest.remote import archive, config
from node.routing.replay import replay
from node.routing.rules import Route

router = APIRouter()


def _route(request: Request, name: str) -> Route:
    route = next((r for r in config(request).routes if r.name == name), None)
    if route is None:
        known = ", ".join(r.name for r in config(request).routes) or "none"
        raise unknown_resource(f"no routing rule named {name!r} (rules: {known})")
    return route


def _zero(destination: str) -> dict[str, Any]:
    return outbox.QueueStats(destination).as_dict()


def describe(request: Request, route: Route) -> dict[str, Any]:
    """A rule as configured, its actions in the order they run, and its queue per destination."""
    raw = next((r for r in config(request)["Routes"] if isinstance(r, dict) and r.get("Name") == route.name), {})
    actions = [a for a, on in (("Anonymize", route.anonymize), ("Modify", route.modify)) if on is not None]
    actions.append("Forward" if route.forward else "StoreInArchive")
    if route.delete_source:
        actions.append("DeleteSourceAfterSuccess")
    db = archive(request).db
    with db.connection_context():
        counts = {s.destination: s.as_dict() for s in outbox.stats(db, route.name)}
    queue = [counts.pop(d, None) or _zero(d) for d in route.destinations] + list(counts.values())
    return {"Name": route.name, "Trigger": route.trigger, "Filter": raw.get("Filter", {}), "Actions": actions,
            "Anonymize": route.bodies.get("Anonymize"), "Modify": route.bodies.get("Modify"),
            "Forward": list(route.forward), "Destinations": list(route.destinations),
            "DeleteSourceAfterSuccess": route.delete_source, "Project": route.project,
            "PseudonymKeyFile": route.key_file, "Queue": queue}  # fmt: skip


@router.get("/routes", summary="The routing rules, each with its queue per destination")
def list_routes(request: Request) -> list[dict[str, Any]]:
    return [describe(request, r) for r in config(request).routes]


@router.get("/routes/{name}", summary="One routing rule with its queue per destination")
def get_route(request: Request, name: str) -> dict[str, Any]:
    return describe(request, _route(request, name))


@router.get("/outbox", summary="Outbox counters per destination and per rule, and the errors of dead rows")
def get_outbox(request: Request, rule: str | None = None, destination: str | None = None) -> dict[str, Any]:
    db = archive(request).db
    with db.connection_context():
        stats = [s.as_dict() for s in outbox.stats(db, rule) if destination in (None, s.destination)]
        per_rule = [{"Rule": r, "Destinations": [s.as_dict() for s in outbox.stats(db, r)
                                                 if destination in (None, s.destination)]}
                    for r in outbox.rules(db) if rule in (None, r)]  # fmt: skip
        errors = outbox.dead_errors(db, rule, destination)
    return {"Destinations": stats, "DeadErrors": errors, "Rules": [r for r in per_rule if r["Destinations"]]}


async def _scope(request: Request) -> tuple[str | None, str | None]:
    body = parse_json(await request.body())
    if not isinstance(body, dict):
        raise bad_request('the body must be a JSON object {"Rule": …, "Destination": …} (both optional)')
    rule, destination = body.get("Rule"), body.get("Destination")
    for key, value in (("Rule", rule), ("Destination", destination)):
        if value is not None and (not isinstance(value, str) or not value):
            raise bad_request(f"{key!r} must be a name, got {value!r}")
    if rule is not None and all(r.name != rule for r in config(request).routes):
        db = archive(request).db
        with db.connection_context():
            if rule not in outbox.rules(db):
                raise unknown_resource(f"no routing rule named {rule!r}, configured or in the outbox")
    return rule, destination


@router.post("/outbox/retry", summary="Dead and backed-off rows are due now, attempts reset")
async def retry(request: Request) -> dict[str, int]:
    rule, destination = await _scope(request)
    db = archive(request).db

    def run() -> int:
        with db.connection_context():
            return outbox.retry(db, rule, destination)

    return {"Retried": await run_in_threadpool(run)}


@router.post("/outbox/discard", summary="Drop dead rows")
async def discard(request: Request) -> dict[str, int]:
    rule, destination = await _scope(request)
    db = archive(request).db

    def run() -> int:
        with db.connection_context():
            return outbox.discard(db, rule, destination)

    return {"Discarded": await run_in_threadpool(run)}


@router.post("/routes/{name}/replay", summary="Queue a stored study again for the rule (its filter applies)")
async def replay_study(request: Request, name: str) -> dict[str, Any]:
    route = _route(request, name)
    body = parse_json(await request.body())
    study = body.get("Study") if isinstance(body, dict) else None
    if not isinstance(study, str) or not study.strip():
        raise bad_request('the body must be {"Study": StudyInstanceUID or Orthanc study ID}')
    store = archive(request)

    def run() -> dict[str, Any]:
        with store.db.connection_context():
            row = Study.get_or_none(Study.public_id == study.strip())
        uid = row.study_uid if row is not None else study.strip()
        result = replay(store, route, uid)
        if result.instances == 0:
            raise unknown_resource(f"no stored study has StudyInstanceUID or ID {study!r}")
        return {"Rule": route.name, "StudyInstanceUID": uid, "Instances": result.instances,
                "Queued": result.queued, "FilteredOut": result.filtered_out}  # fmt: skip

    return await run_in_threadpool(run)
