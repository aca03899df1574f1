"""DICOM modalities declared over REST (``PUT /modalities/{name}``), kept in the index.

They are in the index, not in memory, so that they survive a restart and every process sees the same list:
the REST API writes them, the routing workers read them before each batch. The configuration file's
``DicomModalities`` come first; an index entry of the same name overrides it (how an operator repoints a
destination without a restart). Each entry is one ``Property`` row, key ``DicomModality:<name>``, value the
JSON object of Orthanc's "advanced format" (``GET /modalities/{name}/configuration`` shows the same).

Validation follows the configuration's rules (name 1..64 characters not starting with ``@``, AET 1..16
characters, port 1..65535, ``Allow*`` booleans) and refuses unknown keys: a misspelt ``AllowStroe`` silently
ignored is a permission nobody meant to grant.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from peewee import Database

from node.archive.db import write_transaction
from node.archive.models import Property
from node.config import Config, Modality

PREFIX = "DicomModality:"

#: Orthanc's ``Allow*`` keys we act on, with the :class:`Modality` attribute each sets.
FLAGS = {"AllowEcho": "allow_echo", "AllowStore": "allow_store", "AllowFind": "allow_find",
         "AllowMove": "allow_move", "AllowGet": "allow_get"}  # fmt: skip
#: Orthanc's other boolean keys: kept and shown (clients read them), not acted on.
OTHER_FLAGS = ("AllowFindWorklist", "AllowNAction", "AllowEventReport", "AllowTranscoding", "UseDicomTls")
MANUFACTURERS = ("Generic", "GenericNoWildcardInDates", "GenericNoUniversalWildcard", "StoreScp", "Vitrea", "GE")
KEYS = {"AET", "Host", "Port", "Manufacturer", "LocalAet", "Timeout", "AllowStorageCommitment", *FLAGS, *OTHER_FLAGS}


class ModalityError(ValueError):
    """A modality that cannot be used; the message names the field."""


def check_name(name: str) -> None:
    if not 0 < len(name) <= 64:
        raise ModalityError(f"a modality name must be 1 to 64 characters, got {len(name)}")
    if name.startswith("@"):
        raise ModalityError(f"modality names starting with '@' are reserved (@archive), got {name!r}")


def _port(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # Orthanc accepts the port as a string too
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ModalityError(f"'Port' must be a TCP port number (1..65535), got {json.dumps(value)}")
    return value


def _aet(value: Any, key: str) -> str:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16 or "\\" in value:
        raise ModalityError(f"{key!r} must be an AE title of 1 to 16 characters without '\\', got {json.dumps(value)}")
    return value.strip()


def parse_spec(body: Any) -> dict[str, Any]:
    """Orthanc's modality body (``[AET, host, port(, manufacturer)]`` or an object) in the advanced format."""
    if isinstance(body, list):
        if not 3 <= len(body) <= 4:
            raise ModalityError("a modality array must be [AET, Host, Port] or [AET, Host, Port, Manufacturer]")
        body = dict(zip(("AET", "Host", "Port", "Manufacturer"), body, strict=False))
    if not isinstance(body, dict):
        raise ModalityError('the body must be a JSON object {"AET", "Host", "Port", …} or [AET, Host, Port]')
    for key in body:
        if key not in KEYS:
            close = difflib.get_close_matches(key, sorted(KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModalityError(f"unknown key {key!r}{hint}")
    for key in ("AET", "Host", "Port"):
        if key not in body:
            raise ModalityError(f"missing {key!r}")
    host = body["Host"]
    if not isinstance(host, str) or not host.strip():
        raise ModalityError(f"'Host' must be a host name or an IP address, got {json.dumps(host)}")
    manufacturer = body.get("Manufacturer", "Generic")
    if manufacturer not in MANUFACTURERS:
        raise ModalityError(f"'Manufacturer' must be one of {', '.join(MANUFACTURERS)}, got {json.dumps(manufacturer)}")
    spec: dict[str, Any] = {"AET": _aet(body["AET"], "AET"), "Host": host.strip(), "Port": _port(body["Port"]),
                            "Manufacturer": manufacturer}  # fmt: skip
    for key in (*FLAGS, *OTHER_FLAGS, "AllowStorageCommitment"):
        if key in body and not isinstance(body[key], bool):
            raise ModalityError(f"{key!r} must be true or false, got {json.dumps(body[key])}")
    commitment = body.get("AllowStorageCommitment", True)  # Orthanc: sets both N-ACTION and N-EVENT-REPORT
    for key in (*FLAGS, *OTHER_FLAGS):
        default = False if key == "UseDicomTls" else commitment if key in ("AllowNAction", "AllowEventReport") else True
        spec[key] = body.get(key, default)
    local = body.get("LocalAet", "")
    spec["LocalAet"] = _aet(local, "LocalAet") if local != "" else ""
    timeout = body.get("Timeout", 0)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
        raise ModalityError(f"'Timeout' must be a number of seconds (0: the default), got {json.dumps(timeout)}")
    spec["Timeout"] = timeout
    return spec


def to_modality(name: str, spec: dict[str, Any]) -> Modality:
    return Modality(name=name, aet=spec["AET"], host=spec["Host"], port=spec["Port"],
                    **{attr: spec[key] for key, attr in FLAGS.items()})  # fmt: skip


def _from_config(cfg: Config, m: Modality) -> dict[str, Any]:
    """A configuration file's modality (validated at start) in the advanced format."""
    raw = cfg["DicomModalities"].get(m.name)
    if isinstance(raw, dict):
        extra = {k: raw[k] for k in ("Manufacturer", "LocalAet", "Timeout", *OTHER_FLAGS) if k in raw}
    else:  # [AET, host, port(, manufacturer)]
        extra = {"Manufacturer": raw[3]} if isinstance(raw, list) and len(raw) > 3 else {}
    try:
        spec = parse_spec({"AET": m.aet, "Host": m.host, "Port": m.port, **extra})
    except ModalityError:  # an option the start-up check does not look at, in a form we cannot show: skip it
        spec = parse_spec({"AET": m.aet, "Host": m.host, "Port": m.port})
    spec.update({key: getattr(m, attr) for key, attr in FLAGS.items()})
    return spec


def configured(cfg: Config) -> dict[str, dict[str, Any]]:
    """The configuration file's modalities in the advanced format, by name."""
    return {m.name: _from_config(cfg, m) for m in cfg.modalities}


def stored(db: Database) -> dict[str, dict[str, Any]]:
    """The modalities PUT over REST, by name."""
    rows = Property.select(Property.key, Property.value).where(Property.key.startswith(PREFIX)).tuples()
    return {key[len(PREFIX) :]: json.loads(value) for key, value in rows}


def save(db: Database, name: str, spec: dict[str, Any]) -> None:
    with write_transaction(db):
        Property.insert(key=PREFIX + name, value=json.dumps(spec, sort_keys=True)).on_conflict(
            conflict_target=[Property.key], update={Property.value: json.dumps(spec, sort_keys=True)}
        ).execute()


def remove(db: Database, name: str) -> bool:
    with write_transaction(db):
        return bool(Property.delete().where(Property.key == PREFIX + name).execute())


def all_specs(cfg: Config, db: Database) -> dict[str, dict[str, Any]]:
    """Every modality, sorted by name: the configuration's, overridden by the index's."""
    merged = {**configured(cfg), **stored(db)}
    return dict(sorted(merged.items()))


def spec_of(cfg: Config, db: Database, name: str) -> dict[str, Any] | None:
    row = Property.get_or_none(Property.key == PREFIX + name)
    if row is not None:
        return json.loads(row.value)  # type: ignore[no-any-return]
    m = next((m for m in cfg.modalities if m.name == name), None)
    return None if m is None else _from_config(cfg, m)


def lookup(cfg: Config, db: Database, name: str) -> Modality | None:
    """The one place a destination name is resolved (REST routes and routing workers)."""
    spec = spec_of(cfg, db, name)
    return None if spec is None else to_modality(name, spec)
