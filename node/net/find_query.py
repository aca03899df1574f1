"""A C-FIND identifier as a query on the index, and one match as the identifier of an answer (PS3.4 C.4.1).

Pure functions over pydicom datasets, no I/O: :mod:`node.net.find_scp` runs them against the index.

Reading the identifier (Orthanc 1.10's ``OrthancFindRequestHandler::Handle`` and ``FindScp.cpp``):

* ``QueryRetrieveLevel`` is required: ``PATIENT``, ``STUDY``, ``SERIES``, ``IMAGE`` (also ``INSTANCE``), in any
  case; ``PATIENT`` is accepted in the Study Root model too, as Orthanc does.
* Every other element is a return key; a non-empty value is also a matching key, parsed by
  :mod:`node.dicom.matching` with C-FIND's case rule (PN case-insensitive unless ``CaseSensitivePN``).
  Elements of groups below 0008, group lengths, ``SpecificCharacterSet``, ``RetrieveAETitle`` and
  ``TimezoneOffsetFromUTC`` are not matched. Sequences are return keys only (Orthanc ignores their items).
* Keys the index keeps (main DICOM tags of the level or its parents, or of a lower level: "has a series of
  modality MR") are matched in the index; ``ModalitiesInStudy``/``SOPClassesInStudy`` at STUDY level become
  constraints on the series' ``Modality``/instances' ``SOPClassUID``; any other tag is matched on the header
  of the resource's first instance (Orthanc's ``StorageAccessOnFind: Always``). The computed counters are not
  matchable (PS3.4 gives them no matching) and are only returned.

Building an answer: exactly the requested keys, plus ``QueryRetrieveLevel``, ``SpecificCharacterSet`` and
``RetrieveAETitle`` (PS3.4 C.4.1.1.3.2 requires it; Orthanc adds it too). Values come from the index for main
tags, from the computed counters, or from the stored file for the rest; a key the resource lacks is present
and empty. The answer is UTF-8 (``ISO_IR 192``) unless the query was Latin-1 and every value fits Latin-1.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from node.archive.children import ALL_COMPUTED, COMPUTED
from node.archive.find import LEVEL_KEYWORDS, tag_level
from node.dicom.errors import RequestError
from node.dicom.levels import Level
from node.dicom.maintags import element_string
from node.dicom.matching import Constraint, QueryError, parse_constraint

QUERY_RETRIEVE_LEVEL = Tag(0x0008, 0x0052)
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
RETRIEVE_AE_TITLE = Tag(0x0008, 0x0054)
TIMEZONE_OFFSET_FROM_UTC = Tag(0x0008, 0x0201)

LEVELS = {"PATIENT": Level.PATIENT, "STUDY": Level.STUDY, "SERIES": Level.SERIES, "IMAGE": Level.INSTANCE,
          "INSTANCE": Level.INSTANCE}  # fmt: skip

#: Computed keys matched through the index key they summarise (at STUDY level, as Orthanc's ``Apply``).
_SUMMARISED = {"ModalitiesInStudy": "Modality", "SOPClassesInStudy": "SOPClassUID"}

_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                         "UR", "UT"})  # fmt: skip
#: VRs whose values may hold characters outside ASCII (the others are ASCII by definition).
_CHARSET_VRS = frozenset({"PN", "SH", "LO", "ST", "LT", "UT", "UC"})
_LATIN1_TERMS = frozenset({"ISO_IR 100", "ISO 2022 IR 100"})
UTF8 = "ISO_IR 192"
LATIN1 = "ISO_IR 100"


class MalformedQuery(QueryError):
    """An identifier we cannot run (no or unknown QueryRetrieveLevel, a value that is no constraint)."""


class Source(enum.Enum):
    """Where the value of a return key comes from."""

    INDEX = "index"  # a main DICOM tag of the level or one of its parents
    COMPUTED = "computed"  # a counter or list computed from the children
    FILE = "file"  # the header of the resource's first instance
    EMPTY = "empty"  # a main tag of a lower level: no single value at this level
    ECHO = "echo"  # a private creator: answered as asked, so the private keys keep their block


@dataclass(frozen=True, slots=True)
class ReturnKey:
    tag: BaseTag
    keyword: str
    vr: str
    source: Source
    echo: Any = None


@dataclass(frozen=True)
class FindQuery:
    """A parsed identifier: what to match where, and what to answer."""

    level: Level
    level_text: str
    charset: tuple[str, ...]
    keys: tuple[ReturnKey, ...]
    index_constraints: tuple[Constraint, ...]
    file_constraints: tuple[Constraint, ...]

    @property
    def reads_files(self) -> bool:
        """Whether a match needs its first instance's header (a file constraint or a return key from a file)."""
        return bool(self.file_constraints) or any(k.source is Source.FILE for k in self.keys)

    @property
    def file_tags(self) -> list[BaseTag]:
        return sorted({k.tag for k in self.keys if k.source is Source.FILE} | {c.tag for c in self.file_constraints})

    @property
    def computed(self) -> set[str]:
        return {k.keyword for k in self.keys if k.source is Source.COMPUTED}

    @property
    def matching_keywords(self) -> list[str]:
        """The names of the matching keys (what a log line may show: never their values, which are PHI)."""
        return [c.name for c in (*self.index_constraints, *self.file_constraints)]


def _text(value: Any) -> str:
    """A query or file value as the string matching compares (``\\`` between values, padding trimmed)."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1").rstrip(" \x00")
    return element_string(value)


def _vr(vr: str | None) -> str:
    return (vr or "UN").split(" or ")[0]


def source_of(keyword: str, level: Level) -> Source:
    """Where a return key's value comes from at ``level``."""
    if keyword in COMPUTED[level]:
        return Source.COMPUTED
    if keyword and any(keyword in LEVEL_KEYWORDS[lv] for lv in Level if lv <= level):
        return Source.INDEX
    if keyword and any(keyword in LEVEL_KEYWORDS[lv] for lv in Level if lv > level):
        return Source.EMPTY
    return Source.FILE


def parse_level(value: Any) -> tuple[Level, str]:
    """The level of a ``QueryRetrieveLevel`` value, and the text to echo."""
    text = _text(value).strip()
    level = LEVELS.get(text.upper())
    if level is None:
        if not text:
            raise MalformedQuery("QueryRetrieveLevel (0008,0052) is missing or empty")
        raise MalformedQuery(f"unknown QueryRetrieveLevel {text!r} (expected PATIENT, STUDY, SERIES or IMAGE)")
    return level, text


def _is_private_creator(tag: BaseTag) -> bool:
    return tag.is_private and 0x0010 <= tag.element <= 0x00FF


def _constraint(tag: BaseTag, keyword: str, text: str, level: Level, case_sensitive_pn: bool) -> Constraint | None:
    """The constraint of one matching key, ``None`` when it matches everything or is not matchable here."""
    if keyword in ALL_COMPUTED:
        if level is Level.STUDY and keyword in _SUMMARISED:
            return parse_constraint(_SUMMARISED[keyword], text, case_sensitive=case_sensitive_pn, pn_only=True)
        return None  # counters: return keys only
    c = parse_constraint(f"{tag.group:04X},{tag.element:04X}", text, case_sensitive=case_sensitive_pn, pn_only=True)
    return None if c.is_universal else c


def parse_identifier(ds: Dataset, *, case_sensitive_pn: bool = False) -> FindQuery:
    """A C-FIND identifier as a :class:`FindQuery`; raises :class:`MalformedQuery` (a ``QueryError``, as does
    a value that cannot be a constraint) with a message naming the key."""
    level_elem = ds.get(QUERY_RETRIEVE_LEVEL)
    level, level_text = parse_level(None if level_elem is None else level_elem.value)
    charset_elem = ds.get(SPECIFIC_CHARACTER_SET)
    charset_value = None if charset_elem is None else charset_elem.value
    charset = tuple(charset_value) if isinstance(charset_value, (list, MultiValue)) else (_text(charset_value),)
    keys: list[ReturnKey] = []
    index: list[Constraint] = []
    in_files: list[Constraint] = []
    for tag in ds.keys():
        if tag.group < 0x0008 or tag.element == 0 or tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET,
                                                             RETRIEVE_AE_TITLE):  # fmt: skip
            continue
        elem = ds[tag]
        vr = _vr(elem.VR)
        keyword = elem.keyword or ""
        if vr == "SQ":
            keys.append(ReturnKey(tag, keyword, vr, Source.FILE))
            continue
        if _is_private_creator(tag):
            keys.append(ReturnKey(tag, keyword, vr, Source.ECHO, elem.value))
            continue
        keys.append(ReturnKey(tag, keyword, vr, source_of(keyword, level)))
        text = _text(elem.value)
        if not text or tag == TIMEZONE_OFFSET_FROM_UTC:
            continue
        try:
            c = _constraint(tag, keyword, text, level, case_sensitive_pn)
        except RequestError as exc:  # QueryError, BadQueryValue (a wildcard on a UID), UnknownQueryTag
            raise MalformedQuery(str(exc)) from None
        if c is None:
            continue
        (index if c.keyword and tag_level(c.keyword, level) is not None else in_files).append(c)
    return FindQuery(level, level_text, charset, tuple(keys), tuple(index), tuple(in_files))


def file_matches(query: FindQuery, header: Dataset | None) -> bool:
    """Whether a resource whose first instance has ``header`` (``None``: unreadable) passes the file constraints."""
    for c in query.file_constraints:
        elem = header.get(c.tag) if header is not None else None
        if not c.matches(_text(elem.value) if elem is not None else None):
            return False
    return True


def typed_value(vr: str, text: str) -> Any:
    """An index string as the value pydicom expects for ``vr`` (``None``: empty)."""
    if not text:
        return "" if vr in _STRING_VRS else None
    if vr in _INT_VRS or vr in _FLOAT_VRS:
        kind = int if vr in _INT_VRS else float
        try:
            values = [kind(v) for v in text.split("\\")]
        except ValueError:
            return None
        return values[0] if len(values) == 1 else values
    if vr in _STRING_VRS:
        return text  # pydicom splits a backslash into several values
    return None  # binary VRs: the index keeps none


def _texts(ds: Dataset) -> Iterator[str]:
    for elem in ds.iterall():
        if elem.VR not in _CHARSET_VRS or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
        for v in values:
            if v is not None and not isinstance(v, (bytes, bytearray)):
                yield str(v)


def answer_charset(query_charset: tuple[str, ...], answer: Dataset) -> str:
    """``ISO_IR 100`` when the query was Latin-1 and every value of the answer fits Latin-1, else UTF-8.

    Orthanc 1.10 answers in its ``DefaultEncoding`` (Latin-1) whatever the query, dropping the characters
    Latin-1 lacks (a Cyrillic name comes back truncated): we keep them by answering UTF-8 then.
    """
    terms = {t.strip() for t in query_charset if t and t.strip()}
    if not terms or not terms <= _LATIN1_TERMS:
        return UTF8
    try:
        for text in _texts(answer):
            text.encode("latin-1")
    except UnicodeEncodeError:
        return UTF8
    return LATIN1


def build_answer(query: FindQuery, *, index_tags: Mapping[str, str], computed: Mapping[str, str],
                 header: Dataset | None, retrieve_aet: str) -> Dataset:  # fmt: skip
    """The identifier of one pending response."""
    ds = Dataset()
    for key in query.keys:
        if key.source is Source.FILE and header is not None and key.tag in header:
            ds[key.tag] = header[key.tag]
            continue
        if key.vr == "SQ":
            ds.add_new(key.tag, "SQ", Sequence())
            continue
        if key.source is Source.ECHO:
            ds.add_new(key.tag, key.vr, key.echo)
            continue
        text = {Source.INDEX: index_tags, Source.COMPUTED: computed}.get(key.source, {}).get(key.keyword, "")
        ds.add_new(key.tag, key.vr, typed_value(key.vr, text))
    ds.QueryRetrieveLevel = query.level_text
    ds.RetrieveAETitle = retrieve_aet
    ds.SpecificCharacterSet = answer_charset(query.charset, ds)
    return ds
