"""Rewrite stored instances into new stored instances: the engine of modify/anonymize/split/merge jobs.

Each source file is loaded, transformed and written as a spool file of the archive by a pool of worker
*processes* (Python transforms one instance per core at a time; two cores anonymize a study twice as fast),
then indexed by the calling thread with :func:`~node.archive.store.store`, one transaction per instance, the
same path every received instance takes. The workers agree on every new UID without talking to each other:
the job's UID map is a :class:`~node.dicom.uidmap.KeyedUidMap` with a key drawn for the job (Orthanc's
per-request map, spread over processes).

The pool is shared by every job of the process and started from a *forkserver*, never by forking the server
itself (a fork of a multi-threaded process can inherit a held lock). A worker that dies (a native codec that
aborts) breaks only the chunk it held: the pool is rebuilt and the job fails naming the file, the server lives.

A job stores nothing half-way: :func:`rollback` removes the instances a failed or cancelled job had stored
(never one that was there before it: ``AlreadyStored`` outputs and in-place overwrites are kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from peewee import InterfaceError
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

from node.archive.db import reset_if_broken, write_transaction
from node.archive.models import Patient, Series, Study
from node.archive.storage import SPOOL_SUFFIX
from node.archive.store import Archive, Entry, Origin, StoreBatchError, StoreResult, delete_instance, store_many
from node.dicom import fileio
from node.dicom.apply import apply
from node.dicom.errors import RequestError
from node.dicom.ids import resource_ids
from node.dicom.levels import Level
from node.dicom.maintags import IndexTags, MalformedDataset, index_tags
from node.dicom.request import Modification
from node.dicom.transcode import transcode
from node.dicom.uidmap import KeyedUidMap

STUDY_UID, SERIES_UID, SOP_UID = 0x0020000D, 0x0020000E, 0x00080018


class RewriteError(Exception):
    """One instance could not be rewritten; the message names the source instance and the reason."""


class Transform(Protocol):
    """Picklable: changes one loaded instance in place, returns the output transfer syntax (None: same)."""

    def __call__(self, loaded: fileio.Loaded, cache: dict[Any, Any]) -> str | None: ...


@dataclass(frozen=True)
class ModifyTransform:
    """An Orthanc ``/modify`` or ``/anonymize`` request (spec §4.2)."""

    mod: Modification
    key: bytes
    name_counter: int | None = None

    def __call__(self, loaded: fileio.Loaded, cache: dict[Any, Any]) -> str | None:
        uid_map = cache.get(("map", self.key))
        if uid_map is None:
            uid_map = cache[("map", self.key)] = KeyedUidMap(self.key)
        apply(loaded.ds, self.mod, uid_map, patient_name_counter=self.name_counter,
              sequence_cache=cache.setdefault(("seq", self.key), {}))  # fmt: skip
        if self.mod.transcode and self.mod.transcode != loaded.transfer_syntax:
            # Orthanc (§4.2): in a job the SOPInstanceUID stays the modified one, even after a lossy transcode.
            transcode(loaded.ds, self.mod.transcode)
            return self.mod.transcode
        return None


@dataclass(frozen=True)
class MoveTransform:
    """Split or merge (spec §4.4): set study-level tags, one new series UID per source series (derived from
    the job's key, so every worker agrees) and a fresh random SOPInstanceUID per instance."""

    key: bytes
    remove: tuple[int, ...] = ()
    #: tag -> value; ``None`` removes the tag (merge: the target study has no value for it)
    replace: tuple[tuple[int, str | None], ...] = ()

    def __call__(self, loaded: fileio.Loaded, cache: dict[Any, Any]) -> str | None:
        ds = loaded.ds
        for tag in self.remove:
            if tag in ds:
                del ds[tag]
        for tag, value in self.replace:
            if value is None:
                if tag in ds:
                    del ds[tag]
            else:
                ds[tag] = DataElement(tag, dictionary_VR(tag), value)
        uid_map = cache.get(("map", self.key))
        if uid_map is None:
            uid_map = cache[("map", self.key)] = KeyedUidMap(self.key)
        ds.SeriesInstanceUID = uid_map.map(Level.SERIES, str(ds.get("SeriesInstanceUID", "") or ""))
        ds.SOPInstanceUID = generate_uid()
        if hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return None


@dataclass(frozen=True)
class Written:
    """A rewritten instance, spooled by a worker (not yet fsynced), waiting to be indexed."""

    source: str  # public ID of the source instance
    uuid: str
    size: int
    sha256: str
    tags: IndexTags


@dataclass
class _DoneSpool:
    """What :func:`store` needs of a spool file another process wrote (made durable by :func:`_make_durable`)."""

    uuid: str
    name: str
    size: int
    sha256: str
    error: OSError | None = None
    committed: bool = False

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- worker side

_cache: dict[Any, Any] = {}


#: Exceptions of ours whose message is safe to show (they name tags and files, never values).
_OWN_ERRORS = (RequestError, fileio.NotDicom, fileio.Truncated, MalformedDataset)


def _reason(exc: BaseException) -> str:
    """A failure's reason for logs and the job's ErrorDetails: pydicom's messages may quote a tag's value
    (a name, an ID), so only our own messages are passed on; others are named by their type."""
    return str(exc) if isinstance(exc, _OWN_ERRORS) else type(exc).__name__


def _rewrite_one(transform: Transform, source: str, path: str, out: str) -> Written:
    try:
        loaded = fileio.load(path)
    except Exception as exc:  # noqa: BLE001 - reported, the job decides
        raise RewriteError(f"instance {source}: cannot read its file: {_reason(exc)}") from None
    try:
        syntax = transform(loaded, _cache)
        chunks = fileio.encode(loaded, syntax)
    except Exception as exc:  # noqa: BLE001
        raise RewriteError(f"instance {source}: {_reason(exc)}") from None
    digest = hashlib.sha256()
    size = 0
    try:
        with open(out, "xb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        # From the dataset in memory: re-reading the file just written cost a millisecond per instance.
        tags = dataclasses.replace(index_tags(loaded.ds), transfer_syntax=str(syntax or loaded.transfer_syntax))
    except Exception as exc:  # noqa: BLE001 - a full disk, an unstorable result: this instance fails
        with contextlib.suppress(OSError):
            os.unlink(out)
        what = "the result is not storable" if isinstance(exc, MalformedDataset) else "cannot write the result"
        raise RewriteError(f"instance {source}: {what}: {_reason(exc)}") from None
    return Written(source, Path(out).name.removesuffix(SPOOL_SUFFIX), size, digest.hexdigest(), tags)


def _init_worker() -> None:
    # Values we write are checked by the request parser; pydicom's per-assignment checks only cost time.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE


def _chunk(transform: Transform, items: list[Item], spool_dir: str) -> list[Written | str]:
    """Rewrite a few instances (one pickled transform for all) into the spool names the job chose; an error is
    returned as its message."""
    if len(_cache) > 64:
        _cache.clear()
    out: list[Written | str] = []
    for source, path, uuid in items:
        try:
            out.append(_rewrite_one(transform, source, path, os.path.join(spool_dir, uuid + SPOOL_SUFFIX)))
        except RewriteError as exc:
            out.append(str(exc))
    return out


# ---------------------------------------------------------------- pool

_pool_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_size = 0


def _get_pool(processes: int) -> ProcessPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["node.archive.rewrite"])
            _pool_size = processes or os.cpu_count() or 1
            _pool = ProcessPoolExecutor(_pool_size, mp_context=ctx, initializer=_init_worker)
        return _pool


def _drop_pool(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


def shutdown_pool() -> None:
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- job side


@dataclass
class Stored:
    """One output of a job: its source and what storing it gave."""

    source: str
    result: StoreResult
    preexisting: bool  # the output ID was in the archive before (AlreadyStored, or an in-place overwrite)
    tags: IndexTags


@dataclass
class Outcome:
    stored: list[Stored] = field(default_factory=list)


#: (source instance ID, its file, the spool uuid the result gets): the job names the outputs, so that it can
#: remove them whatever happens to the worker that writes them.
Item = tuple[str, str, str]


def _chunks(items: Sequence[tuple[str, str]], size: int) -> Iterator[list[Item]]:
    for i in range(0, len(items), size):
        yield [(source, path, str(uuidlib.uuid4())) for source, path in items[i : i + size]]


def rewrite(
    archive: Archive,
    items: Sequence[tuple[str, str]],
    transform: Transform,
    origin: Origin,
    *,
    processes: int = 0,
    metadata: Callable[[str], Mapping[str, str]] = lambda source: {},
    progress: Callable[[int, int], None] = lambda done, total: None,
    check: Callable[[], None] = lambda: None,
    outcome: Outcome | None = None,
) -> Outcome:
    """Rewrite ``items`` (source instance ID, file path) and store the results; returns what was stored.

    Raises :class:`RewriteError` for the first instance that fails (what was stored so far is in
    ``outcome``, for :func:`rollback`), or whatever ``check`` raises (a cancelled job). Results are indexed
    without routing deliveries: the caller queues those once the whole job succeeded, so that a half job is
    never forwarded.
    """
    outcome = outcome if outcome is not None else Outcome()
    total = len(items)
    if not total:
        return outcome
    pool = _get_pool(processes)
    workers = _pool_size
    size = max(1, min(8, total // (workers * 4) or 1))
    queue = list(_chunks(items, size))
    queue.reverse()
    in_flight: dict[Future[list[Written | str]], list[Item]] = {}
    spool_dir = str(archive.storage.tmp)
    error: str | None = None
    try:
        while (queue or in_flight) and error is None:
            check()
            while queue and len(in_flight) < workers * 2:
                chunk = queue.pop()
                try:
                    in_flight[pool.submit(_chunk, transform, chunk, spool_dir)] = chunk
                except BrokenProcessPool:
                    _drop_pool(pool)
                    raise RewriteError("the rewriting processes died; try again") from None
            done, _ = wait(in_flight, timeout=0.5, return_when=FIRST_COMPLETED)  # a cancel is seen meanwhile
            for future in done:
                chunk = in_flight.pop(future)
                try:
                    results = future.result()
                except BrokenProcessPool:
                    _drop_pool(pool)
                    _discard(archive, chunk)
                    names = ", ".join(source for source, _, _ in chunk)
                    raise RewriteError(f"a rewriting process died while rewriting one of the instances {names} "
                                       "(a pixel codec crashed?)") from None  # fmt: skip
                batch = [w for w in results if isinstance(w, Written)]
                failed = [w for w in results if isinstance(w, str)]
                if failed or error is not None:
                    error = error or failed[0]
                    _discard(archive, chunk)
                    continue
                try:
                    outcome.stored.extend(_store(archive, batch, origin, metadata))
                except _PartlyStored as exc:
                    outcome.stored.extend(exc.stored)
                    cause = exc.cause.cause if isinstance(exc.cause, StoreBatchError) else exc.cause
                    raise cause from None
                progress(len(outcome.stored), total)
    finally:
        for future, chunk in in_flight.items():  # an error or a cancel: nothing more is stored
            future.cancel()
            with contextlib.suppress(Exception):
                future.result(timeout=60)  # let the worker finish writing before its files are removed
            _discard(archive, chunk)
    if error is not None:
        raise RewriteError(error)
    return outcome


def _discard(archive: Archive, chunk: list[Item]) -> None:
    for _, _, uuid in chunk:
        archive.storage.discard_spool(uuid)


_syncer = ThreadPoolExecutor(8, thread_name_prefix="fsync")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable(archive: Archive, batch: list[Written]) -> None:
    """fsync a batch's files in parallel threads before their index commit.

    The workers do not fsync: a worker waiting for the disk is a core not transforming, and the disk
    flushes several files at once about as fast as one. Nothing is indexed, hence nothing acknowledged,
    before this returns.
    """
    for future in [_syncer.submit(_fsync, str(archive.storage.spool_path(w.uuid))) for w in batch]:
        future.result()


def _store(
    archive: Archive, batch: list[Written], origin: Origin, metadata: Callable[[str], Mapping[str, str]]
) -> list[Stored]:
    """Make a batch durable and index it in one transaction (:func:`store_many`). On failure, what was
    committed is still recorded (for the rollback) and every other spool file is removed."""
    entries = [Entry(_DoneSpool(w.uuid, str(archive.storage.spool_path(w.uuid)), w.size, w.sha256), w.tags, origin,
                     (), metadata(w.source)) for w in batch]  # type: ignore[arg-type]  # fmt: skip
    try:
        if archive.storage.sync:
            _make_durable(archive, batch)
        results = store_many(archive, entries)
    except BaseException as exc:
        stored = exc.stored if isinstance(exc, StoreBatchError) else []
        cause = exc.cause if isinstance(exc, StoreBatchError) else exc
        # A connection lost during the commit leaves its outcome unknown: the index may name these spool files,
        # so they stay for recovery (published if indexed, deleted if not), as in store().
        lost = reset_if_broken(archive.db) or isinstance(cause, InterfaceError)
        for e in entries:
            if not e.spool.committed and not lost:
                archive.storage.discard_spool(e.spool.uuid)
        if stored:
            raise _PartlyStored([_stored(w, r) for w, r in zip(batch, stored, strict=False)], exc) from exc
        raise
    return [_stored(w, r) for w, r in zip(batch, results, strict=True)]


def _stored(w: Written, r: StoreResult) -> Stored:
    return Stored(w.source, r, r.status == "AlreadyStored" or r.replaced, w.tags)


class _PartlyStored(Exception):
    def __init__(self, stored: list[Stored], cause: BaseException) -> None:
        super().__init__(str(cause))
        self.stored = stored
        self.cause = cause


def rebuild_main_tags(archive: Archive, outcome: Outcome) -> None:
    """The main tags of every series, study and patient a job wrote to, from one of its new instances.

    Storing into an existing parent keeps the parent's main tags (the first instance's); after a job that
    changed study-level tags in place (Orthanc's case 29: StudyDescription with the same StudyInstanceUID)
    the parents must show the new values, as Orthanc ≥ 1.11.3 rebuilds them.
    """
    last: dict[str, IndexTags] = {}
    for s in outcome.stored:
        if s.result.status == "Success":  # an AlreadyStored output's tags describe a file that was not stored
            last[s.result.ids.series] = s.tags
    db = archive.db
    with write_transaction(db):
        for tags in last.values():
            ids = resource_ids(tags.patient_id, tags.study_uid, tags.series_uid, tags.sop_uid)
            Series.update(main_tags=json.dumps(tags.series), modality=tags.series.get("Modality", "")).where(
                Series.public_id == ids.series
            ).execute()
            Study.update(main_tags=json.dumps(tags.study), study_date=tags.study.get("StudyDate", ""),
                         accession_number=tags.study.get("AccessionNumber", "")).where(
                Study.public_id == ids.study
            ).execute()  # fmt: skip
            Patient.update(main_tags=json.dumps(tags.patient), patient_name=tags.patient.get("PatientName", "")).where(
                Patient.public_id == ids.patient
            ).execute()


def rollback(archive: Archive, outcome: Outcome) -> tuple[int, list[str]]:
    """Delete the instances a failed job created (never one that existed before it, never a newer copy).

    Returns how many were removed and the IDs that could not be (each is tried on its own: a busy index must
    not leave the rest behind).
    """
    removed, left = 0, []
    for stored in outcome.stored:
        if stored.preexisting:
            continue
        public_id = stored.result.ids.instance
        try:
            removed += delete_instance(archive, public_id, file_uuid=stored.result.path.name.removesuffix(SPOOL_SUFFIX))
        except Exception:  # noqa: BLE001 - reported to the caller
            left.append(public_id)
    return removed, left
