"""C-FIND attribute matching (DICOM PS3.4 C.2.2.2) as Orthanc applies it to ``/tools/find`` and to C-FIND.

Pure functions, no database: :mod:`node.archive.find` runs the constraints against the index (pushing what it can
into SQL and re-checking every row here), and the Query/Retrieve SCP will reuse the same parser and matcher so the
two front ends can never disagree on what matches.

What a query value means (Orthanc's ``DatabaseLookup::AddDicomConstraintInternal``, checked in that order):

* ``""`` (and ``"*"``): universal matching, every resource matches. Orthanc drops an empty value; a lone ``*``
  is universal matching by PS3.4 C.2.2.2.4 for any VR (Orthanc refuses it on VRs without wildcards, which breaks
  SCUs that send ``StudyDate=*``).
* a ``-`` in a DA, TM or DT value: range matching, ``lower-``, ``-upper`` or ``lower-upper``, compared as strings
  (DICOM dates and times sort as text). An upper bound covers everything it is a prefix of, so ``-20201231``
  keeps ``20201231235959`` in a DT (Orthanc compares whole strings and drops it). An empty value never matches a
  range.
* a ``\\``: list matching, one of the values exactly (PS3.4's list of UIDs; Orthanc accepts it on any VR).
* ``*`` / ``?`` in a value of VR AE, CS, LO, LT, PN, SH, ST, UC, UR or UT: wildcard matching on the whole value;
  on any other VR a wildcard is an error naming the tag (as Orthanc, PS3.4 allows none there).
* anything else: single value matching, the whole value exactly.

Case: DICOM matching is case-sensitive except for PN, where an SCP may ignore case. Orthanc's C-FIND SCP applies
``CaseSensitivePN`` (default false) to PN only; its ``/tools/find`` applies ``CaseSensitive`` to every tag
(``DatabaseLookup::AddRestConstraint``). :func:`parse_query` does either (``pn_only``). Values the index does
not hold (absent tags) are matched as empty strings.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.tag import BaseTag

from node.dicom.errors import ParameterOutOfRange, RequestError, UnknownTag
from node.dicom.tags import TagError, parse_tag

#: VRs on which PS3.4 C.2.2.2.4 allows wildcards (Orthanc 1.6's list).
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
#: VRs on which a ``-`` means a range (PS3.4 C.2.2.2.5).
RANGE_VRS = frozenset({"DA", "TM", "DT"})


class QueryError(RequestError):
    """A query we refuse (HTTP 400 in REST; a C-FIND failure status later); the message names the tag."""


class UnknownQueryTag(UnknownTag):
    """A query key that is neither a DICOM keyword nor a ``gggg,eeee`` tag."""


class BadQueryValue(ParameterOutOfRange):
    """A value that cannot be a constraint on its tag (a wildcard on a UID, a sequence, a malformed range)."""


class Kind(enum.Enum):
    """How a constraint matches (PS3.4 C.2.2.2.x)."""

    UNIVERSAL = "universal"
    SINGLE = "single"
    LIST = "list"
    WILDCARD = "wildcard"
    RANGE = "range"


@dataclass(frozen=True)
class Constraint:
    """One key of a query, parsed.

    ``values`` holds the single value, the list items, the wildcard pattern, or ``(lower, upper)`` of a range
    (``""`` for an open end), as the query wrote them: callers pushing the constraint into SQL need the raw text.
    """

    tag: BaseTag
    keyword: str
    vr: str
    kind: Kind
    values: tuple[str, ...] = ()
    case_sensitive: bool = True
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @property
    def is_universal(self) -> bool:
        return self.kind is Kind.UNIVERSAL

    @property
    def name(self) -> str:
        """The keyword, or ``gggg,eeee`` for a tag pydicom has no keyword for (what error messages show)."""
        return self.keyword or f"{self.tag.group:04X},{self.tag.element:04X}"

    def _fold(self, text: str) -> str:
        return text if self.case_sensitive else text.casefold()

    def matches(self, value: str | None) -> bool:
        """Whether a resource whose tag holds ``value`` (``None``: absent) satisfies this constraint."""
        if self.kind is Kind.UNIVERSAL:
            return True
        text = value or ""
        if self.kind is Kind.RANGE:
            lower, upper = self.values
            if not text:
                return False
            return (not lower or text >= lower) and (not upper or text[: len(upper)] <= upper)
        if self.kind is Kind.WILDCARD:
            assert self._regex is not None
            return self._regex.fullmatch(self._fold(text)) is not None
        folded = self._fold(text)
        return any(folded == self._fold(v) for v in self.values)


def wildcard_regex(pattern: str, case_sensitive: bool = True) -> re.Pattern[str]:
    """``*`` → any run of characters, ``?`` → exactly one, everything else literal (Orthanc's
    ``Toolbox::WildcardToRegularExpression``); matched against the whole value."""
    if not case_sensitive:
        pattern = pattern.casefold()
    parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def literal_prefix(pattern: str) -> str:
    """The characters of a wildcard pattern before its first wildcard (what an index range can use)."""
    m = re.search(r"[*?]", pattern)
    return pattern if m is None else pattern[: m.start()]


def resolve_tag(key: str) -> tuple[BaseTag, str, str]:
    """(tag, keyword, VR) of a query key: a keyword or ``gggg,eeee`` (also ``ggggeeee``, ``(gggg,eeee)``).

    A tag outside pydicom's dictionary gets VR ``UN``: neither ranges nor wildcards apply to it.
    """
    if not isinstance(key, str):
        raise UnknownQueryTag(f"query key {key!r} is not a tag name")
    try:
        tag = parse_tag(key)
    except TagError as exc:
        raise UnknownQueryTag(f"unknown DICOM tag {key!r} in the query ({exc})") from None
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = "UN"
    return tag, keyword_for_tag(tag) or "", vr.split(" or ")[0]


def parse_constraint(key: str, value: Any, *, case_sensitive: bool = True, pn_only: bool = False) -> Constraint:
    """One query key and its value as a :class:`Constraint` (see the module docstring for the rules).

    ``case_sensitive`` false makes single, list and wildcard matching ignore case: on PN only with ``pn_only``
    (C-FIND's ``CaseSensitivePN``), on every tag without (``/tools/find``'s ``CaseSensitive``).
    """
    tag, keyword, vr = resolve_tag(key)
    label = keyword or key
    if not isinstance(value, str):
        raise QueryError(f'tag "{label}" should be associated with a string, got {type(value).__name__}')
    if vr == "SQ":
        raise BadQueryValue(f"tag {label} is a sequence: sequence matching is not supported")
    sensitive = case_sensitive or (pn_only and vr != "PN")

    def make(kind: Kind, values: tuple[str, ...], regex: re.Pattern[str] | None = None) -> Constraint:
        return Constraint(tag, keyword, vr, kind, values, sensitive, regex)

    if value == "" or value == "*":
        return make(Kind.UNIVERSAL, ())
    if vr in RANGE_VRS and "-" in value:
        if vr != "DT" and value.count("-") > 1:  # a DT may carry a -ZZXX offset; DA and TM cannot
            raise BadQueryValue(f"tag {label}: {value!r} is not a {vr} range (expected lower-upper, lower- or -upper)")
        lower, _, upper = value.partition("-")
        if not lower and not upper:
            return make(Kind.UNIVERSAL, ())  # "-": both ends open
        return make(Kind.RANGE, (lower, upper))
    if "\\" in value:
        return make(Kind.LIST, tuple(value.split("\\")))
    if "*" in value or "?" in value:
        if vr not in WILDCARD_VRS:
            raise BadQueryValue(f"wildcards are not allowed on tag {label} (VR {vr}): {value!r}")
        return make(Kind.WILDCARD, (value,), wildcard_regex(value, sensitive))
    return make(Kind.SINGLE, (value,))


def parse_query(query: Mapping[str, Any], *, case_sensitive: bool = True, pn_only: bool = False) -> list[Constraint]:
    """Every key of a query (``{"PatientName": "DOE*", "StudyDate": "2020-"}``) as a constraint, in key order.

    Universal constraints are kept (a C-FIND SCP returns those keys); :func:`effective` drops them. Raises a
    :class:`QueryError` (a ``ValueError``) naming the first key or value at fault.
    """
    if not isinstance(query, Mapping):
        raise QueryError(f"a query is an object {{tag: value}}, got {type(query).__name__}")
    return [parse_constraint(k, v, case_sensitive=case_sensitive, pn_only=pn_only) for k, v in query.items()]


def effective(constraints: Iterable[Constraint]) -> list[Constraint]:
    """The constraints that can exclude something (universal ones dropped, as Orthanc does)."""
    return [c for c in constraints if not c.is_universal]


def matches_all(constraints: Iterable[Constraint], tags: Mapping[str, str]) -> bool:
    """Whether a resource whose tags (by keyword) are ``tags`` satisfies every constraint."""
    return all(c.matches(tags.get(c.keyword)) for c in constraints)
