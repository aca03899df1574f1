"""Tag tokens and dcmodify-style paths, as Orthanc's ``/modify`` and ``/anonymize`` bodies write them.

A tag token is ``gggg,eeee``, ``gggg-eeee``, ``ggggeeee``, ``(gggg,eeee)`` (in paths and top-level keys) or a
DICOM keyword from pydicom's dictionary (case-sensitive). A path is ``SEQ[i].SEQ[j]….FINAL`` where ``i`` is a
non-negative index or ``*`` (spec §2.3-2.4). Every rejection is a :class:`TagError` whose message names the
token: Orthanc answers an unknown name with HTTP 500; we answer 400 (deviations.md, case 67).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword
from pydicom.tag import BaseTag, Tag

_HEX9 = re.compile(r"([0-9A-Fa-f]{4})[,-]([0-9A-Fa-f]{4})")
_HEX8 = re.compile(r"[0-9A-Fa-f]{8}")
_PARENS = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")
_ITEM = re.compile(r"(.*)\[([^\]]*)\]")

#: ``[*]``: every item of the sequence.
ANY_ITEM = None


class TagError(ValueError):
    """A tag token or path that cannot be parsed (becomes HTTP 400 naming the token)."""


class UnknownTagError(TagError):
    """A name that is neither a DICOM keyword nor a hexadecimal tag."""


def parse_tag(token: str, *, parentheses: bool = True) -> BaseTag:
    """The tag a token names (spaces around it are ignored)."""
    text = token.strip()
    if not text:
        raise TagError("empty tag name")
    m = _HEX9.fullmatch(text) or (_PARENS.fullmatch(text) if parentheses else None)
    if m:
        return Tag(int(m.group(1), 16), int(m.group(2), 16))
    if _HEX8.fullmatch(text):
        return Tag(int(text, 16))
    tag = tag_for_keyword(text)
    if tag is None:
        raise UnknownTagError(f"unknown DICOM tag {text!r}")
    return Tag(tag)


@dataclass(frozen=True, slots=True)
class DicomPath:
    """``prefix`` is the chain of (sequence tag, item index or :data:`ANY_ITEM`); ``final`` the addressed tag."""

    prefix: tuple[tuple[BaseTag, int | None], ...]
    final: BaseTag

    @property
    def is_top_level(self) -> bool:
        return not self.prefix

    def __str__(self) -> str:
        parts = [f"({t.group:04x},{t.element:04x})[{'*' if i is None else i}]" for t, i in self.prefix]
        return ".".join([*parts, f"({self.final.group:04x},{self.final.element:04x})"])


def parse_path(text: str) -> DicomPath:
    """Parse ``SEQ[i].SEQ[*].FINAL`` (a bare tag token is a top-level path)."""
    if not isinstance(text, str):
        raise TagError(f"a tag path must be a string, got {text!r}")
    tokens = text.split(".")
    prefix: list[tuple[BaseTag, int | None]] = []
    for token in tokens[:-1]:
        m = _ITEM.fullmatch(token.strip())
        if m is None:
            raise TagError(f"in path {text!r}: {token.strip()!r} must be a sequence with an item index, like Seq[0]")
        index_text = m.group(2).strip()
        if index_text == "*":
            index = ANY_ITEM
        elif index_text.isdigit():
            index = int(index_text)
        else:
            raise TagError(f"in path {text!r}: item index {index_text!r} must be a non-negative integer or *")
        prefix.append((_path_tag(m.group(1), text), index))
    last = tokens[-1].strip()
    if "[" in last or "]" in last:
        raise TagError(f"in path {text!r}: the last element {last!r} cannot have an item index")
    return DicomPath(tuple(prefix), _path_tag(last, text))


def _path_tag(token: str, path: str) -> BaseTag:
    if "[" in token or "]" in token or "(" in token.strip()[1:] or ")" in token.strip()[:-1]:
        raise TagError(f"in path {path!r}: malformed tag {token.strip()!r}")
    try:
        return parse_tag(token)
    except UnknownTagError:
        raise
    except TagError:
        raise TagError(f"in path {path!r}: empty tag name") from None
