"""The routing workers: claim outbox rows, transform each instance with its rule, C-STORE it, record the outcome.

``serve`` runs ``RoutingWorkers`` of these processes (restarted when one dies; its rows are released at once).
Each works one destination at a time over one association that it keeps while there is work for that
destination, so a destination gets at most ``RoutingAssociationsPerDestination`` parallel associations. Worker
0 also runs the stable-series/study scheduler and the housekeeping (expired leases, old delivered rows).

Every transition is one structured log event with the rule, the destination, the instance and the attempt:
``queued`` (by the receiver or the scheduler), ``sent``, ``retry`` (with the delay), ``dead``.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import config as pydicom_config

from node import logs
from node.archive import outbox
from node.archive.models import Instance, utcnow
from node.archive.store import Archive, Origin, delete_instance, store
from node.config import Config, Modality
from node.dicom.errors import RequestError
from node.dicom.fileio import NotDicom, Truncated
from node.dicom.maintags import MalformedDataset, read_index_tags
from node.net.forward import AssociationFailed, Connection, Outgoing, quiet_pynetdicom
from node.net.scu import Target
from node.routing import stable
from node.routing.rules import ARCHIVE, Route
from node.routing.transform import Result, Transformer, discard

log = logs.get("dicom-node.routing")

#: An idle worker looks for work this often (rows queued by a receiver are picked up within this delay).
POLL_S = 0.05
#: A partial batch is claimed once its oldest row has waited this long (a full one at once).
LINGER_S = 0.3
#: An association with nothing to send is released after this long.
IDLE_RELEASE_S = 5.0
SCHEDULER_EVERY_S = 1.0
DONE_RETENTION = dt.timedelta(days=7)
#: Errors that no retry can cure: the row is dead at once.
PERMANENT = (RequestError, NotDicom, Truncated, MalformedDataset)


def worker_prefix(cfg: Config) -> str:
    """Claims are named ``<node name>@<host>/<slot>:<pid>``: the node's own at start, a process' when it dies."""
    return f"{cfg['Name']}@{socket.gethostname()}/"


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
    last_used: dict[str, float] = field(default_factory=dict)

    @property
    def db(self):  # type: ignore[no-untyped-def]
        return self.archive.db

    # -- one round ----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Claim and carry out one batch; False when there was nothing to do."""
        prefer = max(self.last_used, key=self.last_used.__getitem__) if self.last_used else None
        if not outbox.worth_claiming(self.db, self.cfg["RoutingBatchSize"], LINGER_S):
            self._release_idle()
            return False
        batch = outbox.claim(
            self.db, self.name, lease_s=self.cfg["RoutingLeaseTimeout"], limit=self.cfg["RoutingBatchSize"],
            max_per_destination=self.cfg["RoutingAssociationsPerDestination"], prefer=prefer,
        )  # fmt: skip
        if not batch:
            self._release_idle()
            return False
        destination = batch[0].destination
        rows = {r.public_id: r for r in Instance.select().where(Instance.public_id.in_([d.instance for d in batch]))}
        work: list[tuple[outbox.Delivery, Instance, Route]] = []
        for d in batch:
            route = self.routes.get(d.rule)
            if route is None:
                self._failed([d], f"rule {d.rule!r} is no longer in the configuration", None, final=True)
            elif d.instance not in rows:
                self._failed([d], "the instance is no longer in the archive", None, final=True)
            elif destination != ARCHIVE and destination not in self.modalities:
                self._failed([d], f"destination {destination!r} is no longer in DicomModalities", None, final=True)
            else:
                work.append((d, rows[d.instance], route))
        if work:
            try:
                if destination == ARCHIVE:
                    self._store_locally(work)
                else:
                    self._forward(destination, work)
            finally:
                self.transformer.flush()
        self.last_used[destination] = time.monotonic()
        return True

    # -- forwarding ---------------------------------------------------------------------------------------
    def _prepare(
        self, work: list[tuple[outbox.Delivery, Instance, Route]]
    ) -> list[tuple[outbox.Delivery, Instance, Outgoing, Result | None]]:
        """Transform the whole batch before connecting: the CPU work of one worker then overlaps the sending of
        another (a destination that takes one association at a time keeps the others waiting, not idle)."""
        ready = []
        for d, row, route in work:
            source = self.archive.storage.locate(row.file_uuid)
            try:
                if route.transforms:
                    result = self.transformer.run(route, source)
                    ready.append((d, row, Outgoing(result.path, result.sop_class, result.transfer_syntax), result))
                else:
                    ready.append((d, row, Outgoing(source, row.sop_class_uid, row.transfer_syntax), None))
            except PERMANENT as exc:
                self._failed([d], f"{route.name}: {exc}", None, final=True)
            except Exception as exc:  # noqa: BLE001 - a file we cannot read now may be readable later
                self._failed([d], f"{route.name}: {type(exc).__name__}: {exc}", None)
        return ready

    def _forward(self, destination: str, work: list[tuple[outbox.Delivery, Instance, Route]]) -> None:
        ready = self._prepare(work)
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
            conn.ensure([item for _, _, item, _ in ready])
        except (AssociationFailed, OSError, ValueError) as exc:
            conn.close()
            outcomes = self._failed([d for d, *_ in ready], str(exc), None)
            later = min((o.next_attempt for o in outcomes if o.next_attempt), default=None)
            if later is not None:
                outbox.postpone(self.db, destination, later)  # the rest of its queue waits too
            return
        done: list[outbox.Delivery] = []
        notes: dict[tuple[int | None, str], list[int]] = {}
        lease_s = self.cfg["RoutingLeaseTimeout"]
        renewed = time.monotonic()
        try:
            for i, (d, row, item, result) in enumerate(ready):
                if time.monotonic() - renewed > lease_s / 3:
                    outbox.renew(self.db, [r[0].id for r in ready[i:]], lease_s)
                    renewed = time.monotonic()
                t0 = time.perf_counter()
                sent = conn.send(item, self._converter())
                if sent.ok:
                    done.append(d)
                    notes.setdefault((sent.status, sent.error), []).append(d.id)
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
            for (status, note), ids in notes.items():
                outbox.mark_done(self.db, ids, status, note)
        routes = self.routes
        self._delete_sources([(d, routes[d.rule]) for d in done])

    def _connection(self, destination: str) -> Connection:
        conn = self.connections.get(destination)
        if conn is None:
            m = self.modalities[destination]
            conn = Connection(Target(m.aet, m.host, m.port), self.cfg["DicomAet"],
                              timeout=float(self.cfg["DicomScpTimeout"]))  # fmt: skip
            self.connections[destination] = conn
        return conn

    def _converter(self) -> Callable[[Outgoing, str], Path]:
        def convert(item: Outgoing, syntax: str) -> Path:
            return self.transformer.convert(item.path, syntax).path

        return convert

    def _release_idle(self) -> None:
        now = time.monotonic()
        for dest, conn in self.connections.items():
            if conn.is_open and now - self.last_used.get(dest, 0) > IDLE_RELEASE_S:
                conn.close()

    # -- storing into our own archive (a rule without Forward) -------------------------------------------
    def _store_locally(self, work: list[tuple[outbox.Delivery, Instance, Route]]) -> None:
        done = []
        for d, row, route in work:
            result = None
            try:
                result = self.transformer.run(route, self.archive.storage.locate(row.file_uuid))
                spool = self.archive.storage.new_spool()
                with open(result.path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        spool.write(chunk)
                try:
                    tags = read_index_tags(spool.name)
                except MalformedDataset:
                    spool.close()
                    self.archive.storage.discard_spool(spool.uuid)
                    raise
                stored = store(self.archive, spool, tags, Origin(stable.ROUTING_ORIGIN))
            except PERMANENT as exc:
                self._failed([d], f"{route.name}: {exc}", None, final=True)
                continue
            except Exception as exc:  # noqa: BLE001 - disk or database: retried
                self._failed([d], f"{route.name}: {type(exc).__name__}: {exc}", None)
                continue
            finally:
                if result is not None:
                    discard(result.path)
            outbox.mark_done(self.db, [d.id], 0, stored.status)
            log.info("sent", rule=d.rule, destination=ARCHIVE, instance=d.instance, study=d.study,
                     new_instance=stored.ids.instance, status=stored.status, attempt=d.attempts + 1)  # fmt: skip
            done.append((d, route))
        self._delete_sources(done)

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

    def _delete_sources(self, done: list[tuple[outbox.Delivery, Route]]) -> None:
        for d, route in done:
            if (route.delete_source and outbox.open_for_instance(self.db, d.instance) == 0
                    and delete_instance(self.archive, d.instance)):  # fmt: skip
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


class Stop:
    """What the worker loop polls (a :class:`node.serve.StopFlag`)."""

    def is_set(self) -> bool:  # pragma: no cover - protocol
        raise NotImplementedError

    def wait(self, timeout: float) -> bool:  # pragma: no cover - protocol
        raise NotImplementedError


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
                worker.close()
                busy = False
                stop.wait(1.0)
            if not busy:
                stop.wait(POLL_S)
    finally:
        worker.close()


def housekeeping(cfg: Config, archive: Archive) -> None:
    """Fire stable triggers, reclaim expired leases, forget old delivered rows. Errors are logged, not fatal."""
    try:
        stable.fire(archive, cfg.routes, cfg["StableAge"], on_queued=_log_queued)
        reclaimed = outbox.reclaim_expired(archive.db)
        if reclaimed:
            log.warning("leases expired; rows pending again", rows=reclaimed)
        outbox.prune_done(archive.db, utcnow() - DONE_RETENTION)
    except Exception as exc:
        log.exception("routing scheduler error", error=str(exc))


def _log_queued(rule: str, destination: str, instance: str, study: str) -> None:
    log.info("queued", rule=rule, destination=destination, instance=instance, study=study)
