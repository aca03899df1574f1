"""Running C-FIND constraints (:mod:`node.dicom.matching`) against the index at one level.

Shared by ``POST /tools/find`` and the Query/Retrieve SCP, so both answer the same resources for the same query.

How a query runs:

* Each constraint belongs to the level whose main DICOM tags hold its tag (:data:`LEVEL_KEYWORDS`). A tag of the
  queried level or of a parent (``PatientName`` in a study query) is checked on that row or its ancestor; a tag
  of a lower level (``Modality`` in a study query) matches when *some* descendant matches every lower-level
  constraint together, as Orthanc's SQL lookup joins the child resources. A tag the index does not keep is
  refused (:class:`NotIndexedTag`): Orthanc would open every candidate file, we say so instead of scanning.
* What an indexed column can decide goes into the SQL ``WHERE`` (exact values, lists, a wildcard's literal
  prefix as an index range, date ranges); SQL only narrows, every row is then re-checked in Python by the same
  matcher on its ``main_tags`` JSON, so a pushed-down predicate can never change the answer, only its cost.
  A case-insensitive constraint goes to the tag's *folded* column where it has one (``PatientName``,
  ``PatientID``, ``AccessionNumber``: :mod:`node.archive.models`), or to the plain column when its value has
  no character that case folding could change or produce (a UID, a date, a numeric ID); else it stays in Python.
* ``ModalitiesInStudy`` (PS3.4 C.6.1.1.3: a study matches when one of its series has one of the modalities) at
  the study or patient level is a ``Modality`` constraint on the series below, which the (modality, study) index
  of the series table answers.
* Rows come out in row-id order, which is insertion order: deterministic, and ``since``/``limit`` page through
  it. They are read in pages of ``batch`` rows, no cursor held across pages (a C-FIND answers at the pace of
  its peer; a read held that long would pin the WAL). With an SQL predicate, the ids of the matching rows are
  read first by one query *without* ``ORDER BY`` and sorted here: asked for row-id order, SQLite (which has no
  statistics, no ``ANALYZE`` is ever run) walks the table by rowid instead of searching the date index, and
  keyset pages over an index range would re-read the range for every page. When only lower levels have
  indexed constraints (``ModalitiesInStudy=MG`` alone), the ids come from the lower table's index
  (``SELECT DISTINCT study_id FROM series WHERE modality = ?``). Without any predicate (a listing, or
  constraints no column holds), keyset pages by row id walk the table: the whole table is the answer's domain.
* Each row comes with its ancestors' main tags, read in the same query (a primary-key lookup per row), so
  :func:`inherited_tags` answers from memory: a C-FIND answering hundreds of studies costs no query per answer.

Every query kind a PACS viewer sends (PatientID, PatientName prefix, StudyDate range, AccessionNumber,
StudyInstanceUID, the series of a study, ModalitiesInStudy) is answered by index searches only: ``tests/
test_find.py`` checks SQLite's plans, and ``scripts/bench_qr.py`` measures them on a million instances.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import string
from collections.abc import Iterator, Sequence

from peewee import SQL, Database, Expression, Field, Model, ModelSelect, SqliteDatabase, fn
from pydicom.tag import BaseTag, Tag

from node.archive.models import Instance, Patient, Series, Study, fold
from node.dicom.levels import Level
from node.dicom.maintags import INSTANCE_TAGS, PATIENT_TAGS, SERIES_TAGS, STUDY_TAGS
from node.dicom.matching import Constraint, Kind, QueryError, literal_prefix

MODELS: dict[Level, type[Model]] = {Level.PATIENT: Patient, Level.STUDY: Study, Level.SERIES: Series,
                                    Level.INSTANCE: Instance}  # fmt: skip
#: The foreign key from a level's table to its parent's.
_PARENT_FK: dict[Level, Field] = {
    Level.STUDY: Study.patient,
    Level.SERIES: Series.study,
    Level.INSTANCE: Instance.series,
}

#: Tags kept in a real column beside ``main_tags`` only (the matcher reads them from the column).
_EXTRA_COLUMNS: dict[Level, dict[str, Field]] = {Level.INSTANCE: {"SOPClassUID": Instance.sop_class_uid}}

#: The keywords each level's index row can answer for.
LEVEL_KEYWORDS: dict[Level, frozenset[str]] = {
    Level.PATIENT: frozenset(PATIENT_TAGS),
    Level.STUDY: frozenset(STUDY_TAGS),
    Level.SERIES: frozenset(SERIES_TAGS),
    Level.INSTANCE: frozenset(INSTANCE_TAGS) | frozenset(_EXTRA_COLUMNS[Level.INSTANCE]),
}

#: Indexed columns holding the same string as ``main_tags[keyword]`` ("" when the tag is absent).
_COLUMNS: dict[tuple[Level, str], Field] = {
    (Level.PATIENT, "PatientID"): Patient.patient_id,
    (Level.PATIENT, "PatientName"): Patient.patient_name,
    (Level.STUDY, "StudyInstanceUID"): Study.study_uid,
    (Level.STUDY, "StudyDate"): Study.study_date,
    (Level.STUDY, "AccessionNumber"): Study.accession_number,
    (Level.SERIES, "SeriesInstanceUID"): Series.series_uid,
    (Level.SERIES, "Modality"): Series.modality,
    (Level.INSTANCE, "SOPInstanceUID"): Instance.sop_uid,
}

#: Indexed columns holding :func:`node.archive.models.fold` of a ``_COLUMNS`` column, for case-insensitive
#: constraints (C-FIND's PN, every tag of a ``/tools/find`` without ``CaseSensitive``).
_FOLDED_COLUMNS: dict[tuple[Level, str], Field] = {
    (Level.PATIENT, "PatientName"): Patient.patient_name_folded,
    (Level.PATIENT, "PatientID"): Patient.patient_id_folded,
    (Level.STUDY, "AccessionNumber"): Study.accession_number_folded,
}

#: Characters that case folding maps to themselves and that no other character folds to (or into part of):
#: a value made of these matches case-insensitively exactly the strings it matches case-sensitively, so the
#: plain index serves it (UIDs, dates, numeric IDs). Only ASCII letters occur in the folding of another
#: character; ``tests/test_find.py`` checks that over all of Unicode.
FOLD_INVARIANT = frozenset(string.digits + string.punctuation + " ")

#: Study-level keys answered by the series below them (PS3.4 C.6.1.1.3): a study matches when some series
#: matches. Only in queries at the study level or above; deeper levels keep refusing them (not indexed).
_CHILD_KEYS: dict[str, tuple[str, BaseTag]] = {"ModalitiesInStudy": ("Modality", Tag("Modality"))}


class NotIndexedTag(QueryError):
    """A constraint on a tag that no level of the index keeps (not a main DICOM tag)."""


def tag_level(keyword: str, level: Level) -> Level | None:
    """The level whose row answers for ``keyword`` in a query at ``level``: the deepest one at or above
    ``level`` that keeps it, else the nearest one below (``ImageOrientationPatient`` is kept by both series and
    instances); ``None`` when no level keeps it."""
    holders = [lv for lv in Level if keyword in LEVEL_KEYWORDS[lv]]
    above = [lv for lv in holders if lv <= level]
    if above:
        return max(above)
    return min(holders) if holders else None


def _as_child_key(c: Constraint, level: Level) -> Constraint:
    """``ModalitiesInStudy`` as the ``Modality`` constraint on the series it stands for (same values, same
    matching: one of the listed modalities, a wildcard on the modality), at the study level or above."""
    target = _CHILD_KEYS.get(c.keyword)
    if target is None or level > Level.STUDY:
        return c
    keyword, tag = target
    return dataclasses.replace(c, tag=tag, keyword=keyword)


def plan(level: Level, constraints: Sequence[Constraint]) -> dict[Level, list[Constraint]]:
    """Group the non-universal constraints by answering level; raise :class:`NotIndexedTag` for a tag no level
    keeps (a universal constraint on it is fine: it excludes nothing)."""
    by_level: dict[Level, list[Constraint]] = {}
    for c in constraints:
        if c.is_universal:
            continue
        c = _as_child_key(c, level)
        where = tag_level(c.keyword, level) if c.keyword else None
        if where is None:
            raise NotIndexedTag(
                f"tag {c.name} is not one of the main DICOM tags the index keeps: it cannot be searched "
                f"(searchable: {', '.join(sorted(set().union(*LEVEL_KEYWORDS.values())))})"
            )
        by_level.setdefault(where, []).append(c)
    return by_level


def _successor(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (code point order), ``None`` when
    there is none (a prefix of U+10FFFF only)."""
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    last = ord(stripped[-1]) + 1
    if 0xD800 <= last <= 0xDFFF:
        last = 0xE000
    return stripped[:-1] + chr(last)


def code_point_order(db: Database) -> bool:
    """Whether the index compares text by code point, as the matcher does: SQLite (BINARY collation), or a
    PostgreSQL database created with the ``C`` collation (``C``, ``POSIX``, ``C.UTF-8``). Then a prefix is an
    index range and a range predicate is exact (the ``sqlite`` flag below means this). Other collations (say
    ``en_US.UTF-8``) order by language rules: prefixes are compared as substrings and ranges re-checked in
    Python, correct but slower (``docs/deployment.md`` says to create the database with ``LC_COLLATE 'C'``)."""
    if isinstance(db, SqliteDatabase):
        return True
    cached = getattr(db, "_dicom_node_code_point_order", None)
    if cached is None:
        # PostgreSQL 15+ may take the collation from ICU (datlocprovider 'i'), whose rules ignore datcollate.
        (version,) = db.execute_sql("SELECT current_setting('server_version_num')::int").fetchone()
        icu = "datlocprovider <> 'c'" if version >= 150000 else "FALSE"
        row = db.execute_sql(f"SELECT datcollate, {icu} FROM pg_database WHERE datname = current_database()").fetchone()
        cached = row is not None and not row[1] and str(row[0]).split(".")[0] in ("C", "POSIX")
        db._dicom_node_code_point_order = cached  # type: ignore[attr-defined]
    return bool(cached)


def _starts_with(column: Field, prefix: str, sqlite: bool) -> Expression:
    """``column`` starts with ``prefix``, case-sensitively. Where text sorts by code point (``sqlite``: see
    :func:`code_point_order`) as an index range; elsewhere (a PostgreSQL collation need not sort by code point)
    by comparing a substring."""
    if not sqlite:
        return fn.SUBSTR(column, 1, len(prefix)) == prefix
    cond: Expression = column >= prefix
    successor = _successor(prefix)
    return cond & (column < successor) if successor is not None else cond


def pushdown(c: Constraint, column: Field, sqlite: bool) -> Expression | None:
    """A SQL predicate every row matching ``c`` satisfies (a superset: rows are re-checked), or ``None``.

    Case-insensitive constraints stay in Python: SQL's ``lower()`` folds ASCII only, and a predicate that
    misses ``É`` would lose rows.
    """
    if c.kind is Kind.RANGE:
        lower, upper = c.values
        cond: Expression = column != ""
        if lower:
            cond &= column >= lower
        successor = _successor(upper) if upper else None
        if successor is not None:
            cond &= column < successor  # the bound covers what it prefixes (matching.Constraint.matches)
        return cond
    if not c.case_sensitive:
        return None
    if c.kind is Kind.SINGLE:
        return column == c.values[0]
    if c.kind is Kind.LIST:
        return column.in_(list(c.values))
    if c.kind is Kind.WILDCARD:
        prefix = literal_prefix(c.values[0])
        return _starts_with(column, prefix, sqlite) if prefix else None
    return None


def _fold_invariant(c: Constraint) -> bool:
    """Whether ignoring case cannot change what ``c`` selects (see :data:`FOLD_INVARIANT`): for a wildcard,
    the part an index range uses (its literal prefix) is what counts."""
    texts = (literal_prefix(c.values[0]),) if c.kind is Kind.WILDCARD else c.values
    return all(ch in FOLD_INVARIANT for text in texts for ch in text)


def _predicate(lv: Level, c: Constraint, sqlite: bool) -> Expression | None:
    """The SQL predicate of one constraint answered at level ``lv`` (a superset of its matches), or ``None``."""
    column = _COLUMNS.get((lv, c.keyword))
    if column is None:
        return None
    if c.case_sensitive or c.kind in (Kind.RANGE, Kind.UNIVERSAL):
        return pushdown(c, column, sqlite)
    folded = _FOLDED_COLUMNS.get((lv, c.keyword))
    if folded is not None:
        # The folded column holds fold(value); fold(pattern) keeps the wildcards (only letters fold to
        # something else), so its literal prefix is the fold of the pattern's literal prefix.
        folded_c = dataclasses.replace(c, values=tuple(fold(v) for v in c.values), case_sensitive=True)
        return pushdown(folded_c, folded, sqlite)
    if _fold_invariant(c):
        return pushdown(dataclasses.replace(c, case_sensitive=True), column, sqlite)
    return None


def _exact(lv: Level, c: Constraint, sqlite: bool) -> bool:
    """Whether the SQL predicate of ``c`` selects exactly the rows the matcher accepts, so the Python re-check
    can be skipped: equality and lists (on the column, its folded copy, or a fold-invariant value), a plain
    prefix ``ABC*`` (the matcher's ``ABC.*`` is "starts with"), and on SQLite a range (BINARY collation compares
    code points as the matcher does; a PostgreSQL collation may not). The column holds the same string as
    ``main_tags`` ("" for an absent tag), written together by every writer."""
    if _predicate(lv, c, sqlite) is None:
        return False
    if c.kind in (Kind.SINGLE, Kind.LIST):
        return True
    if c.kind is Kind.WILDCARD:
        return c.values[0] == literal_prefix(c.values[0]) + "*"
    return c.kind is Kind.RANGE and sqlite


def _all_exact(by_level: dict[Level, list[Constraint]], sqlite: bool) -> bool:
    return all(_exact(lv, c, sqlite) for lv, constraints in by_level.items() for c in constraints)


def _conditions(by_level: dict[Level, list[Constraint]], sqlite: bool) -> list[Expression]:
    out = []
    for lv, constraints in by_level.items():
        for c in constraints:
            cond = _predicate(lv, c, sqlite)
            if cond is not None:
                out.append(cond)
    return out


def _join_up(query: ModelSelect, start: Level, stop: Level) -> ModelSelect:
    """Join ``start``'s table to each parent table up to ``stop`` (inclusive)."""
    lv = start
    while lv > stop:
        parent = Level(lv - 1)
        query = query.join_from(MODELS[lv], MODELS[parent], on=(_PARENT_FK[lv] == MODELS[parent].id))
        lv = parent
    return query


def _tags(main_tags: str, extras: dict[str, str] | None = None) -> dict[str, str]:
    tags: dict[str, str] = json.loads(main_tags) if main_tags else {}
    if extras:
        tags.update(extras)
    return tags


def _ok(constraints: list[Constraint], tags: dict[str, str]) -> bool:
    return all(c.matches(tags.get(c.keyword)) for c in constraints)


def _alias(lv: Level, name: str = "main_tags") -> str:
    return f"find_{name}_{int(lv)}"


#: SQLite has had JSON functions built in since 3.38; older builds may lack ``json_each``.
_JSON_EACH = sqlite3.sqlite_version_info >= (3, 38, 0)


def _id_in(field: Field, ids: list[int], sqlite: bool) -> Expression:
    """``field IN ids``. On SQLite the ids travel as one JSON parameter (``json_each``): peewee renders a list
    of 500 values node by node, 3.7 ms of the 15 ms a page of 500 studies costs, and the SQL text stays the same
    whatever the page's length. Every id is still an ``INTEGER PRIMARY KEY`` (or index) lookup."""
    if sqlite and _JSON_EACH:
        return field.in_(SQL("(SELECT value FROM json_each(?))", [json.dumps(ids)]))
    return field.in_(ids)


def _select(level: Level) -> ModelSelect:
    """``level``'s rows joined to every ancestor, selecting the ancestors' main tags (and extra columns) under
    :func:`_alias` names: what the Python re-check and :func:`inherited_tags` read. The joins follow foreign
    keys to primary keys, so they add a lookup per row and never change which table drives the search."""
    model = MODELS[level]
    fields: list[Field] = [model]
    for lv in Level:
        if lv < level:
            fields.append(MODELS[lv].main_tags.alias(_alias(lv)))
            fields += [col.alias(_alias(lv, kw)) for kw, col in _EXTRA_COLUMNS.get(lv, {}).items()]
    query = model.select(*fields)
    return _join_up(query, level, Level.PATIENT) if level > Level.PATIENT else query


#: Attribute under which a row keeps the main tags the re-check parsed ({level: tags}), for inherited_tags().
_PARSED = "_find_parsed"


def _check_upper(row: Model, level: Level, upper: dict[Level, list[Constraint]]) -> bool:
    """The Python re-check of the constraints of ``level`` and its parents on one row of :func:`_select`
    (the parsed tags stay on the row: :func:`inherited_tags` would parse them again)."""
    parsed: dict[Level, dict[str, str]] = {}
    setattr(row, _PARSED, parsed)
    for lv, constraints in upper.items():
        if lv == level:
            extras = {kw: getattr(row, col.name) for kw, col in _EXTRA_COLUMNS.get(lv, {}).items()}
            tags = _tags(row.main_tags, extras)
        else:
            extras = {kw: getattr(row, _alias(lv, kw)) for kw in _EXTRA_COLUMNS.get(lv, {})}
            tags = _tags(getattr(row, _alias(lv)), extras)
        parsed[lv] = tags
        if not _ok(constraints, tags):
            return False
    return True


def _candidates(
    db: Database,
    level: Level,
    upper: dict[Level, list[Constraint]],
    batch: int,
    lower: dict[Level, list[Constraint]] | None = None,
) -> Iterator[Model]:
    """Rows of ``level`` satisfying the constraints of ``level`` and its parents, in row-id order, a page at a
    time; with ``lower`` (constraints below ``level``, and none of ``upper`` in SQL) only the rows that the lower
    tables' indexes name (the module docstring says which way is taken when)."""
    model = MODELS[level]
    sqlite, ordered = isinstance(db, SqliteDatabase), code_point_order(db)
    base = _select(level)
    conditions = _conditions(upper, ordered)
    if conditions:
        ids = _matching_ids(level, upper, conditions, ordered)
    elif lower and (below := _conditions(lower, ordered)):
        ids = _ids_below(level, lower, below)
    else:
        yield from _keyset(base, level, upper, batch)
        return
    recheck = not _all_exact(upper, ordered)
    for start in range(0, len(ids), batch):
        page = base.where(_id_in(model.id, ids[start : start + batch], sqlite)).order_by(model.id).objects()
        for row in page:
            if not recheck or _check_upper(row, level, upper):
                yield row


def _matching_ids(
    level: Level, upper: dict[Level, list[Constraint]], conditions: list[Expression], sqlite: bool
) -> list[int]:
    """Ids of the rows of ``level`` the SQL predicates select (joined up to the highest parent that has one),
    sorted. No ``ORDER BY``, so that the planner drives from the predicates' indexes (module docstring)."""
    model = MODELS[level]
    query = model.select(model.id)
    top = min(lv for lv, cs in upper.items() if any(_predicate(lv, c, sqlite) is not None for c in cs))
    if top < level:
        query = _join_up(query, level, top)
    return sorted(r[0] for r in query.where(*conditions).tuples())


def _ids_below(level: Level, lower: dict[Level, list[Constraint]], conditions: list[Expression]) -> list[int]:
    """Ids of the rows of ``level`` having a descendant the lower-level SQL predicates select, sorted (e.g. the
    studies with an MG series: the (modality, study) index alone). Rows are re-checked by :func:`_keep`."""
    child = Level(level + 1)
    fk = _PARENT_FK[child]
    deepest = max(lower)
    query = _join_up(MODELS[deepest].select(fk), deepest, child).where(*conditions).distinct()
    return sorted(r[0] for r in query.tuples())


def _keyset(base: ModelSelect, level: Level, upper: dict[Level, list[Constraint]], batch: int) -> Iterator[Model]:
    """Every row of ``level`` in keyset pages by row id, re-checked: for queries no column can narrow."""
    model = MODELS[level]
    last = 0
    while True:
        rows = list(base.where(model.id > last).order_by(model.id).limit(batch).objects())
        for row in rows:
            if _check_upper(row, level, upper):
                yield row
        if len(rows) < batch:
            return
        last = rows[-1].id


def _with_descendants(db: Database, level: Level, lower: dict[Level, list[Constraint]], ids: list[int]) -> set[int]:
    """Which of the rows ``ids`` of ``level`` have a descendant chain satisfying every lower-level constraint
    (one series and one of its instances together, as Orthanc's joins do). One query per page of rows."""
    deepest = max(lower)
    child = Level(level + 1)
    sqlite, ordered = isinstance(db, SqliteDatabase), code_point_order(db)
    if _all_exact(lower, ordered):  # SQL decides alone: which ancestors, from the indexes (no main_tags read)
        fk = _PARENT_FK[child]
        exact = _join_up(MODELS[deepest].select(fk).distinct(), deepest, child)
        return {r[0] for r in exact.where(_id_in(fk, ids, sqlite), *_conditions(lower, ordered)).tuples()}
    fields: list[Field] = [_PARENT_FK[child]]
    levels = [lv for lv in lower if lv > level]
    for lv in levels:
        fields.append(MODELS[lv].main_tags)
        fields += list(_EXTRA_COLUMNS.get(lv, {}).values())
    query = _join_up(MODELS[deepest].select(*fields), deepest, child)
    query = query.where(_id_in(_PARENT_FK[child], ids, sqlite), *_conditions(lower, ordered))
    found: set[int] = set()
    for values in query.tuples().iterator():
        ancestor, rest = values[0], list(values[1:])
        if ancestor in found:
            continue
        ok = True
        for lv in levels:
            main = rest.pop(0)
            extras = {kw: rest.pop(0) for kw in _EXTRA_COLUMNS.get(lv, {})}
            if not _ok(lower[lv], _tags(main, extras)):
                ok = False
                break
        if ok:
            found.add(ancestor)
    return found


def find(
    db: Database,
    level: Level,
    constraints: Sequence[Constraint],
    *,
    since: int = 0,
    limit: int = 0,
    max_results: int = 0,
    batch: int = 500,
) -> Iterator[Model]:
    """The rows of ``level`` matching every constraint, in row-id order (call inside a connection context).

    ``since`` skips that many matches and ``limit`` (0: no limit) caps what is yielded, as Orthanc's ``Since``
    and ``Limit``; ``max_results`` (0: none; Orthanc's ``LimitFindResults``/``LimitFindInstances``) caps the
    matches considered before ``since``, so a caller can ask for ``n + 1`` to learn whether there were more.
    Raises :class:`NotIndexedTag` (and ``ValueError`` for bad counts) when called, before any query, so a
    front end can refuse a request before it starts answering.
    """
    if since < 0 or limit < 0 or max_results < 0 or batch < 1:
        raise ValueError("since, limit and max_results must be >= 0, batch >= 1")
    by_level = plan(level, constraints)
    upper = {lv: cs for lv, cs in by_level.items() if lv <= level}
    lower = {lv: cs for lv, cs in by_level.items() if lv > level}
    return _window(_matching(db, level, upper, lower, batch), since, limit, max_results)


def _window(rows: Iterator[Model], since: int, limit: int, max_results: int) -> Iterator[Model]:
    seen = yielded = 0
    for row in rows:
        seen += 1
        if max_results and seen > max_results:
            return
        if seen <= since:
            continue
        yield row
        yielded += 1
        if limit and yielded >= limit:
            return


def _matching(
    db: Database, level: Level, upper: dict[Level, list[Constraint]], lower: dict[Level, list[Constraint]], batch: int
) -> Iterator[Model]:
    if not lower:
        yield from _candidates(db, level, upper, batch)
        return
    page: list[Model] = []
    for row in _candidates(db, level, upper, batch, lower):
        page.append(row)
        if len(page) >= batch:
            yield from _keep(db, level, lower, page)
            page = []
    if page:
        yield from _keep(db, level, lower, page)


def _keep(db: Database, level: Level, lower: dict[Level, list[Constraint]], page: list[Model]) -> Iterator[Model]:
    found = _with_descendants(db, level, lower, [r.id for r in page])
    return (r for r in page if r.id in found)


def inherited_tags(row: Model) -> dict[str, str]:
    """The main DICOM tags of a resource and of its parents (what a C-FIND answer or ``RequestedTags`` can
    report without opening a file); the resource's own value wins where a tag is kept at two levels.

    A row yielded by :func:`find` carries its ancestors' tags already (no query here); any other row has its
    parents read one by one.
    """
    level = next(lv for lv, m in MODELS.items() if isinstance(row, m))
    parsed: dict[Level, dict[str, str]] = getattr(row, _PARSED, {})
    ancestors: list[dict[str, str] | str]
    if all(hasattr(row, _alias(lv)) for lv in Level if lv < level):
        ancestors = [parsed.get(lv) or getattr(row, _alias(lv)) for lv in Level if lv < level]
    else:
        chain: list[Model] = [row]
        while not isinstance(chain[-1], Patient):
            current = chain[-1]
            if isinstance(current, Instance):
                chain.append(Series.get_by_id(current.series_id))
            elif isinstance(current, Series):
                chain.append(Study.get_by_id(current.study_id))
            else:
                chain.append(Patient.get_by_id(current.patient_id))
        ancestors = [r.main_tags for r in reversed(chain[1:])]
    out: dict[str, str] = {}
    for tags in ancestors:
        out.update(tags if isinstance(tags, dict) else _tags(tags))
    out.update(parsed.get(level) or _tags(row.main_tags))
    if isinstance(row, Instance):
        out["SOPClassUID"] = row.sop_class_uid
    return out
