"""What a rule does to one instance before it leaves: anonymize, then modify, with the rule's pseudonym map.

Each routing worker keeps one :class:`Transformer`. Its UID maps are per project and persistent (a
:class:`~node.archive.pseudonyms.DatabaseUidMap`, or a :class:`~node.dicom.uidmap.KeyedUidMap` when the rule
has a ``PseudonymKeyFile``), which is what keeps a study one study although the rule runs instance by
instance, in several processes and across restarts (deviations.md, last row).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peewee import Database

from node.archive.pseudonyms import DatabaseUidMap
from node.archive.storage import SPOOL_SUFFIX
from node.dicom import fileio
from node.dicom.apply import apply
from node.dicom.request import Modification
from node.dicom.transcode import transcode
from node.dicom.uidmap import KeyedUidMap
from node.routing.rules import Route

PATIENT_ID = 0x00100020


@dataclass(frozen=True, slots=True)
class Result:
    """The transformed instance, written as a Part-10 file the sender streams from disk."""

    path: Path
    sop_class: str
    sop_uid: str
    transfer_syntax: str


@dataclass
class Transformer:
    db: Database
    tmp_dir: Path
    _maps: dict[str, DatabaseUidMap | KeyedUidMap] = field(default_factory=dict)
    _caches: dict[str, dict[Any, Any]] = field(default_factory=dict)

    def uid_map(self, route: Route) -> DatabaseUidMap | KeyedUidMap:
        key = f"{route.project}|{route.key_file or ''}"
        found = self._maps.get(key)
        if found is None:
            if route.key_file:
                found = KeyedUidMap(Path(route.key_file).read_bytes().strip())
            else:
                found = DatabaseUidMap(self.db, route.project)
            self._maps[key] = found
        return found

    def flush(self) -> None:
        """Record the pseudonyms made since the last call (once per batch: one transaction, not one per UID)."""
        for uid_map in self._maps.values():
            if isinstance(uid_map, DatabaseUidMap):
                uid_map.flush()

    def _apply(self, loaded: fileio.Loaded, mod: Modification, route: Route, step: str) -> None:
        uid_map = self.uid_map(route)
        counter = None
        if mod.needs_name_counter:
            original = loaded.ds.get(PATIENT_ID)
            counter = uid_map.patient_name_number(str(original.value or "") if original is not None else "")
        cache = self._caches.setdefault(f"{route.name}|{step}", {})
        apply(loaded.ds, mod, uid_map, patient_name_counter=counter, sequence_cache=cache)

    def run(self, route: Route, source: Path) -> Result:
        """Apply ``route`` to the archived file ``source``; the result goes to a new temporary file."""
        loaded = fileio.load(source)
        target = None
        for step, mod in (("anonymize", route.anonymize), ("modify", route.modify)):
            if mod is not None:
                self._apply(loaded, mod, route, step)
                target = mod.transcode or target
        if target and target != loaded.transfer_syntax:
            transcode(loaded.ds, target)
        return self.write(loaded, target)

    def convert(self, source: Path, transfer_syntax: str) -> Result:
        """The same instance in another transfer syntax (a destination refused the instance's own)."""
        loaded = fileio.load(source)
        transcode(loaded.ds, transfer_syntax)
        return self.write(loaded, transfer_syntax)

    def write(self, loaded: fileio.Loaded, transfer_syntax: str | None) -> Result:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Named like a spool file of the worker's own folder: what a crash leaves there, recovery deletes.
        path = self.tmp_dir / f"{uuid.uuid4()}{SPOOL_SUFFIX}"
        chunks = fileio.encode(loaded, transfer_syntax)
        with open(path, "wb") as fh:
            fh.writelines(chunks)
        ds = loaded.ds
        return Result(path, loaded.sop_class, str(ds.get("SOPInstanceUID", "") or ""),
                      str(transfer_syntax or fileio.transfer_syntax_of(ds)))  # fmt: skip


def discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
