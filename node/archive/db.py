"""Opening the index: SQLite (default, WAL) or PostgreSQL by URL, schema created and versioned at start."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peewee import SQL, BooleanField, CharField, Database, DateTimeField, Field, PostgresqlDatabase, SqliteDatabase
from playhouse.db_url import parse as parse_url
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as migrate_columns
from playhouse.pool import PooledPostgresqlDatabase

from node.archive.models import ALL_MODELS, SCHEMA_VERSION, Patient, Property, Study, database, fold

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


#: PostgreSQL advisory lock key held while the schema is checked, created or migrated ("dicomnod").
_SCHEMA_LOCK = 0x6469636F6D6E6F64


class SchemaError(RuntimeError):
    """The index was written by a newer dicom-node, or cannot be migrated."""


class _Lease:
    """A pooled connection held by one thread: handed back to the pool when that thread ends without closing it.

    The receivers keep one connection per association thread open between C-STOREs (:func:`node.archive.store.store`
    connects with ``reuse_if_open``); pynetdicom ends the thread with the association. peewee's pool would count
    such a connection as in use forever and refuse new ones after ``max_connections`` associations. The lease
    lives in the thread's ``threading.local`` state, so it is collected with the thread.
    """

    __slots__ = ("armed", "conn", "db")

    def __init__(self, db: PooledPostgresqlDatabase, conn: Any) -> None:
        self.db, self.conn, self.armed = db, conn, True

    def __del__(self) -> None:
        if self.armed:
            self.armed = False
            with contextlib.suppress(Exception):  # a finaliser never raises; the pool drops a broken connection
                self.db._close(self.conn)


class NodePostgresqlDatabase(PooledPostgresqlDatabase):
    """PostgreSQL with a pool of connections per process (see :class:`_Lease` for threads that never close)."""

    def connect(self, reuse_if_open: bool = False) -> bool:
        opened = super().connect(reuse_if_open)
        if opened:
            self._state.lease = _Lease(self, self._state.conn)
        return bool(opened)

    def close(self) -> bool:
        lease = getattr(self._state, "lease", None)
        if lease is not None:
            lease.armed = False
            self._state.lease = None
        return bool(super().close())


def sql_for(db: Database, template: str) -> str:
    """Raw SQL written with ``?`` placeholders, in the database's own parameter style (``%s`` on PostgreSQL):
    what the hot paths run instead of building a peewee query each time."""
    return template.replace("?", db.param)


def is_postgres(db_or_url: Database | str) -> bool:
    if isinstance(db_or_url, str):
        return db_or_url.startswith(("postgresql://", "postgres://"))
    return isinstance(db_or_url, PostgresqlDatabase)


#: Connections one process keeps at most (every association thread, REST request or job holds one while it
#: works); a thread asking for one more waits up to ``POOL_WAIT_S`` for one to be handed back.
POOL_SIZE = 40
POOL_WAIT_S = 60
#: An idle pooled connection older than this is closed rather than reused (a server restart, a proxy timeout).
POOL_STALE_S = 300


def connect(url: str) -> Database:
    """A peewee database for ``sqlite:///path`` or ``postgresql://…`` (bound to the models)."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        db: Database = SqliteDatabase(str(path), pragmas=SQLITE_PRAGMAS, timeout=60)
    elif is_postgres(url):
        params = parse_url("postgresql://" + url.split("://", 1)[1])
        name = params.pop("database")
        params.setdefault("connect_timeout", 10)
        db = NodePostgresqlDatabase(name, max_connections=POOL_SIZE, stale_timeout=POOL_STALE_S, timeout=POOL_WAIT_S,
                                    **params)  # fmt: skip
    else:
        raise ValueError(f"not a sqlite:/// or postgresql:// URL: {url!r}")
    database.initialize(db)
    return db


def reset_if_broken(db: Database) -> bool:
    """After a database error: drop this thread's connection if the server closed it (a PostgreSQL restart or
    failover), so that the next query opens a new one. Threads that keep their connection open (receivers,
    routing workers) would otherwise fail on the dead one until they end. Returns whether one was dropped."""
    if not isinstance(db, PostgresqlDatabase) or db.is_closed():
        return False
    try:
        broken = bool(db.connection().closed)
    except Exception:  # noqa: BLE001 - cannot even look at it: drop it
        broken = True
    if broken:
        with contextlib.suppress(Exception):
            if isinstance(db, PooledPostgresqlDatabase):
                db.manual_close()  # not back into the pool
            else:
                db.close()
    return broken


def release_connections(db: Database) -> None:
    """Close every connection of this process' pool (before ``fork``: a child must not share a server socket)."""
    if isinstance(db, PooledPostgresqlDatabase):
        db.close_all()
    else:
        db.close()


def open_index(url: str) -> Database:
    """Connect, create missing tables, check and record the schema version (migrating an older index)."""
    db = connect(url)
    with db.connection_context(), db.atomic():
        if is_postgres(db):  # nodes starting together: one creates or migrates the schema, the others wait
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        version = None
        if db.table_exists(Property._meta.table_name):
            row = Property.get_or_none(Property.key == "SchemaVersion")
            version = int(row.value) if row is not None else None
        if version is not None and version > SCHEMA_VERSION:
            raise SchemaError(
                f"the index at {url} has schema version {version}, newer than this dicom-node "
                f"({SCHEMA_VERSION}): upgrade dicom-node"
            )
        if version == SCHEMA_VERSION:
            # Up to date: no DDL at all. On PostgreSQL even ``CREATE INDEX IF NOT EXISTS`` takes a SHARE lock on
            # its table, which deadlocked with a receiver's insert when a worker process opened the index.
            return db
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
    4 → 5: see :func:`_migrate_to_5`. Columns are only ever added in place (:func:`_add_column`).
    """
    if from_version < 1:
        raise SchemaError(f"no migration from schema version {from_version} to {SCHEMA_VERSION}")
    if from_version < 3:
        for table in ("series", "study"):
            columns = {c.name for c in db.get_columns(table)}
            if "stable_pending" not in columns:
                _add_column(db, table, "stable_pending", BooleanField(default=False, index=True), "FALSE")
            if "stable_seen" not in columns:
                migrate_columns(SchemaMigrator.from_database(db).add_column(table, "stable_seen",
                                                                             DateTimeField(null=True)))  # fmt: skip
        for table in ("series", "study"):
            db.execute_sql(f'CREATE INDEX IF NOT EXISTS "{table}_stable_pending" ON "{table}" (stable_pending)')
    if from_version < 5:
        _migrate_to_5(db)


def _add_column(db: Database, table: str, column: str, field: Field, default_sql: str) -> None:
    """``ALTER TABLE … ADD COLUMN … NOT NULL DEFAULT …``: the column added in place, existing rows given the default.

    Not playhouse's plain ``add_column`` for a NOT NULL column: on SQLite < 3.53 it adds the column nullable and
    then *rebuilds the table* to make it NOT NULL (copy, ``DROP TABLE``, rename), and with ``foreign_keys`` on,
    SQLite's ``DROP TABLE`` deletes the rows first, with their ``ON DELETE CASCADE``: migrating ``study`` that way
    emptied ``series`` and ``instance``. A default in the DDL needs no rebuild (SQLite and PostgreSQL).
    """
    field = field.clone()
    field.constraints = [*(field.constraints or []), SQL(f"DEFAULT {default_sql}")]
    migrator = SchemaMigrator.from_database(db)
    migrate_columns(migrator.add_column(table, column, field, allow_not_null=True))


#: Rows read and rewritten per statement when filling the folded columns (bounded memory on a big index).
_FILL_BATCH = 10_000


def _migrate_to_5(db: Database) -> None:
    """Add and fill the folded columns (``patient_name_folded``…: see :mod:`node.archive.models`), and swap
    the ``series (modality)`` index for ``series (modality, study_id)``.

    The folded values are computed in Python (:func:`fold`: no SQL function folds the same way), a keyset page
    of rows at a time; every existing row is filled, also when the column was already there, so a folded value
    can never disagree with its source after the upgrade. The new indexes are created by ``create_tables`` right
    after (it creates missing indexes of existing tables): building them once on filled columns is faster than
    maintaining them during the fill. On a million-study index this takes seconds, once, at the first start.
    """
    for model in (Patient, Study):
        table = model._meta.table_name
        columns = {c.name for c in db.get_columns(table)}
        for folded in model.FOLDED.values():
            if folded not in columns:
                _add_column(db, table, folded, CharField(default=""), "''")
        for source, folded in model.FOLDED.items():
            _fill_folded(db, table, source, folded)
    db.execute_sql('DROP INDEX IF EXISTS "series_modality"')


def _fill_folded(db: Database, table: str, source: str, folded: str) -> None:
    select = f'SELECT id, "{source}", "{folded}" FROM "{table}" WHERE id > {db.param} ORDER BY id LIMIT {_FILL_BATCH}'
    update = f'UPDATE "{table}" SET "{folded}" = {db.param} WHERE id = {db.param}'
    last = 0
    while True:
        rows = db.execute_sql(select, (last,)).fetchall()
        changed = [(fold(value or ""), row_id) for row_id, value, current in rows if fold(value or "") != current]
        if changed:
            db.cursor().executemany(update, changed)
        if len(rows) < _FILL_BATCH:
            return
        last = rows[-1][0]


#: PostgreSQL SQLSTATEs that mean "this transaction lost a race, run it again": deadlock_detected,
#: serialization_failure, lock_not_available.
_TRANSIENT = frozenset({"40P01", "40001", "55P03"})


def is_transient(exc: BaseException) -> bool:
    """A database error that a retry of the whole transaction cures (another node's transaction won a race).

    peewee wraps the driver's exception: depending on its version and the path, the driver's exception is the
    first argument, the ``__cause__`` or (peewee 4's PostgreSQL path, which keeps only the message) the
    ``__context__``.
    """
    for candidate in (exc, exc.__cause__, exc.__context__, *(exc.args[:1] if exc.args else ())):
        if getattr(candidate, "pgcode", None) in _TRANSIENT:
            return True
    return False


@contextlib.contextmanager
def write_transaction(db: Database) -> Iterator[Any]:
    """A transaction that takes the write lock up front on SQLite (no deadlock on lock upgrade)."""
    if isinstance(db, SqliteDatabase):
        with db.atomic("IMMEDIATE") as tx:
            yield tx
    else:
        with db.atomic() as tx:
            yield tx
