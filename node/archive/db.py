"""Opening the index: SQLite (default, WAL) or PostgreSQL by URL, schema created and versioned at start."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peewee import BooleanField, Database, DateTimeField, SqliteDatabase
from playhouse.db_url import connect as connect_url
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as migrate_columns

from node.archive.models import ALL_MODELS, SCHEMA_VERSION, Property, database

#: SQLite settings: WAL lets readers (REST, C-FIND) run while a C-STORE commits; synchronous=FULL makes each
#: commit durable on its own (the SCP answers Success only after it); busy_timeout queues writers of several
#: receiver processes instead of failing them.
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "busy_timeout": 60000,
    "foreign_keys": 1,
    "cache_size": -16000,
}


class SchemaError(RuntimeError):
    """The index was written by a newer dicom-node, or cannot be migrated."""


def connect(url: str) -> Database:
    """A peewee database for ``sqlite:///path`` or ``postgresql://…`` (bound to the models)."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        db: Database = SqliteDatabase(str(path), pragmas=SQLITE_PRAGMAS, timeout=60)
    else:
        db = connect_url(url)
    database.initialize(db)
    return db


def open_index(url: str) -> Database:
    """Connect, create missing tables, check and record the schema version (migrating an older index)."""
    db = connect(url)
    with db.connection_context(), db.atomic():
        version = None
        if db.table_exists(Property._meta.table_name):
            row = Property.get_or_none(Property.key == "SchemaVersion")
            version = int(row.value) if row is not None else None
        if version is not None and version > SCHEMA_VERSION:
            raise SchemaError(
                f"the index at {url} has schema version {version}, newer than this dicom-node "
                f"({SCHEMA_VERSION}): upgrade dicom-node"
            )
        if version is not None and version < SCHEMA_VERSION:
            migrate(db, version)  # before create_tables: its indexes may name the columns a migration adds
        db.create_tables(ALL_MODELS, safe=True)
        if version is None:
            Property.create(key="SchemaVersion", value=str(SCHEMA_VERSION))
        elif version < SCHEMA_VERSION:
            Property.update(value=str(SCHEMA_VERSION)).where(Property.key == "SchemaVersion").execute()
    return db


def migrate(db: Database, from_version: int) -> None:
    """Bring an older index up to :data:`SCHEMA_VERSION` (called inside the opening transaction).

    1 → 2 only added the Pseudonym table, which ``create_tables(safe=True)`` creates next (as it does 3's
    Outbox and 4's Metadata). 2 → 3 adds the stability columns to Series and Study; resources already there
    start *stable*, so switching on a StableStudy rule does not forward the whole existing archive.
    """
    if from_version < 1:
        raise SchemaError(f"no migration from schema version {from_version} to {SCHEMA_VERSION}")
    if from_version < 3:
        migrator = SchemaMigrator.from_database(db)
        ops = []
        for table in ("series", "study"):
            columns = {c.name for c in db.get_columns(table)}
            if "stable_pending" not in columns:
                ops.append(migrator.add_column(table, "stable_pending", BooleanField(default=False, index=True)))
            if "stable_seen" not in columns:
                ops.append(migrator.add_column(table, "stable_seen", DateTimeField(null=True)))
        migrate_columns(*ops)
        for table in ("series", "study"):
            db.execute_sql(f'CREATE INDEX IF NOT EXISTS "{table}_stable_pending" ON "{table}" (stable_pending)')


@contextlib.contextmanager
def write_transaction(db: Database) -> Iterator[Any]:
    """A transaction that takes the write lock up front on SQLite (no deadlock on lock upgrade)."""
    if isinstance(db, SqliteDatabase):
        with db.atomic("IMMEDIATE") as tx:
            yield tx
    else:
        with db.atomic() as tx:
            yield tx
