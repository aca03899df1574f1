"""Anonymize or modify folders of DICOM files: the engine behind ``dicom-node anonymize`` / ``modify``.

One run is one Orthanc request: a single UID map for every file, so a study stays one study and a patient one
patient. The map is a :class:`~node.dicom.uidmap.KeyedUidMap`, so worker processes (``--jobs``) agree on every
new UID without talking to each other; with ``--key-file`` the same key gives the same pseudonyms in a later
run (a study anonymized in several runs stays one study).

Inputs are only ever read. Outputs go to ``OUT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
of the *result* (after anonymization no input name, which may hold a patient's name, reaches the output),
written to a temporary name and linked into place, so an interrupted run never leaves a truncated file and an
existing file is never overwritten unless asked.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config

from node.dicom import fileio
from node.dicom.apply import apply
from node.dicom.errors import RequestError
from node.dicom.request import Modification
from node.dicom.transcode import transcode
from node.dicom.uidmap import KeyedUidMap

_SAFE = re.compile(r"[^0-9A-Za-z._-]")


@dataclass(frozen=True)
class Job:
    """Everything a worker needs; picklable."""

    mod: Modification
    out_dir: str
    key: bytes
    name_counter: int
    overwrite: bool = False


@dataclass(frozen=True)
class Outcome:
    source: str
    status: str  # written | duplicate | skipped | failed
    output: str = ""
    reason: str = ""


@dataclass
class Summary:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def safe_component(value: str) -> str:
    """A path component from a UID: anything outside ``[0-9A-Za-z._-]`` becomes ``_`` (a modify can set any
    value), never empty, never ``.``/``..``."""
    cleaned = _SAFE.sub("_", value.strip())[:64]
    return cleaned if cleaned.strip(".") else "_"


def output_path(out_dir: str, loaded: fileio.Loaded) -> Path:
    ds = loaded.ds
    parts = [str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    return Path(out_dir, safe_component(parts[0]), safe_component(parts[1]), safe_component(parts[2]) + ".dcm")


def edit(loaded: fileio.Loaded, job: Job, uid_map: KeyedUidMap) -> str | None:
    """Apply the job to one loaded file; returns the output transfer syntax (None: unchanged)."""
    apply(loaded.ds, job.mod, uid_map, patient_name_counter=job.name_counter, sequence_cache=_worker.get("seq"))
    if job.mod.transcode and job.mod.transcode != loaded.transfer_syntax:
        transcode(loaded.ds, job.mod.transcode)
        return job.mod.transcode
    return None


def _publish(chunks: list[Any], final: Path, overwrite: bool) -> str:
    """Write to a temporary file beside ``final`` then link it in; returns '' or 'duplicate'."""
    made: set[Path] = _worker.setdefault("dirs", set())
    if final.parent not in made:
        final.parent.mkdir(parents=True, exist_ok=True)
        made.add(final.parent)
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.writelines(chunks)
        if overwrite:
            os.replace(tmp, final)
            return ""
        try:
            os.link(tmp, final)
        except FileExistsError:
            if final.read_bytes() == b"".join(bytes(c) for c in chunks):
                return "duplicate"
            raise FileExistsError(f"output {final} already exists with other content (use --overwrite)") from None
        return ""
    finally:
        tmp.unlink(missing_ok=True)


_worker: dict[str, Any] = {}


def _init(job: Job) -> None:
    # Values we write are checked by the request parser; pydicom's per-assignment regex checks only cost time.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    _worker["job"] = job
    _worker["map"] = KeyedUidMap(job.key)
    _worker["dirs"] = set()
    _worker["seq"] = {}


def process_one(path: str) -> Outcome:
    """Load, edit and write one file (runs in a worker). Never raises: every problem becomes an Outcome."""
    job: Job = _worker["job"]
    try:
        loaded = fileio.load(path)
    except fileio.NotDicom as exc:
        return Outcome(path, "skipped", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a malformed file is reported, never fatal
        return Outcome(path, "failed", reason=f"cannot read DICOM: {type(exc).__name__}: {exc}")
    if loaded.sop_class == fileio.MEDIA_STORAGE_DIRECTORY:
        return Outcome(path, "skipped", reason="DICOMDIR (a media index, not an instance)")
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not loaded.ds.get(k)]
    if missing:  # Orthanc refuses to store such a file; every one would get the same output name
        return Outcome(path, "failed", reason=f"missing or empty {', '.join(missing)}")
    try:
        ts = edit(loaded, job, _worker["map"])
        final = output_path(job.out_dir, loaded)
        status = _publish(fileio.encode(loaded, ts), final, job.overwrite)
    except RequestError as exc:
        return Outcome(path, "failed", reason=str(exc))
    except Exception as exc:  # noqa: BLE001
        return Outcome(path, "failed", reason=f"{type(exc).__name__}: {exc}")
    return Outcome(path, status or "written", output=str(final))


def _chunk(paths: list[str]) -> list[Outcome]:
    return [process_one(p) for p in paths]


def _run_pool(queue: deque[str], job: Job, jobs: int, size: int, emit: Callable[[Outcome], None]) -> list[str]:
    """Process ``queue`` with ``jobs`` workers; returns the files in flight if a worker process died."""
    in_flight: dict[Future[list[Outcome]], list[str]] = {}
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init, initargs=(job,)) as pool:
        chunk: list[str] = []
        try:
            while queue or in_flight:
                while queue and len(in_flight) < jobs * 2:
                    chunk = [queue.popleft() for _ in range(min(size, len(queue)))]
                    in_flight[pool.submit(_chunk, chunk)] = chunk
                    chunk = []
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    chunk = in_flight.pop(future)
                    for outcome in future.result():
                        emit(outcome)
                    chunk = []
        except BrokenProcessPool:
            return chunk + [p for c in in_flight.values() for p in c]
    return []


def _run_alone(path: str, job: Job) -> Outcome:
    """One suspect file in a process of its own: if that process dies, the file is the cause."""
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_init, initargs=(job,)) as pool:
        try:
            return pool.submit(_chunk, [path]).result()[0]
        except BrokenProcessPool:
            return Outcome(path, "failed", reason="the worker process died on this file (a pixel codec crashed?)")


def run(
    inputs: list[str],
    job: Job,
    *,
    jobs: int = 1,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> Summary:
    """Process every input file in ``jobs`` worker processes.

    Files are always processed in worker processes, even with one job: a native codec that aborts (gdcm calls
    ``std::terminate`` on some images) kills a worker, never the run. The files that were in flight are then
    retried one by one in a process of their own; the one that kills it again is reported as failed.
    """
    summary = Summary()

    def emit(outcome: Outcome) -> None:
        summary.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    jobs = max(1, jobs)
    queue = deque(inputs)
    size = max(1, min(16, len(inputs) // (jobs * 8)))
    while queue:
        for path in _run_pool(queue, job, jobs, size, emit):
            emit(_run_alone(path, job))
    return summary
