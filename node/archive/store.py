"""Storing one received instance: file durable, index committed, file published — then and only then Success.

Duplicates follow Orthanc (spec §6.2): with ``OverwriteInstances`` false the first copy is kept and the answer is
``AlreadyStored``; with true the new file replaces the old one and the index row is updated in the same
transaction, the old file being unlinked only after the commit (through the ``Garbage`` table, so a crash in
between never loses the one copy that the index points to).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from peewee import Database, IntegrityError, InterfaceError, OperationalError

from node.archive.db import is_postgres, is_transient, open_index, reset_if_broken, sql_for, write_transaction
from node.archive.models import Change, Garbage, Instance, Metadata, Outbox, Patient, Series, Study, utcnow
from node.archive.outbox import enqueue
from node.archive.storage import FileStorage, SpoolFile, Storage
from node.dicom.ids import ResourceIds, resource_ids
from node.dicom.maintags import IndexTags
from node.logs import get as get_logger

StoreStatus = Literal["Success", "AlreadyStored"]
log = get_logger("dicom-node.store")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an instance came from (Orthanc's instance metadata RemoteAET, CalledAET, RemoteIP, Origin)."""

    origin: str = "DicomProtocol"
    remote_aet: str = ""
    called_aet: str = ""
    remote_ip: str = ""


@dataclass(frozen=True, slots=True)
class StoreResult:
    status: StoreStatus
    ids: ResourceIds
    path: Path
    size: int
    replaced: bool = False  # an indexed copy was overwritten (OverwriteInstances): the ID existed before


@dataclass
class Archive:
    """The storage area and its index, as every front end (SCP, REST, CLI) uses them."""

    db: Database
    storage: Storage
    overwrite: bool = False
    #: Parent rows this process stored recently: series public ID -> (series row id, study row id, last
    #: touch). Most instances belong to a series stored a moment ago, so the hot path skips the parent lookups;
    #: the instance INSERT re-checks the series row (id *and* public ID), so a stale entry only costs a retry.
    series_cache: dict[str, tuple[int, int, float]] = field(default_factory=dict)

    def close(self) -> None:
        self.db.close()


def open_archive(
    database_url: str, storage_dir: Path, overwrite: bool = False, sync: bool = True, slot: str = "0"
) -> Archive:
    """Open (and if needed create) the archive. Crash recovery is separate: see :func:`recover`.

    One archive per process: the peewee models are bound to it (a second call rebinds them).
    """
    db = open_index(database_url)
    return Archive(db=db, storage=FileStorage(storage_dir, sync=sync, slot=slot), overwrite=overwrite)


def recover(archive: Archive, slots: list[str] | None = None) -> tuple[int, int, int]:
    """Finish what a crash interrupted: publish indexed spool files, drop the rest, unlink garbage.

    Only the process that owns the storage area may call this: for all receivers before any runs, or for the
    ``slots`` of receivers that died (their spool folders are theirs alone).
    """
    storage = archive.storage
    with archive.db.connection_context():

        def indexed(uuids: list[str]) -> set[str]:
            found: set[str] = set()
            for i in range(0, len(uuids), 500):
                chunk = uuids[i : i + 500]
                found.update(
                    r.file_uuid for r in Instance.select(Instance.file_uuid).where(Instance.file_uuid.in_(chunk))
                )
            return found

        finished, dropped = storage.recover(indexed, slots)
        garbage = [g.file_uuid for g in Garbage.select()]
        for uuid in garbage:
            storage.delete(uuid)
        if garbage:
            Garbage.delete().where(Garbage.file_uuid.in_(garbage)).execute()
    return finished, dropped, len(garbage)


def _index_in_series(tags: IndexTags) -> int | None:
    raw = tags.instance.get("InstanceNumber") or tags.instance.get("ImageIndex") or ""
    try:
        return int(raw.strip())
    except ValueError:
        return None


_SERIES_CACHE_MAX = 4096
#: Index transactions of one instance tried at most this often when they lose a race (unique key, deadlock).
_MAX_ATTEMPTS = 6


class _StaleCache(Exception):
    """The cached series row is gone: roll back and redo the transaction without the cache."""


#: ``last_update`` (what StableAge measures) is refreshed at most this often per series.
_TOUCH_EVERY_S = 1.0

_INSTANCE_COLUMNS = (
    "public_id", "series_id", "sop_uid", "main_tags", "file_uuid", "file_size", "file_sha256",
    "transfer_syntax", "sop_class_uid", "index_in_series", "origin", "remote_aet", "called_aet", "remote_ip",
    "received_at",
)  # fmt: skip


def _parents(
    archive: Archive, ids: ResourceIds, tags: IndexTags, now: dt.datetime, use_cache: bool
) -> tuple[int, list[tuple[str, str, str]]]:
    """Row id of the instance's series (created with its study and patient if new) and the changes to log."""
    db, cache = archive.db, archive.series_cache
    mono = time.monotonic()
    cached = cache.get(ids.series) if use_cache else None
    if cached is not None:
        series_id, study_id, touched = cached
        if mono - touched >= _TOUCH_EVERY_S:
            # Rows are locked top-down on every path (patient, study, series, instance): concurrent receivers
            # of several nodes then queue instead of deadlocking (PostgreSQL).
            touch = "SET last_update = ?, stable_pending = ? WHERE id = ?"
            db.execute_sql(sql_for(db, f'UPDATE "study" {touch}'), (now, True, study_id))
            db.execute_sql(sql_for(db, f'UPDATE "series" {touch}'), (now, True, series_id))
            cache[ids.series] = (series_id, study_id, mono)
        return series_id, []
    changes: list[tuple[str, str, str]] = []
    series = Series.get_or_none(Series.public_id == ids.series)
    if series is not None:
        Study.update(last_update=now, stable_pending=True).where(Study.id == series.study_id).execute()
        Series.update(last_update=now, stable_pending=True).where(Series.id == series.id).execute()
        series_id, study_id = series.id, series.study_id
    else:
        study = Study.get_or_none(Study.public_id == ids.study)
        if study is None:
            patient = Patient.get_or_none(Patient.public_id == ids.patient)
            if patient is None:
                patient = Patient.create(public_id=ids.patient, patient_id=tags.patient_id,
                                         patient_name=tags.patient.get("PatientName", ""),
                                         main_tags=json.dumps(tags.patient), last_update=now)  # fmt: skip
                changes.append(("NewPatient", "Patient", ids.patient))
            else:
                Patient.update(last_update=now).where(Patient.id == patient.id).execute()
            study = Study.create(public_id=ids.study, patient=patient, study_uid=tags.study_uid,
                                 study_date=tags.study.get("StudyDate", ""),
                                 accession_number=tags.study.get("AccessionNumber", ""),
                                 main_tags=json.dumps(tags.study), last_update=now)  # fmt: skip
            changes.append(("NewStudy", "Study", ids.study))
        else:
            Study.update(last_update=now, stable_pending=True).where(Study.id == study.id).execute()
        series = Series.create(public_id=ids.series, study=study, series_uid=tags.series_uid,
                               modality=tags.series.get("Modality", ""), main_tags=json.dumps(tags.series),
                               last_update=now)  # fmt: skip
        changes.append(("NewSeries", "Series", ids.series))
        series_id, study_id = series.id, study.id
    if len(cache) >= _SERIES_CACHE_MAX:
        cache.clear()
    cache[ids.series] = (series_id, study_id, mono)
    return series_id, changes


def _index(archive: Archive, spool: SpoolFile, tags: IndexTags, ids: ResourceIds, origin: Origin, now: dt.datetime,
           use_cache: bool, deliveries: Sequence[tuple[str, str]],
           metadata: Mapping[str, str]) -> tuple[StoreStatus, str | None, str]:  # fmt: skip
    """The index transaction. Returns (status, replaced file uuid, file uuid the index now points to)."""
    db = archive.db
    with write_transaction(db):
        # PostgreSQL: the row stays locked until the commit, so a concurrent overwrite (another receiver, another
        # node) waits and then replaces *our* copy, putting it in the garbage; without the lock, both updates
        # would succeed and the copy between them would stay on disk with no row naming it. (SQLite's
        # transaction holds the write lock from the start already.)
        lock = " FOR UPDATE" if is_postgres(db) else ""
        row = db.execute_sql(sql_for(db, f'SELECT id, file_uuid FROM "instance" WHERE public_id = ?{lock}'),
                             (ids.instance,)).fetchone()  # fmt: skip
        if row is not None and row[1] == spool.uuid:
            # Our own commit, whose acknowledgement the connection lost before a retry: it is stored.
            return "Success", None, spool.uuid
        if row is not None and not archive.overwrite:
            if archive.storage.locate(row[1]).exists():
                return "AlreadyStored", None, row[1]
            # The indexed copy's file is missing: the new copy takes its place instead of being dropped.
            log.warning("indexed file missing; replaced by the new copy", instance=ids.instance, file_uuid=row[1])
        series_id, changes = _parents(archive, ids, tags, now, use_cache)
        values = (
            ids.instance, series_id, tags.sop_uid, json.dumps(tags.instance), spool.uuid, spool.size, spool.sha256,
            tags.transfer_syntax, tags.sop_class_uid, _index_in_series(tags), origin.origin, origin.remote_aet,
            origin.called_aet, origin.remote_ip, now,
        )  # fmt: skip
        old_uuid = None
        if row is not None:
            old_uuid = row[1]
            db.execute_sql(sql_for(db, 'INSERT INTO "garbage" (file_uuid) VALUES (?)'), (old_uuid,))
            sets = ", ".join(f"{c} = ?" for c in _INSTANCE_COLUMNS[1:])
            sql = f'UPDATE "instance" SET {sets} WHERE id = ? AND EXISTS '
            sql += '(SELECT 1 FROM "series" WHERE id = ? AND public_id = ?)'
            cursor = db.execute_sql(sql_for(db, sql), (*values[1:], row[0], series_id, ids.series))
            if cursor.rowcount != 1:
                raise _StaleCache
        else:
            cols = ", ".join(_INSTANCE_COLUMNS)
            marks = ", ".join("?" * len(_INSTANCE_COLUMNS))
            # Inserted only if the series row is still the one we think (the cache may be stale).
            sql = f'INSERT INTO "instance" ({cols}) SELECT {marks} WHERE EXISTS '
            sql += '(SELECT 1 FROM "series" WHERE id = ? AND public_id = ?)'
            cursor = db.execute_sql(sql_for(db, sql), (*values, series_id, ids.series))
            if cursor.rowcount != 1:
                raise _StaleCache
        changes.append(("NewInstance", "Instance", ids.instance))
        if row is not None or metadata:
            db.execute_sql(sql_for(db, 'DELETE FROM "metadata" WHERE public_id = ?'), (ids.instance,))
        for name, value in metadata.items():
            db.execute_sql(sql_for(db, 'INSERT INTO "metadata" (public_id, name, value) VALUES (?, ?, ?)'),
                           (ids.instance, name, value))  # fmt: skip
        for change_type, level, public_id in changes:
            db.execute_sql(
                sql_for(db, 'INSERT INTO "change" (change_type, level, public_id, date) VALUES (?, ?, ?, ?)'),
                (change_type, level, public_id, now),
            )
        enqueue(db, ids.instance, ids.study, deliveries, now)
    return "Success", old_uuid, spool.uuid


def store(
    archive: Archive,
    spool: SpoolFile,
    tags: IndexTags,
    origin: Origin,
    deliveries: Sequence[tuple[str, str]] = (),
    metadata: Mapping[str, str] | None = None,
) -> StoreResult:
    """Make a spooled instance part of the archive (see the module docstring for the guarantees).

    ``deliveries`` are the (rule, destination) pairs the routing rules chose for this instance: their outbox
    rows are written in the same transaction as the instance, so an acknowledged instance is never one that
    the gateway forgot (nor queued without being stored). A duplicate (``AlreadyStored``) queues nothing.

    Raises ``OSError`` (disk) or a peewee error (database) with nothing half-done: the spool file is removed
    and no row is committed.  Each thread keeps its own database connection open between calls.
    ``metadata`` (``ModifiedFrom``…) is written with the instance, replacing what an overwritten copy had.
    """
    metadata = metadata or {}
    storage = archive.storage
    ids = resource_ids(tags.patient_id, tags.study_uid, tags.series_uid, tags.sop_uid)
    try:
        storage.make_durable(spool)
    finally:
        spool.close()
    now = utcnow()
    try:
        archive.db.connect(reuse_if_open=True)
        attempt = 0
        while True:
            try:
                status, old_uuid, uuid = _index(archive, spool, tags, ids, origin, now, attempt == 0, deliveries,
                                                metadata)  # fmt: skip
                break
            except (IntegrityError, _StaleCache, OperationalError, InterfaceError) as exc:
                # A parent changed under our cache, or another receiver (of this node or another one) inserted
                # the same patient, study, series or instance first: the unique keys refused ours, and the next
                # attempt finds theirs. PostgreSQL may also pick our transaction as a deadlock's victim, or the
                # server may have closed this thread's connection (a restart): the next attempt reconnects.
                attempt += 1
                retry = not isinstance(exc, OperationalError | InterfaceError) or is_transient(exc)
                if attempt >= _MAX_ATTEMPTS or not (retry or reset_if_broken(archive.db)):
                    raise
                archive.series_cache.pop(ids.series, None)
                time.sleep(random.uniform(0, 0.01 * attempt))
    except BaseException as exc:
        # A connection lost during the commit leaves its outcome unknown: the index may name this spool file.
        # It stays for recovery, which publishes it if indexed and deletes it if not; the sender hears a
        # failure and sends again (AlreadyStored then, or a second copy that the index decides between).
        lost = reset_if_broken(archive.db) or isinstance(exc, InterfaceError)
        if not lost:
            storage.discard_spool(spool.uuid)
        raise
    spool.committed = status == "Success"
    if status == "AlreadyStored":
        storage.discard_spool(spool.uuid)
        return StoreResult(status, ids, storage.locate(uuid), spool.size)
    return StoreResult(status, ids, _after_commit(archive, spool.uuid, old_uuid), spool.size, old_uuid is not None)


class StoreBatchError(Exception):
    """:func:`store_many` failed part-way: ``stored`` holds the results of the entries committed before."""

    def __init__(self, stored: list[StoreResult], cause: BaseException) -> None:
        super().__init__(str(cause))
        self.stored = stored
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Entry:
    """One instance of :func:`store_many`."""

    spool: SpoolFile
    tags: IndexTags
    origin: Origin
    deliveries: Sequence[tuple[str, str]] = ()
    metadata: Mapping[str, str] | None = None


def store_many(archive: Archive, entries: Sequence[Entry]) -> list[StoreResult]:
    """Store several instances whose spool files are already durable and closed (written and fsynced by the
    caller, as a REST job does) in one index transaction: one commit instead of one per instance.

    If the batch cannot be committed as one (a concurrent writer changed a parent), each instance is stored on
    its own; a failure then raises :class:`StoreBatchError` with the results of those already committed (an
    entry's ``spool.committed`` tells whether its file now belongs to the index). Only for callers that answer
    after the whole batch: nothing is durable before the commit.
    """
    storage = archive.storage
    now = utcnow()
    done: list[tuple[StoreStatus, str | None, str]] = []
    try:
        archive.db.connect(reuse_if_open=True)
        with write_transaction(archive.db):
            for e in entries:
                ids = resource_ids(e.tags.patient_id, e.tags.study_uid, e.tags.series_uid, e.tags.sop_uid)
                done.append(_index(archive, e.spool, e.tags, ids, e.origin, now, True, e.deliveries,
                                   e.metadata or {}))  # fmt: skip
    except (IntegrityError, _StaleCache, OperationalError) as exc:
        if isinstance(exc, OperationalError) and not is_transient(exc):
            raise
        archive.series_cache.clear()
        stored: list[StoreResult] = []
        for e in entries:
            try:
                stored.append(store(archive, e.spool, e.tags, e.origin, e.deliveries, e.metadata))
            except BaseException as exc:
                raise StoreBatchError(stored, exc) from exc
        return stored
    results = []
    for e, (status, old_uuid, uuid) in zip(entries, done, strict=True):
        ids = resource_ids(e.tags.patient_id, e.tags.study_uid, e.tags.series_uid, e.tags.sop_uid)
        e.spool.committed = status == "Success"
        if status == "AlreadyStored":
            storage.discard_spool(e.spool.uuid)
            results.append(StoreResult(status, ids, storage.locate(uuid), e.spool.size))
        else:
            path = _after_commit(archive, e.spool.uuid, old_uuid)
            results.append(StoreResult(status, ids, path, e.spool.size, old_uuid is not None))
    return results


def _after_commit(archive: Archive, uuid: str, old_uuid: str | None) -> Path:
    """Publish the new file and drop the replaced one. Never raises: the instance is already durable.

    A failure here leaves the spool file where recovery (or :meth:`FileStorage.locate`) finds it and the
    replaced file in ``Garbage``; answering an error now would make the sender retry an instance we hold.
    """
    storage = archive.storage
    try:
        path = storage.publish(uuid)
    except FileNotFoundError:
        path = storage.locate(uuid)  # a racing overwrite already replaced (and deleted) this copy
        log.info("superseded before publication", file_uuid=uuid)
    except OSError as exc:
        path = storage.spool_path(uuid)
        log.error("publish failed; the file stays in the spool until recovery", file_uuid=uuid, error=str(exc))
    if old_uuid is not None:
        try:
            storage.delete(old_uuid)
            Garbage.delete().where(Garbage.file_uuid == old_uuid).execute()
        except Exception as exc:  # noqa: BLE001 - left in Garbage: recovery deletes it
            log.error("could not delete a replaced file", file_uuid=old_uuid, error=str(exc))
    return path


def elapsed_ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def delete_instance(
    archive: Archive, public_id: str, unless_queued: bool = False, file_uuid: str | None = None
) -> bool:
    """Remove an instance (and a series, study or patient left empty) from the index, then its file.

    The file goes through ``Garbage`` like a replaced one: a crash between the commit and the unlink leaves
    it for recovery, never an index row without its file. Returns False when the instance was not there, or
    (``unless_queued``) when an outbox row of it is not delivered yet: checked in the same transaction, so a
    copy queued meanwhile (an overwrite, a replay) is never deleted under its row. With ``file_uuid``, only
    that copy of the instance is deleted (a job deleting its sources must not delete a newer copy).
    """
    db = archive.db
    db.connect(reuse_if_open=True)
    now = utcnow()
    with write_transaction(db):
        query = Instance.select().where(Instance.public_id == public_id)
        inst = (query.for_update() if is_postgres(db) else query).first()  # locked: see _index
        if inst is None or (file_uuid is not None and inst.file_uuid != file_uuid):
            return False  # gone, or replaced since the caller looked (``file_uuid``): not the copy it meant
        if unless_queued and Outbox.select().where((Outbox.instance == public_id) & (Outbox.state != "done")).exists():
            return False
        uuid = inst.file_uuid
        if is_postgres(db):
            # Lock the parents top-down (as the store path touches them) before looking for siblings: a receiver
            # inserting into this series meanwhile holds a key-share lock on it, so either its instance is seen
            # below and the series kept, or its insert waits and, once the series is gone, fails and is retried
            # (store()). Without the locks the series' ON DELETE CASCADE took that acknowledged instance along.
            parents = (Series.select(Series.id, Study.id.alias("study_id"), Study.patient.alias("patient_id"))
                       .join(Study).where(Series.id == inst.series_id).dicts().first())  # fmt: skip
            if parents is not None:
                Patient.select(Patient.id).where(Patient.id == parents["patient_id"]).for_update().execute()
                Study.select(Study.id).where(Study.id == parents["study_id"]).for_update().execute()
                Series.select(Series.id).where(Series.id == inst.series_id).for_update().execute()
        Garbage.insert(file_uuid=uuid).on_conflict_ignore().execute()
        series = Series.get_by_id(inst.series_id)
        inst.delete_instance()
        changes = [("Deleted", "Instance", public_id)]
        if not Instance.select().where(Instance.series == series.id).exists():
            study = Study.get_by_id(series.study_id)
            series.delete_instance()
            changes.append(("Deleted", "Series", series.public_id))
            if not Series.select().where(Series.study == study.id).exists():
                patient = Patient.get_by_id(study.patient_id)
                study.delete_instance()
                changes.append(("Deleted", "Study", study.public_id))
                if not Study.select().where(Study.patient == patient.id).exists():
                    patient.delete_instance()
                    changes.append(("Deleted", "Patient", patient.public_id))
        for change_type, level, pid in changes:
            Change.create(change_type=change_type, level=level, public_id=pid, date=now)
        Metadata.delete().where(Metadata.public_id.in_([pid for _, _, pid in changes])).execute()
    archive.series_cache.clear()
    try:
        archive.storage.delete(uuid)
        Garbage.delete().where(Garbage.file_uuid == uuid).execute()
    except Exception as exc:  # noqa: BLE001 - left in Garbage: recovery deletes it
        log.error("could not delete a file", file_uuid=uuid, error=str(exc))
    return True
