"""Orthanc 1.10's ``/modalities`` routes: list, show, define (``PUT``) and delete remote DICOM modalities, and
talk to them: C-ECHO (``/echo``), C-STORE of stored resources (``/store``, a job), C-FIND (``/query``, see
:mod:`node.rest.queries`) and C-MOVE (``/move``, a job).

Modalities are those of the configuration file plus those defined over REST, which the index keeps
(:mod:`node.archive.modalities`): they survive restarts and the routing workers use them too. A REST
definition of a name the file also defines overrides the file's; ``DELETE`` then removes the override. A
modality only the file defines cannot be deleted over REST (the file would bring it back at the next start),
nor can one a configured routing rule forwards to.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.archive import modalities
from node.dicom.levels import Level
from node.net import qr
from node.net.scu import Target
from node.rest import queries
from node.rest.body import parse_json
from node.rest.errors import bad_request
from node.rest.remote import Remote, aet_field, archive, config, remote, unknown_modality
from node.rest.sending import StoreJob, network_error, resolve

router = APIRouter()
router.include_router(queries.router)

#: An Orthanc identifier: the SHA-1 of the DICOM identifiers in five dash-separated groups of 8 hex digits.
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")
OPERATIONS = ["configuration", "echo", "move", "query", "store"]


def _empty() -> Response:
    """Orthanc answers PUT and DELETE with an empty text body."""
    return Response(content="", media_type="text/plain")


def _expand(value: str | None) -> bool:
    return value is not None and value.lower() not in ("false", "0")


@router.get("/modalities", summary="Names of the known modalities (?expand: their configuration)")
def list_modalities(request: Request, expand: str | None = None) -> Any:
    db = archive(request).db
    with db.connection_context():
        specs = modalities.all_specs(config(request), db)
    return specs if _expand(expand) else list(specs)


def _spec(request: Request, name: str) -> dict[str, Any]:
    db = archive(request).db
    with db.connection_context():
        spec = modalities.spec_of(config(request), db, name)
    if spec is None:
        raise unknown_modality(name)
    return spec


@router.get("/modalities/{name}", summary="The operations available on a modality")
def get_modality(request: Request, name: str) -> list[str]:
    _spec(request, name)
    return OPERATIONS


@router.get("/modalities/{name}/configuration", summary="A modality's configuration (Orthanc's advanced format)")
def modality_configuration(request: Request, name: str) -> dict[str, Any]:
    return _spec(request, name)


@router.put("/modalities/{name}", summary="Define or replace a modality (kept in the index)")
async def put_modality(request: Request, name: str) -> Response:
    body = parse_json(await request.body())
    try:
        modalities.check_name(name)
        spec = modalities.parse_spec(body)
    except modalities.ModalityError as exc:
        raise bad_request(f"modality {name!r}: {exc}") from None
    db = archive(request).db
    with db.connection_context():
        modalities.save(db, name, spec)
    return _empty()


@router.delete("/modalities/{name}", summary="Delete a modality defined over REST")
def delete_modality(request: Request, name: str) -> Response:
    cfg = config(request)
    users = [r.name for r in cfg.routes if name in r.forward]
    if users:
        raise bad_request(f"modality {name!r} is a destination of the routing rule(s) {', '.join(users)}: "
                          f"remove it from their Forward first")  # fmt: skip
    db = archive(request).db
    with db.connection_context():
        removed = modalities.remove(db, name)
    if not removed:
        if any(m.name == name for m in cfg.modalities):
            raise bad_request(f"modality {name!r} is defined in the configuration file {cfg.source}: "
                              f"remove it there")  # fmt: skip
        raise unknown_modality(name)
    return _empty()


def _object(raw: bytes) -> dict[str, Any]:
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


@router.post("/modalities/{name}/echo", summary="C-ECHO the modality ({} on success, else an error naming why)")
async def echo(request: Request, name: str) -> dict[str, Any]:
    body = _object(await request.body())
    rem = remote(request, name, body)
    check_find = body.get("CheckFind", False)
    if not isinstance(check_find, bool):
        raise bad_request("'CheckFind' must be true or false")

    def run() -> None:
        qr.echo(rem.target, rem.local_aet, rem.timeout)
        if check_find:  # Orthanc: a C-FIND of a random study shows whether the modality accepts our queries
            qr.find(rem.target, rem.local_aet, Level.STUDY, queries.build_query(
                Level.STUDY, {"StudyInstanceUID": str(generate_uid())}, True), rem.timeout)  # fmt: skip

    try:
        await run_in_threadpool(run)
    except qr.ScuError as exc:
        raise network_error(f"C-ECHO to modality {name!r} ({rem.target}): {exc}") from None
    return {}


def _store_request(raw: bytes) -> tuple[list[Any], dict[str, Any]]:
    """Orthanc's three bodies: a bare ID, a JSON string or list of IDs, or ``{"Resources": [...], …}``."""
    text = raw.decode("utf-8", "replace").strip()
    if ORTHANC_ID.fullmatch(text):
        return [text], {}
    body = parse_json(raw)
    if isinstance(body, str):
        return [body], {}
    if isinstance(body, list):
        return body, {}
    if not isinstance(body, dict) or not isinstance(body.get("Resources"), list):
        raise bad_request('the body must be an Orthanc ID, a list of IDs or {"Resources": [IDs…], …}')
    return body["Resources"], body


def _ids(resources: list[Any]) -> list[str]:
    out = []
    for value in resources:
        if not isinstance(value, str) or not ORTHANC_ID.fullmatch(value.strip()):
            raise bad_request(f"not an Orthanc identifier: {value!r}")
        out.append(value.strip())
    return out


def _overridden(rem: Remote, body: dict[str, Any]) -> Remote:
    """``CalledAet``/``Host``/``Port`` of the body replace the modality's for this request."""
    port = body.get("Port", rem.target.port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise bad_request(f"'Port' must be a TCP port number, got {port!r}")
    host = body.get("Host", rem.target.host)
    if not isinstance(host, str) or not host.strip():
        raise bad_request("'Host' must be a host name or an IP address")
    target = Target(aet_field(body, "CalledAet", rem.target.aet), host.strip(), port)
    return Remote(rem.name, target, rem.local_aet, rem.timeout, rem.spec)


def _originator(body: dict[str, Any], default_aet: str) -> tuple[str, int] | None:
    move_id = body.get("MoveOriginatorID", 0)
    if not isinstance(move_id, int) or isinstance(move_id, bool) or not 0 <= move_id < 65536:
        raise bad_request(f"'MoveOriginatorID' must be a message ID (0..65535), got {move_id!r}")
    aet = aet_field(body, "MoveOriginatorAet", default_aet)
    return (aet, move_id) if move_id else None


@router.post("/modalities/{name}/store", summary="C-STORE stored resources (any level) to the modality, as a job")
async def store(request: Request, name: str) -> dict[str, Any]:
    resources, body = _store_request(await request.body())
    ids = _ids(resources)
    if body.get("StorageCommitment", False) is not False:
        raise bad_request("'StorageCommitment' is not supported by dicom-node (leave it out or false)")
    permissive = body.get("Permissive", False)
    if not isinstance(permissive, bool):
        raise bad_request("'Permissive' must be true or false")
    rem = _overridden(remote(request, name, body), body)
    originator = _originator(body, config(request)["DicomAet"])
    instances = await run_in_threadpool(resolve, archive(request), ids)
    job = StoreJob(archive(request), name, rem.target, rem.local_aet, ids, instances, rem.timeout, permissive,
                   originator)  # fmt: skip
    return await request.app.state.jobs.run_async("DicomModalityStore", job.run, body)  # type: ignore[no-any-return]


@router.post("/modalities/{name}/move", summary="C-MOVE resources from the modality (to TargetAet), as a job")
async def move(request: Request, name: str) -> dict[str, Any]:
    body = _object(await request.body())
    level = queries.level_field(body)
    resources = body.get("Resources")
    if not isinstance(resources, list) or not all(isinstance(r, dict) for r in resources):
        raise bad_request('\'Resources\' must be a list of objects such as {"StudyInstanceUID": "1.2.3"}')
    identifiers = []
    for i, resource in enumerate(resources):
        ds = Dataset()
        for key, value in resource.items():
            queries.add_element(ds, key, value, f"Resources[{i}]")
        identifiers.append(ds)
    rem = remote(request, name, body)
    target_aet = aet_field(body, "TargetAet", config(request)["DicomAet"])
    if not identifiers:
        raise bad_request("'Resources' is empty: nothing to move")
    return await run_in_threadpool(queries.move_job, request, rem, level, identifiers, target_aet, body)
