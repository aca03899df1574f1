"""``POST /modalities/{name}/store``'s job: send stored resources of any level to a modality (C-STORE SCU).

Every instance goes over one association (split only past DICOM's 128 presentation contexts), built by the
routing workers' :class:`~node.net.forward.Connection`: each file is sent as stored, and an instance whose
transfer syntax the destination refuses is decompressed instead of failing. As in Orthanc, the first failed
instance fails the job unless the body says ``"Permissive": true``; an instance deleted after the request is
counted in ``FailedInstancesCount`` and skipped. Each sent or failed instance is one log event with its IDs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError

from node.archive.models import Instance, Patient, Series, Study
from node.archive.store import Archive
from node.logs import get as get_logger
from node.net.forward import AssociationFailed, Connection, Outgoing, contexts_for
from node.net.scu import MAX_CONTEXTS, Target, inspect
from node.rest.errors import RestError, unknown_resource
from node.rest.jobs import JobContext
from node.routing.transform import Transformer

log = get_logger("dicom-node.modalities")

#: Orthanc's error for a failed DICOM exchange (``ErrorCode_NetworkProtocol``).
NETWORK = (500, 9, "Error in the network protocol")


def network_error(details: str) -> RestError:
    return RestError(*NETWORK, details)


@dataclass(frozen=True, slots=True)
class ToSend:
    """An instance of the request, resolved before the job starts (unknown IDs are a 404 up front)."""

    public_id: str
    study: str
    sop_uid: str
    file_uuid: str


def _rows(level: type[Any], public_id: str) -> list[ToSend]:
    query = (Instance.select(Instance.public_id, Study.public_id.alias("study"), Instance.sop_uid, Instance.file_uuid)
             .join(Series).join(Study))  # fmt: skip
    if level is Patient:
        query = query.join(Patient).where(Patient.public_id == public_id)
    elif level is Study:
        query = query.where(Study.public_id == public_id)
    elif level is Series:
        query = query.where(Series.public_id == public_id)
    else:
        query = query.where(Instance.public_id == public_id)
    query = query.order_by(Series.id, Instance.index_in_series, Instance.id)
    return [ToSend(*row) for row in query.tuples()]


def resolve(archive: Archive, ids: list[str]) -> list[ToSend]:
    """The instances of resources of any level, in series order, each once; 404 naming an unknown ID."""
    out: dict[str, ToSend] = {}
    with archive.db.connection_context():
        for public_id in ids:
            level = next((m for m in (Patient, Study, Series, Instance)
                          if m.select().where(m.public_id == public_id).exists()), None)  # fmt: skip
            if level is None:
                raise unknown_resource(f"no patient, study, series or instance with ID {public_id!r}")
            for row in _rows(level, public_id):
                out.setdefault(row.public_id, row)
    return list(out.values())


@dataclass
class StoreJob:
    """What the route parsed; :meth:`run` is the job's work."""

    archive: Archive
    modality: str
    target: Target
    local_aet: str
    parents: list[str]
    instances: list[ToSend]
    timeout: float
    permissive: bool = False
    originator: tuple[str, int] | None = None

    def content(self, failed: int) -> dict[str, Any]:
        out: dict[str, Any] = {"Description": "REST API", "FailedInstancesCount": failed,
                               "InstancesCount": len(self.instances), "LocalAet": self.local_aet,
                               "ParentResources": self.parents, "RemoteAet": self.target.aet}  # fmt: skip
        if self.originator is not None:
            out["MoveOriginatorAET"], out["MoveOriginatorID"] = self.originator
        return out

    def run(self, ctx: JobContext) -> dict[str, Any]:
        failed = 0
        items: list[tuple[ToSend, Outgoing]] = []
        for row in self.instances:
            path = self.archive.storage.locate(row.file_uuid)
            try:
                meta = inspect(path)
            except (OSError, InvalidDicomError) as exc:  # deleted since the request (Orthanc: skipped, counted)
                failed += 1
                self._failed(row, f"cannot read the stored file: {exc}", ctx)
                continue
            items.append((row, Outgoing(path, meta.sop_class, meta.transfer_syntax)))
        transformer = Transformer(self.archive.db, self.archive.storage.tmp)

        def convert(item: Outgoing, syntax: str) -> Path:
            return transformer.convert(item.path, syntax).path

        done = 0
        for batch in _batches(items):
            failed += self._send(batch, convert, ctx, done, len(items))
            done += len(batch)
        return self.content(failed)

    def _send(self, batch: list[tuple[ToSend, Outgoing]], convert: Callable[[Outgoing, str], Path], ctx: JobContext,
              before: int, total: int) -> int:  # fmt: skip
        """Send one batch over one association; the number of instances that failed (permissive only)."""
        conn = Connection(self.target, self.local_aet, timeout=self.timeout, originator=self.originator)
        where = f"C-STORE to modality {self.modality!r} ({self.target})"
        try:
            conn.open([item for _, item in batch])
        except (AssociationFailed, OSError, ValueError) as exc:
            conn.close()
            for row, _ in batch:
                self._failed(row, str(exc), ctx)
            raise network_error(f"{where}: {exc}") from None
        failed = 0
        try:
            for i, (row, item) in enumerate(batch):
                ctx.check()
                t0 = time.perf_counter()
                sent = conn.send(item, convert)
                if sent.ok:
                    ms = round((time.perf_counter() - t0) * 1000, 1)
                    log.info("sent", destination=self.modality, instance=row.public_id, study=row.study,
                             sop_instance_uid=row.sop_uid, status=f"0x{sent.status or 0:04X}", job=ctx.job.id,
                             transfer_syntax=sent.transfer_syntax, ms=ms)  # fmt: skip
                    ctx.progress(before + i + 1, total)
                    continue
                failed += 1
                self._failed(row, sent.error, ctx, sent.status)
                if not self.permissive:
                    raise network_error(f"{where}: instance {row.public_id} (SOPInstanceUID {row.sop_uid}): "
                                        f"{sent.error}")  # fmt: skip
                if sent.association_lost:  # permissive: the rest of the batch cannot go either
                    for rest, _ in batch[i + 1 :]:
                        self._failed(rest, f"association with {self.target} lost", ctx)
                    return failed + len(batch) - i - 1
        finally:
            conn.close()
        return failed

    def _failed(self, row: ToSend, error: str, ctx: JobContext, status: int | None = None) -> None:
        log.warning("failed", destination=self.modality, instance=row.public_id, study=row.study,
                    sop_instance_uid=row.sop_uid, error=error, job=ctx.job.id,
                    status=None if status is None else f"0x{status:04X}")  # fmt: skip


def _batches(items: list[tuple[ToSend, Outgoing]]) -> list[list[tuple[ToSend, Outgoing]]]:
    """Split only where one association would need more than 128 presentation contexts."""
    batches: list[list[tuple[ToSend, Outgoing]]] = []
    pairs: set[tuple[str, str]] = set()
    for entry in items:
        needed = contexts_for([entry[1]])
        if not batches or len(pairs | needed) > MAX_CONTEXTS:
            batches.append([])
            pairs = set()
        pairs |= needed
        batches[-1].append(entry)
    return batches
