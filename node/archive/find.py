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
* Rows are read in keyset pages of ``batch`` by row id (never the whole table, no cursor held across pages) and
  come out in row-id order, which is insertion order: deterministic, and ``since``/``limit`` page through it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from peewee import Database, Expression, Field, Model, ModelSelect, SqliteDatabase, fn

from node.archive.models import Instance, Patient, Series, Study
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


def plan(level: Level, constraints: Sequence[Constraint]) -> dict[Level, list[Constraint]]:
    """Group the non-universal constraints by answering level; raise :class:`NotIndexedTag` for a tag no level
    keeps (a universal constraint on it is fine: it excludes nothing)."""
    by_level: dict[Level, list[Constraint]] = {}
    for c in constraints:
        if c.is_universal:
            continue
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


def _starts_with(column: Field, prefix: str, sqlite: bool) -> Expression:
    """``column`` starts with ``prefix``, case-sensitively. On SQLite (BINARY collation: code point order) as
    an index range; elsewhere (a PostgreSQL collation need not sort by code point) by comparing a substring."""
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


def _conditions(by_level: dict[Level, list[Constraint]], sqlite: bool) -> list[Expression]:
    out = []
    for lv, constraints in by_level.items():
        for c in constraints:
            column = _COLUMNS.get((lv, c.keyword))
            cond = pushdown(c, column, sqlite) if column is not None else None
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


def _candidates(db: Database, level: Level, upper: dict[Level, list[Constraint]], batch: int) -> Iterator[Model]:
    """Rows of ``level`` satisfying the constraints of ``level`` and its parents, in row-id order, a page at a time."""
    model = MODELS[level]
    sqlite = isinstance(db, SqliteDatabase)
    parents = [lv for lv in upper if lv < level]
    fields: list[Field] = [model]
    for lv in parents:
        fields.append(MODELS[lv].main_tags.alias(_alias(lv)))
        fields += [col.alias(_alias(lv, kw)) for kw, col in _EXTRA_COLUMNS.get(lv, {}).items()]
    base = model.select(*fields)
    if parents:
        base = _join_up(base, level, min(parents))
    conditions = _conditions(upper, sqlite)
    last = 0
    while True:
        page = base.where(model.id > last, *conditions).order_by(model.id).limit(batch).objects()
        rows = list(page)
        for row in rows:
            ok = True
            for lv, constraints in upper.items():
                if lv == level:
                    extras = {kw: getattr(row, col.name) for kw, col in _EXTRA_COLUMNS.get(lv, {}).items()}
                    tags = _tags(row.main_tags, extras)
                else:
                    extras = {kw: getattr(row, _alias(lv, kw)) for kw in _EXTRA_COLUMNS.get(lv, {})}
                    tags = _tags(getattr(row, _alias(lv)), extras)
                if not _ok(constraints, tags):
                    ok = False
                    break
            if ok:
                yield row
        if len(rows) < batch:
            return
        last = rows[-1].id


def _with_descendants(db: Database, level: Level, lower: dict[Level, list[Constraint]], ids: list[int]) -> set[int]:
    """Which of the rows ``ids`` of ``level`` have a descendant chain satisfying every lower-level constraint
    (one series and one of its instances together, as Orthanc's joins do). One query per page of rows."""
    deepest = max(lower)
    child = Level(level + 1)
    fields: list[Field] = [_PARENT_FK[child]]
    levels = [lv for lv in lower if lv > level]
    for lv in levels:
        fields.append(MODELS[lv].main_tags)
        fields += list(_EXTRA_COLUMNS.get(lv, {}).values())
    query = _join_up(MODELS[deepest].select(*fields), deepest, child)
    query = query.where(_PARENT_FK[child].in_(ids), *_conditions(lower, isinstance(db, SqliteDatabase)))
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
    for row in _candidates(db, level, upper, batch):
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
    report without opening a file); the resource's own value wins where a tag is kept at two levels."""
    chain: list[Model] = [row]
    while not isinstance(chain[-1], Patient):
        current = chain[-1]
        if isinstance(current, Instance):
            chain.append(Series.get_by_id(current.series_id))
        elif isinstance(current, Series):
            chain.append(Study.get_by_id(current.study_id))
        else:
            chain.append(Patient.get_by_id(current.patient_id))
    out: dict[str, str] = {}
    for r in reversed(chain):
        out.update(_tags(r.main_tags))
        if isinstance(r, Instance):
            out["SOPClassUID"] = r.sop_class_uid
    return out
