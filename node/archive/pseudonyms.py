"""The persistent UID map: :class:`~node.dicom.uidmap.UidMap` backed by the index (table ``pseudonym``).

Routing anonymizes instance by instance, in several processes, across restarts; Orthanc's per-request map
would give every instance its own new study (spec §3.2, edge case 70). Here the first process to see an
original value inserts its new value; ``INSERT … ON CONFLICT DO NOTHING`` followed by a read makes every
process agree on the winner, on SQLite and PostgreSQL alike, without a lock held across the engine's work.
"""

from __future__ import annotations

import threading
import uuid

from peewee import Database
from pydicom.uid import generate_uid

from node.archive.db import write_transaction
from node.archive.models import Pseudonym, utcnow
from node.dicom.levels import Level
from node.dicom.uidmap import namespace


class DatabaseUidMap:
    """One project's map. Thread-safe; values read once are remembered in the process (they never change)."""

    def __init__(self, db: Database, project: str) -> None:
        self.db = db
        self.project = project
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, str], str] = {}

    def _read(self, space: str, original: str) -> str | None:
        row = (
            Pseudonym.select(Pseudonym.new)
            .where(
                (Pseudonym.project == self.project) & (Pseudonym.namespace == space) & (Pseudonym.original == original)
            )
            .first()
        )
        return row.new if row is not None else None

    def map(self, level: Level, original: str) -> str:
        stripped = original.strip()
        space = namespace(level, stripped)
        with self._lock:
            new = self._memo.get((space, stripped))
        if new is not None:
            return new
        with self.db.connection_context():
            new = self._read(space, stripped)
            if new is None:
                candidate = str(uuid.uuid4()) if level is Level.PATIENT else generate_uid()
                with write_transaction(self.db):
                    Pseudonym.insert(project=self.project, namespace=space, original=stripped, new=candidate,
                                     created_at=utcnow()).on_conflict_ignore().execute()  # fmt: skip
                new = self._read(space, stripped)
        assert new is not None
        with self._lock:
            self._memo[(space, stripped)] = new
        return new

    def register(self, level: Level, original: str, new: str) -> None:
        """A forced value (a rule's ``Replace`` of a UID): it replaces whatever was there."""
        stripped = original.strip()
        space = namespace(level, stripped)
        with self.db.connection_context(), write_transaction(self.db):
            Pseudonym.insert(project=self.project, namespace=space, original=stripped, new=new,
                             created_at=utcnow()).on_conflict(
                conflict_target=[Pseudonym.project, Pseudonym.namespace, Pseudonym.original],
                update={Pseudonym.new: new},
            ).execute()  # fmt: skip
        with self._lock:
            self._memo[(space, stripped)] = new
