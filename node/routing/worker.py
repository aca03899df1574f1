"""The routing workers: claim outbox rows, transform each instance with its rule, C-STORE it, record the outcome.

``serve`` runs ``RoutingWorkers`` of these processes (restarted when one dies; its rows are released at once).
Each claims a batch of one destination, transforms it, then sends it over one association released after the
batch; a destination gets at most ``RoutingAssociationsPerDestination`` parallel associations. Worker
0 also runs the stable-series/study scheduler and the housekeeping (expired leases, old delivered rows).

Every transition is one structured log event with the rule, the destination, the instance and the attempt:
``queued`` (by the receiver or the scheduler), ``sent``, ``retry`` (with the delay), ``dead``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom import config as pydicom_config
from pydicom.errors import InvalidDicomError

from node import logs
from node.archive import modalities, outbox
from node.archive.db import reset_if_broken
from node.archive.models import Instance, utcnow
from node.archive.store import Archive, Origin, delete_instance, store
from node.config import Config, Modality
from node.dicom.errors import RequestError
from node.dicom.fileio import NotDicom, Truncated
from node.dicom.maintags import MalformedDataset, read_index_tags
from node.net.forward import AssociationFailed, Connection, Outgoing, quiet_pynetdicom
from node.net.scu import Target, inspect
from node.routing import stable
from node.routing.rules import ARCHIVE, Route
from node.routing.transform import Result, Transformer, discard

log = logs.get("dicom-node.routing")

#: An idle worker looks for work this often (rows queued by a receiver are picked up within this delay).
POLL_S = 0.05
#: A partial batch is claimed once its oldest row has waited this long (a full one at once).
LINGER_S = 0.3
SCHEDULER_EVERY_S = 1.0
DONE_RETENTION = dt.timedelta(days=7)
#: Errors that no retry can cure: the row is dead at once.
PERMANENT = (RequestError, NotDicom, Truncated, MalformedDataset)


def worker_prefix(cfg: Config) -> str:
    """Claims are named ``<node id>/<slot>:<pid>``: the node's own at start, a process' when it dies (the node
    ID, ``NodeId`` or ``<Name>@<host>``, tells the nodes sharing an index apart)."""
    return f"{cfg.node_id[:100]}/"  # (the column holds 128 characters)


@dataclass
class Worker:
    cfg: Config
    archive: Archive
    name: str
    routes: dict[str, Route]
    modalities: dict[str, Modality]
    transformer: Transformer
    policy: outbox.RetryPolicy
    connections: dict[str, Connection] = field(default_factory=dict)

    @property
    def stable_rules(self) -> bool:
        return any(r.trigger != "Instance" for r in self.routes.values())

    @property
    def db(self):  # type: ignore[no-untyped-def]
        return self.archive.db

    # -- one round ----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Claim and carry out one batch; False when there was nothing to do."""
        if not outbox.worth_claiming(self.db, self.cfg["RoutingBatchSize"], LINGER_S):
            return False
        batch = outbox.claim(
            self.db, self.name, lease_s=self.cfg["RoutingLeaseTimeout"], limit=self.cfg["RoutingBatchSize"],
            max_per_destination=self.cfg["RoutingAssociationsPerDestination"],
        )  # fmt: skip
        if not batch:
            return False
        destination = batch[0].destination
        modality = None if destination == ARCHIVE else self._modality(destination)
        rows = {r.public_id: r for r in Instance.select().where(Instance.public_id.in_([d.instance for d in batch]))}
        work: list[tuple[outbox.Delivery, Instance, Route]] = []
        for d in batch:
            route = self.routes.get(d.rule)
            if route is None:
                self._failed([d], f"rule {d.rule!r} is no longer in the configuration", None, final=True)
            elif d.instance not in rows:
                self._failed([d], "the instance is no longer in the archive", None, final=True)
            elif destination != ARCHIVE and modality is None:
                self._failed([d], f"destination {destination!r} is no longer in DicomModalities", None, final=True)
            else:
                work.append((d, rows[d.instance], route))
        try:
            if work and destination == ARCHIVE:
                self._store_locally(work)
            elif work:
                self._forward(destination, work)
        except Exception as exc:
            # Whatever escaped (a database error, a pynetdicom surprise): the rows still held by this claim get
            # an attempt counted, so a failure that repeats ends dead instead of looping lease after lease.
            log.exception("routing batch failed", destination=destination, error=str(exc))
            with contextlib.suppress(Exception):
                self._failed(outbox.held(self.db, batch), f"{type(exc).__name__}: {exc}", None)
        return True

    # -- forwarding ---------------------------------------------------------------------------------------
    def _prepare(
        self, work: list[tuple[outbox.Delivery, Instance, Route]]
    ) -> list[tuple[outbox.Delivery, Instance, Outgoing, Result | None]]:
        """Transform the whole batch before connecting: the CPU work of one worker then overlaps the sending of
        another (a destination that takes one association at a time keeps the others waiting, not idle)."""
        ready = []
        lease_s = self.cfg["RoutingLeaseTimeout"]
        renewed = time.monotonic()
        for i, (d, row, route) in enumerate(work):
            if time.monotonic() - renewed > lease_s / 3:  # transcoding a large batch takes a while
                outbox.renew(self.db, [w[0] for w in work[i:]], lease_s)
                renewed = time.monotonic()
            source = self.archive.storage.locate(row.file_uuid)
            try:
                if route.transforms:
                    result = self.transformer.run(route, source)
                    ready.append((d, row, Outgoing(result.path, result.sop_class, result.transfer_syntax), result))
                else:  # sent as stored: its own file meta says what it is (what pynetdicom will look up)
                    meta = inspect(source)
                    ready.append((d, row, Outgoing(source, meta.sop_class, meta.transfer_syntax), None))
            except (*PERMANENT, InvalidDicomError) as exc:
                self._failed([d], f"{route.name}: {exc}", None, final=True)
            except Exception as exc:  # noqa: BLE001 - a file we cannot read now may be readable later
                self._failed([d], f"{route.name}: {type(exc).__name__}: {exc}", None)
        return ready

    def _forward(self, destination: str, work: list[tuple[outbox.Delivery, Instance, Route]]) -> None:
        ready = self._prepare(work)
        self.transformer.flush()  # the pairs are on record before any pseudonym leaves the node
        try:
            if ready:
                self._send(destination, ready)
        finally:
            for *_, result in ready:
                if result is not None:
                    discard(result.path)

    def _send(self, destination: str, ready: list[tuple[outbox.Delivery, Instance, Outgoing, Result | None]]) -> None:
        """One association for the batch; done rows are recorded together (one commit, not one per instance)."""
        conn = self._connection(destination)
        try:
            conn.open([item for _, _, item, _ in ready])
        except (AssociationFailed, OSError, ValueError) as exc:
            conn.close()
            outcomes = self._failed([d for d, *_ in ready], str(exc), None)
            later = min((o.next_attempt for o in outcomes if o.next_attempt), default=None)
            if later is not None:
                outbox.postpone(self.db, destination, later)  # the rest of its queue waits too
            return
        notes: dict[tuple[int | None, str], list[outbox.Delivery]] = {}
        lease_s = self.cfg["RoutingLeaseTimeout"]
        renewed = time.monotonic()
        try:
            for i, (d, row, item, result) in enumerate(ready):
                if time.monotonic() - renewed > lease_s / 3:
                    outbox.renew(self.db, [r[0] for r in ready[i:]], lease_s)
                    renewed = time.monotonic()
                t0 = time.perf_counter()
                sent = conn.send(item, self._converter())
                if sent.ok:
                    notes.setdefault((sent.status, sent.error), []).append(d)
                    log.info("sent", rule=d.rule, destination=destination, instance=d.instance, study=d.study,
                             sop_instance_uid=result.sop_uid if result else row.sop_uid, attempt=d.attempts + 1,
                             status=f"0x{sent.status or 0:04X}", transfer_syntax=sent.transfer_syntax,
                             ms=round((time.perf_counter() - t0) * 1000, 1))  # fmt: skip
                    continue
                self._failed([d], sent.error, sent.status)
                if sent.association_lost:
                    rest = [r[0] for r in ready[i + 1 :]]
                    if rest:
                        self._failed(rest, f"association with {conn.target} lost", None)
                    break
        finally:
            conn.close()  # released after each batch: another worker may be waiting for this destination
            recorded: list[outbox.Delivery] = []
            for (status, note), delivered in notes.items():
                ids = set(outbox.mark_done(self.db, delivered, status, note))
                recorded += [d for d in delivered if d.id in ids]
        self._delete_sources(recorded)

    def _modality(self, name: str) -> Modality | None:
        """Resolved before each batch (configuration, overridden by the index): a modality repointed over REST
        (``PUT /modalities/{name}``) takes effect at the next batch, in every worker process."""
        found = modalities.lookup(self.cfg, self.db, name)
        if found is not None:
            self.modalities[name] = found
        return found

    def _connection(self, destination: str) -> Connection:
        m = self.modalities[destination]
        target = Target(m.aet, m.host, m.port)
        conn = self.connections.get(destination)
        if conn is None or conn.target != target:
            if conn is not None:
                conn.close()
            conn = Connection(target, self.cfg["DicomAet"], timeout=float(self.cfg["DicomScpTimeout"]))
            self.connections[destination] = conn
        return conn

    def _converter(self) -> Callable[[Outgoing, str], Path]:
        def convert(item: Outgoing, syntax: str) -> Path:
            return self.transformer.convert(item.path, syntax).path

        return convert

    # -- storing into our own archive (a rule without Forward) -------------------------------------------
    def _store_locally(self, work: list[tuple[outbox.Delivery, Instance, Route]]) -> None:
        recorded: list[outbox.Delivery] = []
        for d, row, route in work:
            result = None
            spool = None
            try:
                result = self.transformer.run(route, self.archive.storage.locate(row.file_uuid))
                self.transformer.flush()
                spool = self.archive.storage.new_spool()
                with open(result.path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        spool.write(chunk)
                stored = store(self.archive, spool, read_index_tags(spool.name), Origin(stable.ROUTING_ORIGIN))
                spool = None  # the archive's now
            except PERMANENT as exc:
                self._failed([d], f"{route.name}: {exc}", None, final=True)
                continue
            except Exception as exc:  # noqa: BLE001 - disk or database: retried
                self._failed([d], f"{route.name}: {type(exc).__name__}: {exc}", None)
                continue
            finally:
                if spool is not None:
                    spool.close()
                    self.archive.storage.discard_spool(spool.uuid)
                if result is not None:
                    discard(result.path)
            if not outbox.mark_done(self.db, [d], 0, stored.status):
                continue
            log.info("sent", rule=d.rule, destination=ARCHIVE, instance=d.instance, study=d.study,
                     new_instance=stored.ids.instance, status=stored.status, attempt=d.attempts + 1)  # fmt: skip
            if stored.ids.instance != d.instance:  # a copy that kept every identifier *is* the source
                recorded.append(d)
        self._delete_sources(recorded)

    # -- outcomes -----------------------------------------------------------------------------------------
    def _failed(
        self, deliveries: list[outbox.Delivery], error: str, status: int | None, final: bool = False
    ) -> list[outbox.FailureOutcome]:
        policy = outbox.RetryPolicy(1) if final else self.policy
        outcomes = outbox.mark_failed(self.db, deliveries, error, status, policy)
        now = utcnow()
        for o in outcomes:
            d = o.delivery
            code = None if status is None else f"0x{status:04X}"
            fields = dict(rule=d.rule, destination=d.destination, instance=d.instance, study=d.study,
                          attempt=o.attempts, error=error, status=code)  # fmt: skip
            if o.dead:
                log.error("dead", **fields)
            else:
                delay = (o.next_attempt - now).total_seconds() if o.next_attempt else 0.0
                log.warning("retry", retry_in_s=round(delay, 1), **fields)
        return outcomes

    def _delete_sources(self, recorded: list[outbox.Delivery]) -> None:
        """Delete a source once a rule that asks for it has delivered it and nothing else is owed for it: no
        open row of any rule, and no stable-trigger rule still to fire for its series or study (the delivery
        that completes the set may be another rule's)."""
        deleting = {r.name for r in self.routes.values() if r.delete_source}
        if not deleting:
            return
        for d in {d.instance: d for d in recorded}.values():
            if not outbox.delivered_by(self.db, d.instance, deleting):
                continue
            if self.stable_rules and stable.awaiting(d.instance):
                continue
            if delete_instance(self.archive, d.instance, unless_queued=True):
                log.info("source deleted", rule=d.rule, instance=d.instance, study=d.study)

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()


def _output_syntax(row: Instance, route: Route) -> str:
    target = None
    for mod in (route.anonymize, route.modify):
        if mod is not None and mod.transcode:
            target = mod.transcode
    return target or row.transfer_syntax


class Stop(Protocol):
    """What the worker loop polls (a :class:`node.serve.StopFlag`)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...


def run(cfg: Config, archive: Archive, stop: Stop, slot: str, scheduler: bool) -> None:
    """The loop of one worker process until ``stop`` is set."""
    quiet_pynetdicom()
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    archive.db.connect(reuse_if_open=True)
    worker = Worker(
        cfg=cfg, archive=archive, name=f"{worker_prefix(cfg)}{slot}:{os.getpid()}",
        routes={r.name: r for r in cfg.routes}, modalities={m.name: m for m in cfg.modalities},
        transformer=Transformer(archive.db, archive.storage.tmp),
        policy=outbox.RetryPolicy(cfg["RoutingMaxAttempts"], float(cfg["RoutingRetryDelay"]),
                                  float(cfg["RoutingRetryMaxDelay"])),
    )  # fmt: skip
    next_schedule = 0.0
    try:
        while not stop.is_set():
            if scheduler and time.monotonic() >= next_schedule:
                next_schedule = time.monotonic() + SCHEDULER_EVERY_S
                housekeeping(cfg, archive)
            try:
                busy = worker.step()
            except Exception as exc:
                log.exception("routing worker error", error=str(exc))
                reset_if_broken(archive.db)  # a database restart: the next step reconnects
                worker.close()
                busy = False
                stop.wait(1.0)
            if not busy:
                stop.wait(POLL_S)
    finally:
        worker.close()


def housekeeping(cfg: Config, archive: Archive) -> None:
    """Fire stable triggers, reclaim expired leases, forget old delivered rows. Each step on its own: an error
    in one (logged) never stops the others, least of all the reclaim that rescues rows of a hung worker."""
    for what, step in (
        ("stable triggers", lambda: stable.fire(archive, cfg.routes, cfg["StableAge"], on_queued=_log_queued)),
        ("lease reclaim", lambda: _reclaim(archive)),
        ("pruning", lambda: outbox.prune_done(archive.db, utcnow() - DONE_RETENTION)),
    ):
        try:
            step()
        except Exception as exc:
            log.exception("routing scheduler error", step=what, error=str(exc))
            reset_if_broken(archive.db)


def _reclaim(archive: Archive) -> None:
    reclaimed = outbox.reclaim_expired(archive.db)
    if reclaimed:
        log.warning("leases expired; rows pending again", rows=reclaimed)


def _log_queued(rule: str, destination: str, instance: str, study: str) -> None:
    log.info("queued", rule=rule, destination=destination, instance=instance, study=study)
