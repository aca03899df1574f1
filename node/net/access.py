"""Who may do what: calling AE titles and hosts checked against the known modalities, as Orthanc does.

The known modalities are the configuration's ``DicomModalities`` *and* those added with ``PUT /modalities``
(kept in the index by :mod:`node.archive.modalities`, an index entry overriding a configured one of the same
name), so a PACS declared over REST may query and retrieve without a restart. The receiver processes read that
list again at most once per :attr:`AccessPolicy.refresh` seconds: a C-STORE asks for its permission once per
instance, and one index read per instance would cost ingest throughput for a list that changes a few times a
year.

Orthanc's rule for every service: a ``DicomAlwaysAllow<Service>`` option lets in peers it does not know; a
declared modality's ``Allow<Service>`` flag only matters when that option is false.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from peewee import Database

from node import logs
from node.config import Config, Modality

log = logs.get("dicom-node.access")


def _resolve(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


class _LiveList:
    """The last list a source gave, re-read when older than ``refresh`` seconds (the last good one is kept when
    the source fails: a busy index must not lock out every peer)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded_at = float("-inf")
        self.value: tuple[Modality, ...] | None = None


def index_modalities(cfg: Config, db: Database) -> Callable[[], tuple[Modality, ...]]:
    """A source of every known modality: the configuration's, overridden by those PUT over REST."""
    from node.archive import modalities

    def load() -> tuple[Modality, ...]:
        db.connect(reuse_if_open=True)
        return tuple(modalities.to_modality(n, s) for n, s in modalities.all_specs(cfg, db).items())

    return load


@dataclass(frozen=True)
class AccessPolicy:
    """Decides per calling AE (and peer address) whether an echo, store, find, move or get is allowed."""

    modalities: tuple[Modality, ...]
    always_allow_echo: bool
    always_allow_store: bool
    check_host: bool
    strict_aet: bool
    always_allow_find: bool = False
    always_allow_move: bool = False
    always_allow_get: bool = False
    #: Where the current list comes from (``None``: ``modalities`` only, as in unit tests).
    source: Callable[[], Sequence[Modality]] | None = None
    refresh: float = 1.0
    _live: _LiveList = field(default_factory=_LiveList, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Config, db: Database | None = None) -> AccessPolicy:
        """The policy of a configuration; with ``db``, modalities added over REST count too."""
        return cls(
            modalities=cfg.modalities,
            always_allow_echo=cfg["DicomAlwaysAllowEcho"],
            always_allow_store=cfg["DicomAlwaysAllowStore"],
            check_host=cfg["DicomCheckModalityHost"],
            strict_aet=cfg["StrictAetComparison"],
            always_allow_find=cfg["DicomAlwaysAllowFind"],
            always_allow_move=cfg["DicomAlwaysAllowMove"],
            always_allow_get=cfg["DicomAlwaysAllowGet"],
            source=index_modalities(cfg, db) if db is not None else None,
        )

    def known(self) -> tuple[Modality, ...]:
        """The modalities in force now."""
        if self.source is None:
            return self.modalities
        live = self._live
        with live.lock:
            if live.value is not None and time.monotonic() - live.loaded_at < self.refresh:
                return live.value
            try:
                live.value = tuple(self.source())
            except Exception as exc:  # noqa: BLE001 - the index may be busy: keep deciding with what we know
                log.warning("cannot read the modalities from the index; using the last known list", error=str(exc))
                if live.value is None:
                    return self.modalities
            live.loaded_at = time.monotonic()
            return live.value

    def matching(self, calling_aet: str, peer_ip: str) -> list[Modality]:
        """The known modalities this peer is (same AET, and same host when DicomCheckModalityHost)."""
        aet = calling_aet.strip()
        found = []
        for m in self.known():
            same = m.aet == aet if self.strict_aet else m.aet.upper() == aet.upper()
            if same and (not self.check_host or peer_ip in _resolve(m.host)):
                found.append(m)
        return found

    def may_echo(self, calling_aet: str, peer_ip: str) -> bool:
        return self.always_allow_echo or any(m.allow_echo for m in self.matching(calling_aet, peer_ip))

    def may_store(self, calling_aet: str, peer_ip: str) -> bool:
        return self.always_allow_store or any(m.allow_store for m in self.matching(calling_aet, peer_ip))

    def may_find(self, calling_aet: str, peer_ip: str) -> bool:
        return self.always_allow_find or any(m.allow_find for m in self.matching(calling_aet, peer_ip))

    def may_move(self, calling_aet: str, peer_ip: str) -> bool:
        return self.always_allow_move or any(m.allow_move for m in self.matching(calling_aet, peer_ip))

    def may_get(self, calling_aet: str, peer_ip: str) -> bool:
        return self.always_allow_get or any(m.allow_get for m in self.matching(calling_aet, peer_ip))

    def may_associate(self, calling_aet: str, peer_ip: str) -> bool:
        """An association is refused outright when the peer may use none of our services."""
        if any((self.always_allow_echo, self.always_allow_store, self.always_allow_find, self.always_allow_move,
                self.always_allow_get)):  # fmt: skip
            return True
        return any(m.allow_echo or m.allow_store or m.allow_find or m.allow_move or m.allow_get
                   for m in self.matching(calling_aet, peer_ip))  # fmt: skip
