"""Orthanc's jobs: long REST work (modify a study, send to a modality, split, merge) as a job with a state.

A route builds a *work* function and hands it to :meth:`JobEngine.run`, which honours the body's
``Synchronous``/``Asynchronous`` (Orthanc's defaults per route): a synchronous request waits and answers the
job's content (or its error, with the job's HTTP status); an asynchronous one answers ``{"ID", "Path"}`` at
once and the client polls ``GET /jobs/{id}``. Work runs in the engine's threads; it reports progress and
checks for cancellation through its :class:`JobContext`.

Jobs live in memory, as Orthanc's do unless it saves them in its database: after a restart the list is
empty. What a job stored is durable as soon as it is stored; a failed or cancelled modification job removes
what it had stored (routes decide; see ``edit``), so nothing is left half-applied.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request

from node.dicom.errors import RequestError
from node.logs import get as get_logger
from node.rest.errors import RestError, bad_request, from_request_error, unknown_resource

log = get_logger("dicom-node.jobs")
router = APIRouter()

#: Finished jobs kept for ``GET /jobs`` (Orthanc's ``JobsHistorySize`` default).
HISTORY = 10


class JobCancelled(Exception):
    """Raised by :meth:`JobContext.check` once the job was cancelled."""


@dataclass
class Job:
    id: str
    type: str
    work: Callable[[JobContext], dict[str, Any]]
    priority: int = 0
    state: str = "Pending"  # Pending, Running, Success, Failure (Orthanc: also Paused, Retry)
    progress: int = 0
    content: dict[str, Any] = field(default_factory=dict)
    error: RestError | None = None
    created: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    started: float | None = None
    runtime: float = 0.0
    completed: dt.datetime | None = None
    attempt: int = 0  # 1 on the first run, 2 after a resubmit…
    future: Future[None] | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> dict[str, Any]:
        """``GET /jobs/{id}`` in Orthanc's shape."""
        err = self.error
        runtime = self.runtime + (time.monotonic() - self.started if self.state == "Running" and self.started else 0)
        out = {"ID": self.id, "Type": self.type, "State": self.state, "Progress": self.progress,
               "Priority": self.priority, "CreationTime": _stamp(self.created), "EffectiveRuntime": round(runtime, 3),
               "Timestamp": _stamp(dt.datetime.now(dt.UTC)), "Content": self.content,
               "ErrorCode": err.orthanc_status if err else 0,
               "ErrorDescription": err.orthanc_error if err else "Success",
               "ErrorDetails": err.details if err else ""}  # fmt: skip
        if self.completed is not None:
            out["CompletionTime"] = _stamp(self.completed)
        return out


def _stamp(value: dt.datetime) -> str:
    return value.strftime("%Y%m%dT%H%M%S.%f")


@dataclass
class JobContext:
    """What work sees of its job: report progress, notice a cancel, publish partial content."""

    job: Job

    def progress(self, done: int, total: int) -> None:
        self.job.progress = 100 if total <= 0 else min(99, done * 100 // total)

    def check(self) -> None:
        if self.job.cancel_event.is_set():
            raise JobCancelled

    @property
    def attempt(self) -> int:
        """1 on the first run; a resubmitted job's work re-reads what may have changed since."""
        return self.job.attempt


def _as_rest_error(exc: BaseException) -> RestError:
    if isinstance(exc, RestError):
        return exc
    if isinstance(exc, RequestError):
        return from_request_error(exc)
    if isinstance(exc, JobCancelled):
        return RestError(500, 37, "The job has been canceled", "canceled by a client")  # ErrorCode_CanceledJob
    return RestError(500, 1, "Internal error", f"{type(exc).__name__}: {exc}")


class JobEngine:
    """A registry of jobs and the threads that run the asynchronous ones (``ConcurrentJobs``)."""

    def __init__(self, threads: int = 2) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="job")

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise unknown_resource(f"no job with ID {job_id!r}")
        return job

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def _register(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.done_event.is_set()]
            for old in sorted(finished, key=lambda j: j.created)[: max(0, len(finished) - HISTORY)]:
                del self._jobs[old.id]

    def _execute(self, job: Job) -> None:
        job.state, job.started, job.error, job.progress = "Running", time.monotonic(), None, 0
        job.attempt += 1
        try:
            if job.cancel_event.is_set():
                raise JobCancelled
            job.content = job.work(JobContext(job))
            job.state, job.progress = "Success", 100
        except BaseException as exc:
            job.error = _as_rest_error(exc)
            job.state = "Failure"
            if not isinstance(exc, RestError | RequestError | JobCancelled):
                log.exception("job failed", job=job.id, type=job.type)
            else:
                log.info("job failed", job=job.id, type=job.type, error=job.error.details)
        finally:
            job.runtime += time.monotonic() - (job.started or time.monotonic())
            job.completed = dt.datetime.now(dt.UTC)
            job.done_event.set()

    def submit(self, job_type: str, work: Callable[[JobContext], dict[str, Any]], priority: int = 0) -> Job:
        """Queue a job on the engine's threads (``ConcurrentJobs`` run at once, the others are Pending)."""
        job = Job(id=str(uuid.uuid4()), type=job_type, work=work, priority=priority)
        self._register(job)
        job.future = self._pool.submit(self._execute, job)
        return job

    def _start(self, job_type: str, work: Callable[[JobContext], dict[str, Any]],
               body: dict[str, Any], synchronous_default: bool) -> tuple[Job, bool]:  # fmt: skip
        synchronous = synchronous_flag(body, synchronous_default)
        priority = body.get("Priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise bad_request("'Priority' must be an integer")
        return self.submit(job_type, work, priority), synchronous

    @staticmethod
    def _answer(job: Job) -> dict[str, Any]:
        if job.error is not None:
            raise job.error
        return job.content

    async def run_async(self, job_type: str, work: Callable[[JobContext], dict[str, Any]], body: dict[str, Any],
                        synchronous_default: bool = True) -> dict[str, Any]:  # fmt: skip
        """Orthanc's ``Synchronous``/``Asynchronous``/``Priority`` body fields around one job. A synchronous
        request waits for the job without holding a thread of the web server (a long job must not starve
        the other requests, ``/jobs/{id}/cancel`` included)."""
        job, synchronous = self._start(job_type, work, body, synchronous_default)
        if not synchronous:
            return {"ID": job.id, "Path": f"/jobs/{job.id}"}
        assert job.future is not None
        await asyncio.wrap_future(job.future)
        return self._answer(job)

    def run(self, job_type: str, work: Callable[[JobContext], dict[str, Any]], body: dict[str, Any],
            synchronous_default: bool = True) -> dict[str, Any]:  # fmt: skip
        """:meth:`run_async` for a caller in a worker thread (a plain ``def`` route)."""
        job, synchronous = self._start(job_type, work, body, synchronous_default)
        if not synchronous:
            return {"ID": job.id, "Path": f"/jobs/{job.id}"}
        job.done_event.wait()
        return self._answer(job)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self.get(job_id)
            if job.state in ("Success", "Failure"):
                raise bad_request(f"job {job_id} has already ended ({job.state})")
            job.cancel_event.set()

    def resubmit(self, job_id: str) -> None:
        with self._lock:
            job = self.get(job_id)
            if job.state != "Failure" or not job.done_event.is_set():
                raise bad_request(f"only a failed job can be resubmitted; job {job_id} is {job.state}")
            job.cancel_event.clear()
            job.done_event.clear()
            job.state, job.completed = "Pending", None
            job.future = self._pool.submit(self._execute, job)

    def shutdown(self) -> None:
        for job in self.all():
            job.cancel_event.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def synchronous_flag(body: dict[str, Any], default: bool) -> bool:
    """``Synchronous`` wins over ``Asynchronous``; both are booleans."""
    for key, sync_when in (("Synchronous", True), ("Asynchronous", False)):
        if key in body:
            value = body[key]
            if not isinstance(value, bool):
                raise bad_request(f"{key!r} must be true or false")
            return value == sync_when
    return default


def _engine(request: Request) -> JobEngine:
    return request.app.state.jobs  # type: ignore[no-any-return]


@router.get("/jobs", summary="Jobs (IDs, or with ?expand their details)")
def list_jobs(request: Request, expand: str | None = None) -> list[Any]:
    jobs = sorted(_engine(request).all(), key=lambda j: j.created)
    return [j.describe() for j in jobs] if expand is not None else [j.id for j in jobs]


@router.get("/jobs/{job_id}", summary="One job: State, Progress, Content, ErrorCode…")
def get_job(request: Request, job_id: str) -> dict[str, Any]:
    return _engine(request).get(job_id).describe()


@router.post("/jobs/{job_id}/cancel", summary="Cancel a pending or running job")
def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    _engine(request).cancel(job_id)
    return {}


@router.post("/jobs/{job_id}/resubmit", summary="Run a failed job again")
def resubmit_job(request: Request, job_id: str) -> dict[str, Any]:
    _engine(request).resubmit(job_id)
    return {}
