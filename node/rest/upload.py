"""``POST /instances``: store an uploaded DICOM file, as the C-STORE receiver does (same durability, same
``OverwriteInstances``, same routing rules), and answer Orthanc's ``{"ID", "Path", "Status", "Parent…"}``.

The body is streamed into a spool file of the storage area (never held in memory whole), then indexed.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from peewee import PeeweeException

from node.archive.storage import is_disk_error
from node.archive.store import Archive, Origin, store
from node.dicom.maintags import MalformedDataset, read_index_tags
from node.logs import get as get_logger
from node.rest.errors import RestError
from node.routing import rules

router = APIRouter()
log = get_logger("dicom-node.rest")


def _store(archive: Archive, routes: Any, spool: Any, origin: Origin) -> dict[str, Any]:
    try:
        tags = read_index_tags(spool.name)
        deliveries = rules.deliveries_for_file(routes, spool.name, rules.Origin(remote_host=origin.remote_ip))
    except MalformedDataset as exc:
        raise RestError(400, 15, "Bad file format", f"not a storable DICOM instance: {exc}") from None
    try:
        archive.db.connect(reuse_if_open=True)
        result = store(archive, spool, tags, origin, deliveries)
    except OSError as exc:
        if is_disk_error(exc):
            raise RestError(507, 2019, "Storage full", f"storage failure: {exc.strerror}") from None
        raise RestError(500, 2018, "Cannot store an instance", f"storage failure: {exc}") from None
    except PeeweeException as exc:
        log.error("index failure", error=str(exc))
        raise RestError(500, 2018, "Cannot store an instance", "database failure") from None
    ids = result.ids
    log.info("stored", sop_instance_uid=tags.sop_uid, status=result.status, instance=ids.instance,
             series=ids.series, study=ids.study, patient=ids.patient, bytes=result.size, origin="RestApi",
             peer=origin.remote_ip)  # fmt: skip
    return {"ID": ids.instance, "ParentPatient": ids.patient, "ParentSeries": ids.series, "ParentStudy": ids.study,
            "Path": f"/instances/{ids.instance}", "Status": result.status}  # fmt: skip


@router.post("/instances", summary="Store a DICOM file sent as the request body")
async def upload(request: Request) -> dict[str, Any]:
    archive: Archive = request.app.state.archive
    spool = archive.storage.new_spool()
    try:
        async for chunk in request.stream():
            spool.write(chunk)
        if spool.error is not None:
            raise RestError(507, 2019, "Storage full", f"storage write failed: {spool.error.strerror}")
        if spool.size == 0:
            raise RestError(400, 8, "Bad request", "empty body: send the DICOM file as the request body")
        host = request.client.host if request.client else ""
        return await run_in_threadpool(_store, archive, request.app.state.cfg.routes, spool,
                                       Origin("RestApi", "", "", host))  # fmt: skip
    finally:
        spool.close()
        if not spool.committed:
            archive.storage.discard_spool(spool.uuid)
