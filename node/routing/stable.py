"""Stable series and studies: ``StableAge`` seconds without a new instance, as Orthanc declares them.

The receivers flag a series and its study (``stable_pending``) with each instance; the scheduler here finds
flagged ones whose ``last_update`` is old enough, logs Orthanc's ``StableSeries``/``StableStudy`` change and
queues the rules of that trigger for the instances not covered by an earlier firing, all in one transaction.
The flag lives in the index, so a node that restarts still fires for what it received before (Orthanc keeps
this in memory and forgets it). A resource that receives more instances after firing fires again, for the new
instances only.

The firing transaction re-checks ``last_update``: an instance arriving while the rules are evaluated makes the
resource unstable again, and it fires later, with that instance.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peewee import fn

from node.archive.db import write_transaction
from node.archive.models import Change, Instance, Series, Study, utcnow
from node.archive.outbox import enqueue
from node.archive.store import Archive
from node.dicom.maintags import MalformedDataset
from node.logs import get as get_logger
from node.routing import rules

log = get_logger("dicom-node.routing")

#: Origin of what routing itself stores (a rule without Forward): never routed again.
ROUTING_ORIGIN = "Routing"


@dataclass(frozen=True, slots=True)
class Fired:
    trigger: str
    public_id: str
    instances: int
    deliveries: int


def _of(query: Any, level: str, row_id: int, since: dt.datetime | None) -> Any:
    query = query.join(Series).join(Study)
    query = query.where(Series.id == row_id) if level == "Series" else query.where(Study.id == row_id)
    return query.where(Instance.received_at > since) if since is not None else query


def _instances(level: str, row_id: int, since: dt.datetime | None) -> list[Instance]:
    query = Instance.select(
        Instance.public_id, Instance.file_uuid, Instance.received_at, Instance.remote_aet, Instance.called_aet,
        Instance.remote_ip, Instance.origin, Study.public_id.alias("study_public_id"),
    )  # fmt: skip
    return list(_of(query, level, row_id, since).order_by(Instance.id).objects())


def _newest(level: str, row_id: int, since: dt.datetime | None) -> dt.datetime | None:
    value = _of(Instance.select(fn.MAX(Instance.received_at)), level, row_id, since).scalar()
    if isinstance(value, str):  # SQLite gives aggregates back as text
        value = dt.datetime.fromisoformat(value)
    return value


def route_instance(
    archive: Archive, inst: Instance, trigger_rules: Sequence[rules.Route], trigger: str
) -> list[tuple[str, str]]:
    """The deliveries of ``trigger_rules`` for one archived instance (its header read only if a filter needs it)."""
    if inst.origin == ROUTING_ORIGIN:
        return []
    where = rules.Origin(inst.remote_aet, inst.called_aet, inst.remote_ip)
    try:
        return rules.deliveries_for_file(trigger_rules, str(archive.storage.locate(inst.file_uuid)), where, trigger)
    except MalformedDataset as exc:  # stored already: it matches no tag filter, and the log says why
        log.warning("cannot read an instance for the routing filters", instance=inst.public_id, error=str(exc))
        return rules.deliveries(trigger_rules, trigger, None, where)


def fire(
    archive: Archive,
    routes: Sequence[rules.Route],
    stable_age: float,
    now: dt.datetime | None = None,
    on_queued: Callable[[str, str, str, str], None] | None = None,
    limit: int = 100,
) -> list[Fired]:
    """Declare stable what has been quiet for ``stable_age`` seconds; queue the stable-trigger rules."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=stable_age)
    db = archive.db
    fired: list[Fired] = []
    for trigger, model, level in (("StableSeries", Series, "Series"), ("StableStudy", Study, "Study")):
        trigger_rules = [r for r in routes if r.trigger == trigger]
        candidates = list(
            model.select(model.id, model.public_id, model.last_update, model.stable_seen)
            .where(model.stable_pending & (model.last_update <= cutoff))
            .order_by(model.last_update)
            .limit(limit)
        )
        for row in candidates:
            instances = _instances(level, row.id, row.stable_seen) if trigger_rules else []
            plan = [(i, route_instance(archive, i, trigger_rules, trigger)) for i in instances]
            # Covered from now on, routed or not: a rule added later does not resend what came before it.
            newest = (max(i.received_at for i in instances) if instances
                      else _newest(level, row.id, row.stable_seen))  # fmt: skip
            with write_transaction(db):
                still_quiet = (model.id == row.id) & (model.last_update == row.last_update) & model.stable_pending
                changed = (
                    model.update(stable_pending=False, stable_seen=fn.COALESCE(newest, model.stable_seen))
                    .where(still_quiet)
                    .execute()
                )
                if not changed:
                    continue  # a new instance came in meanwhile: not stable yet
                Change.create(change_type=trigger, level=level, public_id=row.public_id, date=now)
                queued = sum(enqueue(db, i.public_id, i.study_public_id, d, now) for i, d in plan if d)
            for inst, dl in plan:
                for rule, destination in dl:
                    if on_queued is not None:
                        on_queued(rule, destination, inst.public_id, inst.study_public_id)
            fired.append(Fired(trigger, row.public_id, len(instances), queued))
            log.info("stable", trigger=trigger, resource=row.public_id, instances=len(instances), queued=queued)
    return fired


def awaiting(instance: str) -> bool:
    """Whether a stable trigger has still to cover this instance (its series or study has not fired since it
    came): a source must not be deleted before a StableSeries/StableStudy rule has seen it."""
    row = (
        Instance.select(Instance.received_at, Series.stable_pending, Series.stable_seen,
                        Study.stable_pending.alias("study_pending"), Study.stable_seen.alias("study_seen"))
        .join(Series).join(Study)
        .where(Instance.public_id == instance)
        .dicts()
        .first()
    )  # fmt: skip
    if row is None:
        return False
    for pending, seen in ((row["stable_pending"], row["stable_seen"]), (row["study_pending"], row["study_seen"])):
        if pending or seen is None or row["received_at"] > seen:
            return True
    return False
