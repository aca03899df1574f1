"""What every ``/modalities/{name}/…`` operation needs first: the modality, our AE title towards it, a timeout.

Each comes from the request body, else the modality's own settings (``LocalAet``, ``Timeout``), else the
node's defaults, in that order (Orthanc's precedence). The modality is resolved through
:func:`node.archive.modalities.lookup`'s rules (configuration file, overridden by the index), so a modality
PUT a second ago is usable at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from node.archive import modalities
from node.archive.store import Archive
from node.config import Config
from node.net.scu import Target
from node.rest.errors import RestError, bad_request

#: Orthanc's ``DicomScuTimeout`` default: seconds of silence before an SCU association is given up.
SCU_TIMEOUT = 10


@dataclass(frozen=True, slots=True)
class Remote:
    name: str
    target: Target
    local_aet: str
    timeout: float
    spec: dict[str, Any]


def config(request: Request) -> Config:
    return request.app.state.cfg  # type: ignore[no-any-return]


def archive(request: Request) -> Archive:
    return request.app.state.archive  # type: ignore[no-any-return]


def unknown_modality(name: str) -> RestError:
    return RestError(404, 7, "Accessing an inexistent item", f"no modality named {name!r} (see GET /modalities)")


def aet_field(body: dict[str, Any], key: str, default: str) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16:
        raise bad_request(f"{key!r} must be an AE title of 1 to 16 characters, got {json.dumps(value)}")
    return value.strip()


def timeout_field(body: dict[str, Any], default: float) -> float:
    value = body.get("Timeout", default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise bad_request(f"'Timeout' must be a number of seconds, got {json.dumps(value)}")
    return float(value) or default


def remote(request: Request, name: str, body: dict[str, Any]) -> Remote:
    """The modality ``name`` (404 when unknown) with the body's ``LocalAet``/``Timeout`` applied."""
    cfg, db = config(request), archive(request).db
    with db.connection_context():
        spec = modalities.spec_of(cfg, db, name)
    if spec is None:
        raise unknown_modality(name)
    local = aet_field(body, "LocalAet", spec.get("LocalAet") or cfg["DicomAet"])
    timeout = timeout_field(body, float(spec.get("Timeout") or SCU_TIMEOUT))
    return Remote(name, Target(spec["AET"], spec["Host"], spec["Port"]), local, timeout, spec)
