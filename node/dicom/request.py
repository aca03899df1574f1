"""Parse the JSON bodies of ``/modify`` and ``/anonymize`` into a :class:`Modification` (spec §2.1-2.8).

Parsing mirrors Orthanc's set algebra and its order, which explains most surprising outcomes (§2.2):
profile, then private-tag flags, then ``Remove``, then ``Replace``, then ``Keep`` (each later step overrides
the earlier ones for the same tag), then ``PrivateCreator``, then the automatic ``Anonymized<N>`` name.
Where deviations.md makes us safer, the difference is kept in separate "nested" sets: a user ``Replace``
takes a tag out of the *top-level* profile sets only, so nested copies still follow the profile (case 64).

Every rejection is a :class:`~node.dicom.errors.RequestError` naming the field or tag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import UID

from node import __version__
from node.dicom import tags as tagmod
from node.dicom.errors import (
    BadFileFormat,
    BadParameterType,
    ParameterOutOfRange,
    RequestError,
    UnknownTag,
)
from node.dicom.levels import Level
from node.dicom.profiles import DEFAULT_VERSION, UnknownDicomVersion, load_profile
from node.dicom.tags import DicomPath

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_UID = 0x00080018
SOP_CLASS_UID = 0x00080016
PATIENT_IDENTITY_REMOVED = 0x00120062
DEIDENTIFICATION_METHOD = 0x00120063

#: Tags that name a resource in the index: changing them needs ``"Force": true`` (spec §2.6).
IDENTIFIERS = {PATIENT_ID: "PatientID", STUDY_UID: "StudyInstanceUID", SERIES_UID: "SeriesInstanceUID",
               SOP_UID: "SOPInstanceUID"}  # fmt: skip

#: Written in DeidentificationMethod (0012,0063): Orthanc writes ``Orthanc <version> - …``.
PRODUCT = f"dicom-node {__version__}"


class AutoPatientName:
    """Marker value: PatientName becomes ``Anonymized<N>`` with the counter the caller passes to apply()."""

    def __repr__(self) -> str:
        return "Anonymized<N>"

    def __reduce__(self) -> str:
        return "AUTO_PATIENT_NAME"  # unpickled as the module's one instance: apply() compares with ``is``


AUTO_PATIENT_NAME = AutoPatientName()


@dataclass
class Modification:
    """One parsed request. Shared read-only by every instance of a job; the UID map is passed separately."""

    is_anonymization: bool
    level: Level
    #: Top-level sets after the whole set algebra of §2.2.
    removals: set[int] = field(default_factory=set)
    clearings: set[int] = field(default_factory=set)
    uids: set[int] = field(default_factory=set)
    replacements: dict[int, Any] = field(default_factory=dict)
    #: Sets used inside sequences: like the top-level ones but a user Replace does not shrink them (case 64).
    nested_removals: set[int] = field(default_factory=set)
    nested_clearings: set[int] = field(default_factory=set)
    nested_uids: set[int] = field(default_factory=set)
    removed_ranges: tuple[tuple[int, int], ...] = ()
    keep: set[int] = field(default_factory=set)
    private_keep: set[int] = field(default_factory=set)
    keep_paths: list[DicomPath] = field(default_factory=list)
    remove_paths: list[DicomPath] = field(default_factory=list)
    replace_paths: list[tuple[DicomPath, Any]] = field(default_factory=list)
    remove_private: bool = False
    keep_study_uid: bool = False
    keep_series_uid: bool = False
    keep_sop_uid: bool = False
    #: Top-level tags the user replaced, removed or kept: the automatic steps leave them alone.
    user_tags: set[int] = field(default_factory=set)
    private_creator: str = ""
    dicom_version: str | None = None
    transcode: str | None = None
    force: bool = False
    keep_labels: bool = False
    #: Anonymization with no user customisation ("pure" in Orthanc's words, §2.8).
    customised: bool = False

    @property
    def needs_name_counter(self) -> bool:
        """True when apply() writes ``Anonymized<N>``: the caller then passes the counter N."""
        return self.replacements.get(PATIENT_NAME) is AUTO_PATIENT_NAME


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise BadFileFormat(f'"{key}" must be true or false, got {value!r}')
    return value


def _list_of_strings(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadFileFormat(f'"{key}" must be a list of strings, got {value!r}')
    return value


def _path(text: str, field_name: str) -> DicomPath:
    try:
        return tagmod.parse_path(text)
    except tagmod.UnknownTagError as exc:
        raise UnknownTag(f'"{field_name}": {exc}') from None
    except tagmod.TagError as exc:
        raise ParameterOutOfRange(f'"{field_name}": {exc}') from None


def _check_force(tag: int, what: str, force: bool) -> None:
    if tag in IDENTIFIERS and not force:
        raise BadParameterType(
            f'Marking tag "{IDENTIFIERS[tag]}" as to be {what} requires the "Force" option to be set to true'
        )


def _check_replace_value(value: Any, where: str) -> None:
    """Reject JSON types that can never become a DICOM value (spec §2.5) before any instance is touched."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, list) and not item:
                continue  # [] is an empty item
            if not isinstance(item, dict):
                raise BadParameterType(f"{where}[{i}]: a sequence item must be a JSON object, got {item!r}")
            for key, sub in item.items():
                try:
                    tagmod.parse_tag(key, parentheses=False)
                except tagmod.UnknownTagError as exc:
                    raise UnknownTag(f"{where}[{i}]: {exc}") from None
                except tagmod.TagError as exc:
                    raise ParameterOutOfRange(f"{where}[{i}]: {exc}") from None
                _check_replace_value(sub, f"{where}[{i}].{key}")
        return
    raise BadParameterType(f"Bad Parameter type for tag {where}: {type(value).__name__} {value!r} "
                           "(use a string, null or a list of items)")  # fmt: skip


def _transcode(body: dict[str, Any]) -> str | None:
    value = body.get("Transcode")
    if value is None:
        return None
    if not isinstance(value, str) or not UID(value.strip()).is_transfer_syntax:
        raise BadFileFormat(f'"Transcode" must be a transfer syntax UID, got {value!r}')
    return value.strip()


def _common(mod: Modification, body: dict[str, Any]) -> None:
    """Steps 3-6 of §2.2: Remove, Replace, Keep, PrivateCreator (shared by modify and anonymize)."""
    force = mod.force
    for text in _list_of_strings(body, "Remove"):
        path = _path(text, "Remove")
        if not path.is_top_level:
            mod.remove_paths.append(path)
            continue
        tag = int(path.final)
        _check_force(tag, "removed", force)
        if tag in IDENTIFIERS:
            raise RequestError(f"It is forbidden to remove one of the main Dicom identifiers ({IDENTIFIERS[tag]})")
        mod.removals.add(tag)
        mod.nested_removals.add(tag)
        for s in (mod.clearings, mod.uids, mod.private_keep, mod.nested_clearings, mod.nested_uids):
            s.discard(tag)
        mod.replacements.pop(tag, None)
        mod.user_tags.add(tag)
    replace = body.get("Replace", {})
    if not isinstance(replace, dict):
        raise BadFileFormat(f'"Replace" must be a JSON object of tag: value, got {replace!r}')
    for text, value in replace.items():
        path = _path(text, "Replace")
        _check_replace_value(value, text)
        if not path.is_top_level:
            mod.replace_paths.append((path, value))
            continue
        tag = int(path.final)
        _check_force(tag, "replaced", force)
        if tag in (SOP_UID, SOP_CLASS_UID) and not (isinstance(value, str) and value.strip() and value.isascii()):
            # the file meta repeats both: pydicom refuses an empty one, and a UID is ASCII
            raise BadParameterType(f"Bad Parameter type for tag {text}: it must be a non-empty ASCII string (a UID)")
        for s in (mod.removals, mod.clearings, mod.uids, mod.private_keep):
            s.discard(tag)
        mod.replacements[tag] = value
        mod.user_tags.add(tag)
    for text in _list_of_strings(body, "Keep"):
        path = _path(text, "Keep")
        mod.keep_paths.append(path)
        if not path.is_top_level:
            continue
        tag = int(path.final)
        _check_force(tag, "kept", force)
        mod.keep.add(tag)
        for s in (mod.removals, mod.clearings, mod.uids, mod.nested_removals, mod.nested_clearings,
                  mod.nested_uids):  # fmt: skip
            s.discard(tag)
        mod.replacements.pop(tag, None)
        mod.user_tags.add(tag)
        if tag == STUDY_UID:
            mod.keep_study_uid = True
        elif tag == SERIES_UID:
            mod.keep_series_uid = True
        elif tag == SOP_UID:
            mod.keep_sop_uid = True
        elif (tag >> 16) & 1:
            mod.private_keep.add(tag)
    creator = body.get("PrivateCreator", mod.private_creator)
    if not isinstance(creator, str):
        raise BadFileFormat(f'"PrivateCreator" must be a string, got {creator!r}')
    mod.private_creator = creator


def _body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadFileFormat(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_modify(body: Any, *, level: Level | None = None, default_private_creator: str = "") -> Modification:
    """A ``/modify`` body. ``level`` is the URL's level; ``None`` auto-detects it as Orthanc does for
    ``/instances/{id}/modify`` (edge case 72): Patient if PatientID is replaced, else Study if
    StudyInstanceUID is, else Series if SeriesInstanceUID is, else Instance."""
    body = _body(body)
    mod = Modification(is_anonymization=False, level=Level.INSTANCE, private_creator=default_private_creator,
                       force=_bool(body, "Force", False))  # fmt: skip
    mod.remove_private = _bool(body, "RemovePrivateTags", False)
    mod.keep_labels = _bool(body, "KeepLabels", False)
    _common(mod, body)
    mod.transcode = _transcode(body)
    if level is None:
        level = Level.INSTANCE
        for tag, candidate in ((SERIES_UID, Level.SERIES), (STUDY_UID, Level.STUDY), (PATIENT_ID, Level.PATIENT)):
            if tag in mod.replacements:
                level = candidate
    mod.level = level
    return mod


def parse_anonymize(body: Any, *, default_private_creator: str = "") -> Modification:
    """An ``/anonymize`` body: the profile of ``DicomVersion`` customised by the body."""
    body = _body(body)
    version = body.get("DicomVersion", DEFAULT_VERSION)
    if not isinstance(version, str):
        raise BadFileFormat(f'"DicomVersion" must be a string, got {version!r}')
    try:
        profile = load_profile(version)
    except UnknownDicomVersion as exc:
        raise ParameterOutOfRange(str(exc)) from None
    mod = Modification(is_anonymization=True, level=Level.PATIENT, dicom_version=version,
                       private_creator=default_private_creator, force=_bool(body, "Force", False))  # fmt: skip
    mod.removals = set(profile.removals)
    mod.clearings = set(profile.clearings)
    mod.uids = set(profile.uids) | set(profile.patient_uuid)
    mod.removed_ranges = profile.removed_ranges
    for tag, template in profile.replacements.items():
        if tag == PATIENT_NAME:
            continue  # step 7 below
        mod.replacements[tag] = template.replace("Orthanc <version>", PRODUCT)
    mod.remove_private = profile.remove_private and not _bool(body, "KeepPrivateTags", False)
    mod.keep_labels = _bool(body, "KeepLabels", False)
    mod.nested_removals = set(mod.removals)
    mod.nested_clearings = set(mod.clearings)
    mod.nested_uids = set(mod.uids)
    _common(mod, body)
    mod.customised = bool(mod.user_tags or mod.keep_paths or mod.remove_paths or mod.replace_paths
                          or not mod.remove_private)  # fmt: skip
    if mod.customised and DEIDENTIFICATION_METHOD not in mod.user_tags:
        # Orthanc ≥ 1.12.7 writes "Orthanc <version>" for a customised profile (spec §2.8, [newer]).
        mod.replacements[DEIDENTIFICATION_METHOD] = PRODUCT
    if PATIENT_NAME not in mod.user_tags:
        mod.replacements[PATIENT_NAME] = AUTO_PATIENT_NAME
    mod.transcode = _transcode(body)
    return mod
