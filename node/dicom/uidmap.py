"""Old → new identifier maps, shared by every instance of one anonymization or modification.

Orthanc keys the map by ``(level, original value with surrounding spaces stripped)`` (spec §3.2). We keep
one namespace for *all* UIDs instead of one per level: the same original UID gets the same new UID wherever it
appears, whether as StudyInstanceUID, as the ReferencedSOPInstanceUID of a ReferencedStudySequence, or as a
FrameOfReferenceUID that a vendor copied from the study UID. With Orthanc's per-level maps those references
silently break (docs/compatibility.md). Patient IDs have their own namespace. New patient IDs are random UUIDs;
new UIDs come from pydicom's ``generate_uid``.

Two implementations of :class:`UidMap`:

* :class:`MemoryUidMap` remembers what it generated (one lock, safe for threads): Orthanc's per-request map.
* :class:`KeyedUidMap` *derives* each new value from a secret key and the original value, so any number of
  processes holding the same key agree without talking to each other (the CLI's ``--jobs``), and a key kept
  per project gives stable pseudonyms across runs. Without the key, a new value cannot be linked back to the
  original; the key is never written into the output.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import uuid
from typing import Protocol

from pydicom.uid import generate_uid

from node.dicom.levels import Level


class UidMap(Protocol):
    def map(self, level: Level, original: str) -> str:
        """The new value for ``original`` at ``level`` (generated on first sight)."""
        ...

    def register(self, level: Level, original: str, new: str) -> None:
        """Force ``original`` to map to ``new`` (a user ``Replace`` of a UID that references must follow)."""
        ...


def namespace(level: Level, original: str = "x") -> str:
    """PatientIDs apart, every UID in one namespace; an *empty* value is mapped per level (Orthanc maps "" too:
    edge case 65), so that a missing FrameOfReferenceUID and a missing SOPInstanceUID do not become one UID."""
    if level is Level.PATIENT:
        return "PATIENT"
    return "UID" if original.strip() else f"EMPTY-{level.name}"


def _new_random(level: Level) -> str:
    return str(uuid.uuid4()) if level is Level.PATIENT else generate_uid()


class MemoryUidMap:
    """Generate on first sight, remember for the lifetime of the object (one request or job)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._map: dict[tuple[str, str], str] = {}

    def map(self, level: Level, original: str) -> str:
        key = (namespace(level, original), original.strip())
        with self._lock:
            new = self._map.get(key)
            if new is None:
                new = self._map[key] = _new_random(level)
            return new

    def register(self, level: Level, original: str, new: str) -> None:
        with self._lock:
            self._map[(namespace(level, original), original.strip())] = new

    def items(self) -> list[tuple[str, str, str]]:
        """Every mapping made so far as (namespace, old, new), for persisting a job's map."""
        with self._lock:
            return [(space, old, new) for (space, old), new in self._map.items()]


class KeyedUidMap:
    """New values derived from ``HMAC(key, level | original)``: consistent across processes sharing the key."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else os.urandom(32)
        self._lock = threading.Lock()
        self._overrides: dict[tuple[str, str], str] = {}
        self._memo: dict[tuple[str, str], str] = {}

    def map(self, level: Level, original: str) -> str:
        stripped = original.strip()
        space = namespace(level, original)
        if self._overrides:
            with self._lock:
                new = self._overrides.get((space, stripped))
            if new is not None:
                return new
        memo_key = (space, stripped)
        new = self._memo.get(memo_key)
        if new is None:
            digest = hmac.new(self.key, f"{space}|{stripped}".encode(), hashlib.sha256).digest()
            if level is Level.PATIENT:
                new = str(uuid.UUID(bytes=digest[:16], version=4))
            else:
                new = generate_uid(entropy_srcs=[digest.hex()])
            if len(self._memo) > 65536:
                self._memo.clear()
            self._memo[memo_key] = new  # a pure function: remembering it only saves the hashing
        return new

    def register(self, level: Level, original: str, new: str) -> None:
        with self._lock:
            self._overrides[(namespace(level, original), original.strip())] = new

    def patient_name_number(self, original_patient_id: str) -> int:
        """The N of ``Anonymized<N>``, derived like the rest (9 digits): nodes sharing the key agree on it."""
        digest = hmac.new(self.key, f"PATIENT-NAME|{original_patient_id.strip()}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") % 10**9
