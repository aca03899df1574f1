"""The de-identification profiles (PS3.15 Table E.1-1 as Orthanc applies it) for each ``DicomVersion``.

Loaded from ``profiles.json``, which ``scripts/gen_profiles.py`` generates from the spec's TSV: the actions are
data, not code. Vocabulary (spec §1.1): ``remove``, ``clear`` (emptied if present), ``uid`` (remapped),
``regenerate-uid`` (Study/Series/SOP Instance UID, inserted if absent), ``keep-remap-nested-uids``,
``remove-range`` (curves/overlays, ``50xx,xxxx``), ``replace:<value>``, ``patient-uuid``, ``remove-private``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

DEFAULT_VERSION = "2023b"


class UnknownDicomVersion(ValueError):
    """``DicomVersion`` is not one of the versions we have profiles for."""


@dataclass(frozen=True)
class Profile:
    version: str
    removals: frozenset[int]
    clearings: frozenset[int]
    uids: frozenset[int]
    regenerate_uids: frozenset[int]
    keep_remap_nested: frozenset[int]
    removed_ranges: tuple[tuple[int, int], ...]  # (mask, value): tag & mask == value
    replacements: dict[int, str]  # tag -> value template (``Anonymized<N>``, ``Orthanc <version> - …``)
    patient_uuid: frozenset[int]
    remove_private: bool

    def in_removed_range(self, tag: int) -> bool:
        return any(tag & mask == value for mask, value in self.removed_ranges)


def _tag(text: str) -> int:
    return int(text.replace(",", ""), 16)


def _range(text: str) -> tuple[int, int]:
    digits = text.replace(",", "")
    mask = int("".join("0" if c == "x" else "f" for c in digits), 16)
    return mask, int(digits.replace("x", "0"), 16)


@cache
def _table() -> dict[str, list[list[str]]]:
    data: dict[str, list[list[str]]] = json.loads(
        resources.files("node.dicom").joinpath("profiles.json").read_text(encoding="utf-8")
    )
    return data


def versions() -> tuple[str, ...]:
    return tuple(_table())


@cache
def load_profile(version: str = DEFAULT_VERSION) -> Profile:
    """The profile of a ``DicomVersion`` (``2008``, ``2017c``, ``2021b``, ``2023b``)."""
    table = _table()
    if not isinstance(version, str) or version not in table:
        raise UnknownDicomVersion(f"DicomVersion must be one of {', '.join(table)}, got {version!r}")
    sets: dict[str, set[int]] = {k: set() for k in ("remove", "clear", "uid", "regenerate-uid",
                                                     "keep-remap-nested-uids", "patient-uuid")}  # fmt: skip
    ranges: list[tuple[int, int]] = []
    replacements: dict[int, str] = {}
    remove_private = False
    for tag, _keyword, action in table[version]:
        if action == "remove-private":
            remove_private = True
        elif action == "remove-range":
            ranges.append(_range(tag))
        elif action.startswith("replace:"):
            replacements[_tag(tag)] = action[len("replace:") :]
        elif action in sets:
            sets[action].add(_tag(tag))
        else:
            raise ValueError(f"profiles.json: unknown action {action!r} for {tag} in {version}")
    return Profile(
        version=version,
        removals=frozenset(sets["remove"]),
        clearings=frozenset(sets["clear"]),
        uids=frozenset(sets["uid"]),
        regenerate_uids=frozenset(sets["regenerate-uid"]),
        keep_remap_nested=frozenset(sets["keep-remap-nested-uids"]),
        removed_ranges=tuple(ranges),
        replacements=replacements,
        patient_uuid=frozenset(sets["patient-uuid"]),
        remove_private=remove_private,
    )
