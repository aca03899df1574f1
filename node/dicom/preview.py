"""What an edit did to one dataset, element by element: the ``--dry-run`` de-identification preview.

It compares the dataset before and after :func:`~node.dicom.apply.apply` rather than tracing the engine, so
the preview shows what really happened, whatever rule caused it. Each element at any depth is reported as
``removed``, ``emptied``, ``new UID``, ``replaced``, ``added``, ``kept`` or (a sequence whose items
changed) ``changed``, under a dcmodify-style path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import Tag


@dataclass(frozen=True)
class Change:
    path: str
    action: str  # removed | emptied | new UID | replaced | added | kept | changed
    before: str
    after: str


def _name(tag: int) -> str:
    t = Tag(tag)
    return (not t.is_private and keyword_for_tag(t)) or f"({t.group:04x},{t.element:04x})"


def _value(elem: Any) -> str:
    if elem.VR == "SQ":
        return f"<{len(elem.value)} item(s)>"
    value = elem.value
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    text = "" if value is None else str(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _is_empty(elem: Any) -> bool:
    return elem.value is None or elem.value == "" or (elem.VR == "SQ" and len(elem.value) == 0) or elem.value == b""


def compare(before: Dataset, after: Dataset, prefix: str = "") -> Iterator[Change]:
    """Every element of ``before`` and ``after``, with what happened to it."""
    for tag in sorted(set(before.keys()) | set(after.keys())):
        path = prefix + _name(tag)
        old = before.get(tag)
        new = after.get(tag)
        if new is None:
            yield Change(path, "removed", _value(old), "")
            continue
        if old is None:
            yield Change(path, "added", "", _value(new))
            continue
        if old.VR == "SQ" and new.VR == "SQ" and len(new.value) and len(old.value) == len(new.value):
            yield Change(path, "kept" if old.value == new.value else "changed", _value(old), _value(new))
            for i, (a, b) in enumerate(zip(old.value, new.value, strict=True)):
                yield from compare(a, b, f"{path}[{i}].")
            continue
        if old.value == new.value:
            yield Change(path, "kept", _value(old), _value(new))
        elif _is_empty(new):
            yield Change(path, "emptied", _value(old), "")
        elif new.VR == "UI":
            yield Change(path, "new UID", _value(old), _value(new))
        else:
            yield Change(path, "replaced", _value(old), _value(new))


def render(changes: list[Change], *, show_values: bool = False) -> str:
    """A table for the terminal (values hidden unless asked: the preview must not spread PHI itself)."""
    width = max((len(c.path) for c in changes), default=10)
    lines = []
    for c in changes:
        detail = ""
        if c.action in ("replaced", "added", "new UID"):
            detail = f"-> {c.after}"
        if show_values and c.before and c.action != "kept":
            detail = f"{c.before!r} {detail}".rstrip()
        lines.append(f"{c.path:<{width}}  {c.action:<8}  {detail}".rstrip())
    counts: dict[str, int] = {}
    for c in changes:
        counts[c.action] = counts.get(c.action, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {action}" for action, n in sorted(counts.items())))
    return "\n".join(lines)
