"""The persistent UID map: :class:`~node.dicom.uidmap.UidMap` backed by the index (table ``pseudonym``).

Routing anonymizes instance by instance, in several processes, across restarts; Orthanc's per-request map
would give every instance its own new study (spec §3.2, edge case 70). Each project has a secret key, made once
and kept in the index (``Property`` ``PseudonymKey:<project>``); a new value is derived from it and the
original (:class:`~node.dicom.uidmap.KeyedUidMap`), so every process finds the same value without a write
lock, and the pairs are recorded in the table in one transaction per batch (:meth:`DatabaseUidMap.flush`):
that table is what an authorised person reads to go back from a pseudonym to the original. A value already in
the table (a forced ``Replace``) wins over the derived one.
"""

from __future__ import annotations

import os
import threading

from peewee import Database, SqliteDatabase

from node.archive.db import write_transaction
from node.archive.models import Property, Pseudonym, utcnow
from node.dicom.levels import Level
from node.dicom.uidmap import KeyedUidMap, namespace

#: Pseudonym namespace of the ``Anonymized<N>`` numbers (keyed by the original PatientID), and the counter.
NAME_SPACE = "PATIENT-NAME"
NAME_COUNTER = "AnonymizationSequence"
#: Pairs recorded at the latest after this many new ones (a worker also flushes after each batch).
FLUSH_EVERY = 512
#: Values remembered in the process (derived ones can always be derived again).
MEMO_SIZE = 200_000


def _lock_counter(db: Database) -> Property | None:
    """The counter's row, locked until the transaction ends. SQLite's write lock is the whole file already;
    PostgreSQL locks the row, which must exist first (several nodes draw numbers from one index)."""
    counter = Property.select().where(Property.key == NAME_COUNTER)
    if not isinstance(db, SqliteDatabase):
        Property.insert(key=NAME_COUNTER, value="0").on_conflict_ignore().execute()
        counter = counter.for_update()
    return counter.first()  # type: ignore[no-any-return]


def next_anonymization_number(db: Database, count: int = 1) -> int:
    """Take the next N of ``Anonymized<N>`` from the index-wide counter (Orthanc's global property
    ``AnonymizationSequence``); with ``count`` > 1, reserve N..N+count-1. Call inside a write transaction."""
    row = _lock_counter(db)
    number = int(row.value) + 1 if row is not None else 1
    last = str(number + count - 1)
    Property.insert(key=NAME_COUNTER, value=last).on_conflict(
        conflict_target=[Property.key], update={Property.value: last}
    ).execute()
    return number


class NameCounter:
    """``Anonymized<N>`` numbers for one process, reserved from the index ``block`` at a time.

    Every ``/anonymize`` call takes a number (edge case 70); a durable commit per call would cost the REST
    route more than the anonymization of a small instance. Numbers stay unique across processes and
    restarts; a restart skips what was reserved and not used (Orthanc promises no more than uniqueness).
    """

    def __init__(self, db: Database, block: int = 32) -> None:
        self.db = db
        self.block = block
        self._lock = threading.Lock()
        self._next = self._end = 0

    def take(self) -> int:
        with self._lock:
            if self._next >= self._end:
                self.db.connect(reuse_if_open=True)  # this thread's connection, left open for its next call
                with write_transaction(self.db):
                    self._next = next_anonymization_number(self.db, self.block)
                self._end = self._next + self.block
            number, self._next = self._next, self._next + 1
            return number


def project_key(db: Database, project: str) -> bytes:
    """The project's secret, created on first use (insert-or-ignore then read: processes agree on it)."""
    name = f"PseudonymKey:{project}"
    with db.connection_context():
        row = Property.get_or_none(Property.key == name)
        if row is None:
            with write_transaction(db):
                Property.insert(key=name, value=os.urandom(32).hex()).on_conflict_ignore().execute()
            row = Property.get(Property.key == name)
    return bytes.fromhex(row.value)


class DatabaseUidMap:
    """One project's map. Thread-safe; values read once are remembered in the process (they never change)."""

    def __init__(self, db: Database, project: str) -> None:
        self.db = db
        self.project = project
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, str], str] = {}
        self._pending: list[tuple[str, str, str]] = []
        self._derive = KeyedUidMap(project_key(db, project))
        self._forced: set[tuple[str, str]] = set()
        #: Only values forced by ``register`` differ from the derived ones: without any, the table need not be
        #: read for each new original (a query per UID was a third of the anonymization time).
        with db.connection_context():
            self._check_table = Property.get_or_none(Property.key == f"PseudonymForced:{project}") is not None

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
        if self._check_table:
            with self.db.connection_context():
                new = self._read(space, stripped)
        flush = False
        with self._lock:
            if new is None:
                new = self._derive.map(level, stripped)
                self._pending.append((space, stripped, new))
                flush = len(self._pending) >= FLUSH_EVERY
            if len(self._memo) > MEMO_SIZE:
                self._memo = {k: v for k, v in self._memo.items() if k in self._forced}
            self._memo[(space, stripped)] = new
        if flush:
            self.flush()
        return new

    def flush(self) -> None:
        """Record the new pairs (one transaction); a pair recorded meanwhile by another process is the same."""
        with self._lock:
            pending, self._pending = sorted(self._pending), []  # one key order in every process: no deadlock
        if not pending:
            return
        now = utcnow()
        with self.db.connection_context(), write_transaction(self.db):
            for i in range(0, len(pending), 100):
                rows = [{"project": self.project, "namespace": space, "original": old, "new": new, "created_at": now}
                        for space, old, new in pending[i : i + 100]]  # fmt: skip
                Pseudonym.insert_many(rows).on_conflict_ignore().execute()

    def register(self, level: Level, original: str, new: str) -> None:
        """A forced value (a rule's ``Replace`` of a UID): it replaces whatever was there."""
        stripped = original.strip()
        space = namespace(level, stripped)
        with self._lock:
            if self._memo.get((space, stripped)) == new:
                return  # every instance of the rule registers the same value: write it once
        with self.db.connection_context(), write_transaction(self.db):
            Property.insert(key=f"PseudonymForced:{self.project}", value="1").on_conflict_ignore().execute()
            Pseudonym.insert(project=self.project, namespace=space, original=stripped, new=new,
                             created_at=utcnow()).on_conflict(
                conflict_target=[Pseudonym.project, Pseudonym.namespace, Pseudonym.original],
                update={Pseudonym.new: new},
            ).execute()  # fmt: skip
        with self._lock:
            self._memo[(space, stripped)] = new
            self._forced.add((space, stripped))
        self._check_table = True

    def patient_name_number(self, original_patient_id: str) -> int:
        """The N of ``Anonymized<N>`` for a patient: drawn once from the index-wide counter (Orthanc's
        ``AnonymizationSequence``), then the same for every instance of that patient in this project."""
        stripped = original_patient_id.strip()
        with self._lock:
            memo = self._memo.get((NAME_SPACE, stripped))
        if memo is not None:
            return int(memo)
        with self.db.connection_context():
            found = self._read(NAME_SPACE, stripped)
            if found is None:
                with write_transaction(self.db):
                    # Read again under the write lock (PostgreSQL: the counter's row lock, taken first), since
                    # another process may have been first: no number wasted, none drawn twice.
                    _lock_counter(self.db)
                    if self._read(NAME_SPACE, stripped) is None:
                        number = next_anonymization_number(self.db)
                        values = {"project": self.project, "namespace": NAME_SPACE, "original": stripped,
                                  "new": str(number), "created_at": utcnow()}  # fmt: skip
                        Pseudonym.insert(**values).on_conflict_ignore().execute()
                found = self._read(NAME_SPACE, stripped)
        assert found is not None
        with self._lock:
            self._memo[(NAME_SPACE, stripped)] = found
        return int(found)
