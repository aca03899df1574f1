"""Who may do what: calling AE titles and hosts checked against ``DicomModalities`` as Orthanc does."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from node.config import Config, Modality


def _resolve(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


@dataclass(frozen=True)
class AccessPolicy:
    """Decides per calling AE (and peer address) whether an echo or a store is allowed."""

    modalities: tuple[Modality, ...]
    always_allow_echo: bool
    always_allow_store: bool
    check_host: bool
    strict_aet: bool

    @classmethod
    def from_config(cls, cfg: Config) -> AccessPolicy:
        return cls(
            modalities=cfg.modalities,
            always_allow_echo=cfg["DicomAlwaysAllowEcho"],
            always_allow_store=cfg["DicomAlwaysAllowStore"],
            check_host=cfg["DicomCheckModalityHost"],
            strict_aet=cfg["StrictAetComparison"],
        )

    def matching(self, calling_aet: str, peer_ip: str) -> list[Modality]:
        """The declared modalities this peer is (same AET, and same host when DicomCheckModalityHost)."""
        aet = calling_aet.strip()
        found = []
        for m in self.modalities:
            same = m.aet == aet if self.strict_aet else m.aet.upper() == aet.upper()
            if same and (not self.check_host or peer_ip in _resolve(m.host)):
                found.append(m)
        return found

    def may_echo(self, calling_aet: str, peer_ip: str) -> bool:
        return self.always_allow_echo or any(m.allow_echo for m in self.matching(calling_aet, peer_ip))

    def may_store(self, calling_aet: str, peer_ip: str) -> bool:
        return self.always_allow_store or any(m.allow_store for m in self.matching(calling_aet, peer_ip))

    def may_associate(self, calling_aet: str, peer_ip: str) -> bool:
        """An association is refused outright when the peer may use none of our services."""
        return self.may_echo(calling_aet, peer_ip) or self.may_store(calling_aet, peer_ip)
