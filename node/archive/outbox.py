"""The routing outbox: one row per (instance, rule, destination), and every state change a row goes through.

The archive owns this table because rows are written in the transaction that stores an instance
(:func:`enqueue`, called by :func:`node.archive.store.store`); :mod:`node.routing` decides what goes in and
works the rows off. States::

    pending ──claim──▶ claimed ──▶ done
       ▲                  │
       └── failed, attempts left (next_attempt = now + backoff)
                          └──▶ dead (after the last attempt; kept until ``retry`` or ``discard``)

A claim is a lease: a row whose worker died is pending again once ``lease_until`` has passed, so delivery is
at-least-once. Claims are made with an ``UPDATE … WHERE state = 'pending'`` guarded by a fresh token, which
is safe with several worker processes and several nodes on one PostgreSQL index; there the rows are first
selected ``FOR UPDATE SKIP LOCKED``, so the workers of several nodes claim disjoint batches without waiting
for each other (on SQLite the write transaction already serialises claims).
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from peewee import Database, fn

from node.archive.db import is_postgres, sql_for, write_transaction
from node.archive.models import Outbox, utcnow

PENDING, CLAIMED, DONE, DEAD = "pending", "claimed", "done", "dead"


@dataclass(frozen=True, slots=True)
class Delivery:
    """A claimed row: what a worker needs to carry it out."""

    id: int
    instance: str
    study: str
    rule: str
    destination: str
    attempts: int  # attempts made before this one
    claim: str = ""  # the claim token: outcomes are recorded only while the row is still this claim's


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``RoutingMaxAttempts`` and the exponential backoff between attempts (seconds)."""

    max_attempts: int = 10
    base_delay: float = 2.0
    max_delay: float = 300.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure: doubling, capped, with "equal jitter" (half fixed,
        half random) so that the rows of one outage do not all come back in the same second."""
        full = min(self.max_delay, self.base_delay * 2 ** max(0, attempts - 1))
        return full / 2 + random.uniform(0, full / 2)


def enqueue(db: Database, instance: str, study: str, deliveries: Iterable[tuple[str, str]], now: dt.datetime) -> int:
    """Queue ``(rule, destination)`` deliveries of one instance; call inside the caller's write transaction.

    A row that exists already (the instance was overwritten, a stable study grew, a replay) starts afresh:
    pending, no attempts, due now.
    """
    sql = sql_for(
        db,
        """INSERT INTO "outbox" (instance, study, rule, destination, state, attempts, next_attempt,
        claimed_by, claim, last_error, created_at, updated_at) VALUES (?, ?, ?, ?, 'pending', 0, ?, '', '', '', ?, ?)
        ON CONFLICT (instance, rule, destination) DO UPDATE SET state = 'pending', attempts = 0,
        next_attempt = excluded.next_attempt, lease_until = NULL, claimed_by = '', claim = '', last_error = '',
        last_status = NULL, created_at = excluded.created_at, updated_at = excluded.updated_at""",
    )
    n = 0
    for rule, destination in deliveries:
        db.execute_sql(sql, (instance, study, rule, destination, now, now, now))
        n += 1
    return n


def reclaim_expired(db: Database, now: dt.datetime | None = None) -> int:
    """Rows whose lease ran out (their worker died or hung) become pending again."""
    now = now or utcnow()
    with write_transaction(db):
        return (
            Outbox.update(state=PENDING, claim="", claimed_by="", lease_until=None, updated_at=now)
            .where((Outbox.state == CLAIMED) & (Outbox.lease_until < now))
            .execute()
        )


def release_claims_of(db: Database, worker_prefix: str) -> int:
    """Rows claimed by workers named ``worker_prefix…`` (this node's, at start; a dead process') are pending
    again at once: nobody else can be working on them."""
    with write_transaction(db):
        return (
            Outbox.update(state=PENDING, claim="", claimed_by="", lease_until=None, updated_at=utcnow())
            .where((Outbox.state == CLAIMED) & Outbox.claimed_by.startswith(worker_prefix))
            .execute()
        )


_WORTH_CLAIMING_SQL = (
    'SELECT "next_attempt" FROM "outbox" WHERE "state" = ? AND "next_attempt" <= ? ORDER BY "next_attempt" LIMIT ?'
)


def worth_claiming(db: Database, batch: int, linger_s: float, now: dt.datetime | None = None) -> bool:
    """A read-only look before a claim: a full batch is due, or the oldest due row has waited ``linger_s``.

    While a study streams in, rows arrive a few at a time; claiming each handful would cost an association, a
    claim and a commit per two or three instances. Waiting a fraction of a second fills the batch instead.
    """
    now = now or utcnow()
    # At most ``batch`` index entries read (index state, next_attempt): a large backlog costs no more per poll.
    # Every idle worker runs this 20 times a second: plain SQL, not a peewee query built per poll (that was
    # 0.4 ms of CPU a poll, 2 % of a core per idle node).
    due = [
        t
        for (t,) in db.execute_sql(
            sql_for(db, _WORTH_CLAIMING_SQL), (PENDING, Outbox.next_attempt.db_value(now), batch)
        ).fetchall()
    ]
    if not due:
        return False
    oldest = dt.datetime.fromisoformat(due[0]) if isinstance(due[0], str) else due[0]
    return len(due) >= batch or (now - oldest).total_seconds() >= linger_s


def claim(
    db: Database,
    worker: str,
    *,
    lease_s: float,
    limit: int,
    max_per_destination: int,
    now: dt.datetime | None = None,
) -> list[Delivery]:
    """Claim up to ``limit`` due rows of one destination, oldest first.

    The destination is the one with the oldest due row, skipping destinations that already have
    ``max_per_destination`` live claims (that is the number of parallel associations a destination gets).
    """
    now = now or utcnow()
    token = str(uuid.uuid4())
    with write_transaction(db):
        busy = dict(
            Outbox.select(Outbox.destination, fn.COUNT(fn.DISTINCT(Outbox.claim)))
            .where((Outbox.state == CLAIMED) & (Outbox.lease_until >= now))
            .group_by(Outbox.destination)
            .tuples()
        )
        due = (Outbox.state == PENDING) & (Outbox.next_attempt <= now)
        candidates = [
            d
            for (d,) in Outbox.select(Outbox.destination).where(due).group_by(Outbox.destination)
            .order_by(fn.MIN(Outbox.id)).tuples()
            if busy.get(d, 0) < max_per_destination
        ]  # fmt: skip
        if not candidates:
            return []
        destination = candidates[0]
        if is_postgres(db):
            # Claims of one destination by several nodes take turns (a short transaction lock), so the count
            # of live claims read under it holds: RoutingAssociationsPerDestination is a limit for the cluster.
            db.execute_sql("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dicom-node-outbox:{destination}",))
            live = (
                Outbox.select(fn.COUNT(fn.DISTINCT(Outbox.claim)))
                .where((Outbox.state == CLAIMED) & (Outbox.lease_until >= now) & (Outbox.destination == destination))
                .scalar()
            )
            if live >= max_per_destination:
                return []
        rows = Outbox.select(Outbox.id).where(due & (Outbox.destination == destination)).order_by(Outbox.id)
        if is_postgres(db):  # rows another node's worker is claiming right now are skipped, not waited for
            rows = rows.for_update("FOR UPDATE SKIP LOCKED")
        ids = [i for (i,) in rows.limit(limit).tuples()]
        if not ids:
            return []
        lease = now + dt.timedelta(seconds=lease_s)
        Outbox.update(state=CLAIMED, claim=token, claimed_by=worker, lease_until=lease, updated_at=now).where(
            Outbox.id.in_(ids) & (Outbox.state == PENDING)
        ).execute()
        rows = Outbox.select().where(Outbox.claim == token).order_by(Outbox.id)
        return [Delivery(r.id, r.instance, r.study, r.rule, r.destination, r.attempts, token) for r in rows]


def held(db: Database, deliveries: Sequence[Delivery]) -> list[Delivery]:
    """The deliveries of a claim that are still claimed by it (what an interrupted batch left unfinished)."""
    if not deliveries:
        return []
    ids = {
        i for (i,) in Outbox.select(Outbox.id).where(
            Outbox.id.in_([d.id for d in deliveries]) & (Outbox.state == CLAIMED)
            & (Outbox.claim == deliveries[0].claim)).tuples()
    }  # fmt: skip
    return [d for d in deliveries if d.id in ids]


def renew(db: Database, deliveries: Sequence[Delivery], lease_s: float) -> None:
    """Extend the lease of rows still being worked on (a long batch, a slow destination)."""
    if not deliveries:
        return
    with write_transaction(db):
        Outbox.update(lease_until=utcnow() + dt.timedelta(seconds=lease_s)).where(
            Outbox.id.in_([d.id for d in deliveries]) & (Outbox.state == CLAIMED)
            & (Outbox.claim == deliveries[0].claim)
        ).execute()  # fmt: skip


def mark_done(db: Database, deliveries: Sequence[Delivery], status: int | None = 0, note: str = "") -> list[int]:
    """Record deliveries; returns the IDs recorded. A row queued again meanwhile (the instance was overwritten,
    a replay) is no longer this claim's: it stays pending, so the newer copy is sent too."""
    if not deliveries:
        return []
    now = utcnow()
    ids = [d.id for d in deliveries]
    with write_transaction(db):
        still_mine = Outbox.id.in_(ids) & (Outbox.state == CLAIMED) & (Outbox.claim == deliveries[0].claim)
        mine = [i for (i,) in Outbox.select(Outbox.id).where(still_mine).tuples()]
        if mine:
            # The conditions again in the UPDATE: on PostgreSQL a row queued again (enqueue) between the SELECT
            # and this UPDATE is re-checked here and stays pending, so its newer copy is still sent.
            done = Outbox.update(state=DONE, attempts=Outbox.attempts + 1, lease_until=None, claim="",
                                 last_status=status, last_error=note, updated_at=now).where(still_mine)  # fmt: skip
            if is_postgres(db):
                mine = [r.id for r in done.returning(Outbox.id).execute()]
            else:
                done.execute()  # (SQLite: the write transaction holds the database since the SELECT)
    return mine


@dataclass(frozen=True, slots=True)
class FailureOutcome:
    delivery: Delivery
    attempts: int
    dead: bool
    next_attempt: dt.datetime | None


def mark_failed(
    db: Database, deliveries: Sequence[Delivery], error: str, status: int | None, policy: RetryPolicy
) -> list[FailureOutcome]:
    """Count one failed attempt per row: pending again after its backoff, or dead after the last attempt."""
    now = utcnow()
    outcomes = []
    with write_transaction(db):
        for d in deliveries:
            attempts = d.attempts + 1
            dead = attempts >= policy.max_attempts
            nxt = None if dead else now + dt.timedelta(seconds=policy.delay(attempts))
            changed = (
                Outbox.update(
                    state=DEAD if dead else PENDING,
                    attempts=attempts,
                    next_attempt=nxt or now,
                    lease_until=None,
                    claim="",
                    claimed_by="",
                    last_status=status,
                    last_error=error[:2000],
                    updated_at=now,
                )
                .where((Outbox.id == d.id) & (Outbox.state == CLAIMED) & (Outbox.claim == d.claim))
                .execute()
            )
            if changed:  # else the row was queued again or reclaimed meanwhile: not this attempt's to record
                outcomes.append(FailureOutcome(d, attempts, dead, nxt))
    return outcomes


def postpone(db: Database, destination: str, until: dt.datetime) -> int:
    """Hold back every pending row of a destination that is down (no attempt counted for them): one refused
    connection tells us about the whole queue, not only about the rows that were in hand."""
    with write_transaction(db):
        return (
            Outbox.update(next_attempt=until)
            .where((Outbox.state == PENDING) & (Outbox.destination == destination) & (Outbox.next_attempt < until))
            .execute()
        )


def _scope(rule: str | None, destination: str | None) -> object:
    cond = Outbox.id.is_null(False)
    if rule is not None:
        cond &= Outbox.rule == rule
    if destination is not None:
        cond &= Outbox.destination == destination
    return cond


def retry(db: Database, rule: str | None = None, destination: str | None = None) -> int:
    """Dead rows (and pending ones waiting out a backoff) are due now, with their attempts reset."""
    now = utcnow()
    with write_transaction(db):
        return (
            Outbox.update(state=PENDING, attempts=0, next_attempt=now, updated_at=now)
            .where(_scope(rule, destination) & ((Outbox.state == DEAD) | (Outbox.state == PENDING)))
            .execute()
        )


def discard(db: Database, rule: str | None = None, destination: str | None = None) -> int:
    """Drop dead rows (the operator gave up on them)."""
    with write_transaction(db):
        return Outbox.delete().where(_scope(rule, destination) & (Outbox.state == DEAD)).execute()


def prune_done(db: Database, older_than: dt.datetime) -> int:
    """Forget delivered rows after a while (the per-destination "done" count covers that window)."""
    with write_transaction(db):
        return Outbox.delete().where((Outbox.state == DONE) & (Outbox.updated_at < older_than)).execute()


def delivered_by(db: Database, instance: str, rules: set[str]) -> bool:
    """Whether one of ``rules`` has delivered this instance."""
    return (
        Outbox.select()
        .where((Outbox.instance == instance) & (Outbox.state == DONE) & Outbox.rule.in_(list(rules)))
        .exists()
    )


@dataclass
class QueueStats:
    destination: str
    pending: int = 0
    in_flight: int = 0
    done: int = 0
    dead: int = 0
    oldest_pending_s: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {"Destination": self.destination, "Pending": self.pending, "InFlight": self.in_flight,
                "Done": self.done, "Dead": self.dead, "OldestPendingSeconds": self.oldest_pending_s}  # fmt: skip


def dead_errors(db: Database, rule: str | None = None, destination: str | None = None) -> list[dict[str, Any]]:
    """The distinct last errors of dead rows, most frequent first (what an operator must fix before a retry)."""
    query = (
        Outbox.select(Outbox.destination, Outbox.rule, Outbox.last_error, fn.COUNT(Outbox.id))
        .where(_scope(rule, destination) & (Outbox.state == DEAD))
        .group_by(Outbox.destination, Outbox.rule, Outbox.last_error)
        .order_by(fn.COUNT(Outbox.id).desc())
    )
    return [{"Destination": d, "Rule": r, "Error": e, "Count": n} for d, r, e, n in query.limit(20).tuples()]


def rules(db: Database) -> list[str]:
    """The rules that have rows (a rule removed from the configuration may still have some)."""
    return [r for (r,) in Outbox.select(Outbox.rule).distinct().order_by(Outbox.rule).tuples()]


def stats(db: Database, rule: str | None = None) -> list[QueueStats]:
    """Per destination: pending, in flight, done, dead, and the age of the oldest undelivered row."""
    now = utcnow()
    by_dest: dict[str, QueueStats] = {}
    query = (
        Outbox.select(Outbox.destination, Outbox.state, fn.COUNT(Outbox.id), fn.MIN(Outbox.created_at))
        .where(_scope(rule, None))
        .group_by(Outbox.destination, Outbox.state)
        .tuples()
    )
    for destination, state, count, oldest in query:
        st = by_dest.setdefault(destination, QueueStats(destination))
        if state == PENDING:
            st.pending = count
        elif state == CLAIMED:
            st.in_flight = count
        elif state == DONE:
            st.done = count
        elif state == DEAD:
            st.dead = count
        if state in (PENDING, CLAIMED) and oldest is not None:
            if isinstance(oldest, str):
                oldest = dt.datetime.fromisoformat(oldest)
            age = round((now - oldest).total_seconds(), 1)
            st.oldest_pending_s = max(st.oldest_pending_s or 0.0, age)
    return sorted(by_dest.values(), key=lambda s: s.destination)
