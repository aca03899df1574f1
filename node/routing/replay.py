"""``dicom-node replay --study UID --rule R``: queue a stored study for a rule again (the rule's filter applies).

Rows that exist already (delivered, dead or pending) start afresh, so a replay sends every instance once more
through the rule's actions, with the project's pseudonyms: the receiving end gets the same new UIDs again.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.archive.db import write_transaction
from node.archive.models import Instance, Series, Study, utcnow
from node.archive.outbox import enqueue
from node.archive.store import Archive
from node.routing.rules import Route
from node.routing.stable import route_instance


@dataclass(frozen=True, slots=True)
class Replayed:
    instances: int  # instances of the study
    queued: int  # outbox rows (instances by destinations) queued
    filtered_out: int  # instances the rule's filter (or their origin) excludes


def replay(archive: Archive, route: Route, study_uid: str) -> Replayed:
    db = archive.db
    with db.connection_context():
        instances = list(
            Instance.select(Instance.public_id, Instance.file_uuid, Instance.remote_aet, Instance.called_aet,
                            Instance.remote_ip, Instance.origin, Study.public_id.alias("study_public_id"))
            .join(Series).join(Study)
            .where(Study.study_uid == study_uid.strip())
            .order_by(Instance.id)
            .objects()
        )  # fmt: skip
        plan = [(i, route_instance(archive, i, [route], route.trigger)) for i in instances]
        now = utcnow()
        with write_transaction(db):
            queued = sum(enqueue(db, i.public_id, i.study_public_id, d, now) for i, d in plan if d)
    return Replayed(len(instances), queued, sum(1 for _, d in plan if not d))
