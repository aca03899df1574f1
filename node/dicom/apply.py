"""Apply a parsed :class:`~node.dicom.request.Modification` to one pydicom dataset, in place.

The steps and their order follow Orthanc's ``DicomModification::Apply`` (spec §2.2, apply time), with the
safer rules of deviations.md:

* curves and overlays (``50xx``, ``60xx,3000/4000``) are removed at every depth, not only inside sequences (62);
* nested PatientName takes the top-level pseudonym instead of surviving (61);
* a user ``Replace`` changes the top-level element only; nested copies still follow the profile (64);
* ``RemovePrivateTags`` in /modify removes private elements at every depth (63);
* a kept private tag keeps its private creator element (2.7);
* references to a kept Study/Series/SOP Instance UID are kept too (2.7);
* each value of a multi-valued UI element is remapped on its own (3.2).

Untouched elements stay pydicom ``RawDataElement`` objects (never decoded), which is what lets the writer copy
their bytes verbatim; only sequences (to visit their items) and the elements we change are decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.values import convert_SQ

from node.dicom.errors import RequestError
from node.dicom.fileio import sequence_as_raw
from node.dicom.levels import Level
from node.dicom.request import (
    AUTO_PATIENT_NAME,
    PATIENT_ID,
    PATIENT_NAME,
    SERIES_UID,
    SOP_CLASS_UID,
    SOP_UID,
    STUDY_UID,
    Modification,
)
from node.dicom.tags import ANY_ITEM, DicomPath
from node.dicom.uidmap import UidMap
from node.dicom.values import TEXT_VRS, embed_image, is_image_uri, make_element, value_text, vr_for

REFERENCED_SOP_INSTANCE_UID = 0x00081155
REFERENCED_FRAME_OF_REFERENCE_SEQUENCE = 0x30060010
RT_REFERENCED_STUDY_SEQUENCE = 0x30060012
SPECIFIC_CHARACTER_SET = 0x00080005
SEQUENCE_CACHE_SIZE = 4096
UID_LEVEL = {STUDY_UID: Level.STUDY, SERIES_UID: Level.SERIES, SOP_UID: Level.INSTANCE}

Stack = tuple[tuple[int, int], ...]  # (sequence tag, item index) from the top level down


class MissingCounter(RequestError):
    """``Anonymized<N>`` needs the counter N from the caller."""


def stored_element(ds: Dataset, tag: int) -> Any:
    """The element as stored: a ``RawDataElement`` if never decoded. Not ``Dataset.get_item``, which reads a
    deferred value (the pixel data) into memory."""
    return ds._dict.get(tag)


def element_vr(ds: Dataset, tag: int) -> str:
    """The VR of an element without decoding its value (implicit VR files: from the dictionary).

    A sequence that reached us as UN (a sender whose dictionary lacked the tag, or a private sequence in an
    implicit VR file) is reported as SQ, and decoded as one, so that its items are de-identified too: copying
    it as opaque bytes would carry everything inside it through.
    """
    elem = stored_element(ds, tag)
    vr = elem.VR if elem is not None else None
    if vr and vr != "UN":
        return str(vr)
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = "UN"
    if " or " in vr or (vr == "SQ" and elem is not None and elem.VR == "UN"):
        vr = ds[tag].VR  # ambiguous, or a known sequence sent as UN: pydicom resolves it from the dataset
    elif vr == "UN" and elem is not None and _looks_like_items(ds, tag, elem):
        vr = "SQ"
    return str(vr)


def _looks_like_items(ds: Dataset, tag: int, elem: Any) -> bool:
    """An unknown UN element whose value starts with an item tag: decode it as an implicit VR sequence."""
    if not isinstance(elem, RawDataElement):
        return False  # already decoded (and not a sequence), e.g. a value a Replace just wrote
    if elem.length == 0xFFFFFFFF:
        return ds[tag].VR == "SQ"  # pydicom decodes an undefined-length UN as a sequence
    value = elem.value if isinstance(elem, RawDataElement) else None
    if not isinstance(value, bytes) or value[:4] not in (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00"):
        return False
    try:
        seq = convert_SQ(value, True, True, None)
    except Exception:  # noqa: BLE001 - not a sequence after all: it stays opaque (and is removed if private)
        return False
    ds[tag] = DataElement(tag, "SQ", seq)
    return True


def _is_private(tag: int) -> bool:
    return bool((tag >> 16) & 1)


def _creator_of(tag: int) -> int:
    return (tag & 0xFFFF0000) | ((tag >> 8) & 0xFF)


def _text(ds: Dataset, tag: int) -> str | None:
    return value_text(ds[tag].value) if tag in ds else None


def _map_value(value: Any, level: Level, uid_map: UidMap) -> Any:
    if isinstance(value, MultiValue | list):
        return [uid_map.map(level, str(v)) for v in value] or uid_map.map(level, "")
    return uid_map.map(level, "" if value is None else str(value))


def _remap(ds: Dataset, tag: int, level: Level, uid_map: UidMap) -> None:
    elem = ds[tag]
    elem.value = _map_value(elem.value, level, uid_map)


def _empty(tag: int, vr: str) -> DataElement:
    return DataElement(tag, vr, Sequence() if vr == "SQ" else ("" if vr in TEXT_VRS else None))


@dataclass
class _Context:
    mod: Modification
    uid_map: UidMap
    patient_name: str  # the final top-level PatientName, copied into nested ones (deviation 61)

    def kept(self, stack: Stack, tag: int) -> bool:
        """Orthanc's ``DicomPath::IsMatch``: the element is at a Keep path or below one."""
        for path in self.mod.keep_paths:
            k = len(path.prefix)
            if k > len(stack):
                continue
            if any(stack[i][0] != ptag or (pidx is not ANY_ITEM and stack[i][1] != pidx)
                   for i, (ptag, pidx) in enumerate(path.prefix)):  # fmt: skip
                continue
            if (len(stack) == k and tag == path.final) or (len(stack) > k and stack[k][0] == path.final):
                return True
        return False

    def in_range(self, tag: int) -> bool:
        return any(tag & mask == value for mask, value in self.mod.removed_ranges)


def _visit_item(item: Dataset, stack: Stack, ctx: _Context) -> None:
    """Nested de-identification (spec §1.5) of one sequence item; ``stack[-1]`` is (sequence tag, index)."""
    mod = ctx.mod
    keep_paths = bool(mod.keep_paths)
    for tag in list(item.keys()):
        if keep_paths and ctx.kept(stack, tag):
            continue
        if mod.remove_private and _is_private(tag):
            del item[tag]
            continue
        if tag == PATIENT_NAME:
            if PATIENT_NAME not in mod.keep:  # the top-level pseudonym, or empty if removed (deviation 61)
                item[tag] = DataElement(tag, "PN", ctx.patient_name)
            continue
        if tag in mod.nested_removals or (tag >> 24 in (0x50, 0x60) and ctx.in_range(tag)):
            del item[tag]
            continue
        vr = element_vr(item, tag)
        if tag in mod.nested_clearings:
            if vr in TEXT_VRS:
                item[tag] = _empty(tag, vr)
            else:
                del item[tag]  # a non-string element (sequence, binary, number) cannot be "emptied": removed
            continue
        if vr == "SQ":
            value = item[tag].value
            for index, sub in enumerate(value):
                _visit_item(sub, (*stack, (tag, index)), ctx)
            continue
        _visit_value(item, tag, stack, ctx)


def _visit_value(item: Dataset, tag: int, stack: Stack, ctx: _Context) -> None:
    mod = ctx.mod
    level = UID_LEVEL.get(tag)
    if level is not None:
        if not ((level is Level.STUDY and mod.keep_study_uid) or (level is Level.SERIES and mod.keep_series_uid)
                or (level is Level.INSTANCE and mod.keep_sop_uid)):  # fmt: skip
            _remap(item, tag, level, ctx.uid_map)
    elif tag in mod.nested_uids:
        if tag == PATIENT_ID:
            _remap(item, tag, Level.PATIENT, ctx.uid_map)
        elif (tag == REFERENCED_SOP_INSTANCE_UID and len(stack) == 2
              and stack[0][0] == REFERENCED_FRAME_OF_REFERENCE_SEQUENCE
              and stack[1][0] == RT_REFERENCED_STUDY_SEQUENCE):  # fmt: skip
            # RTSTRUCT: this "SOP instance" reference actually carries a StudyInstanceUID (spec §3.4)
            if not mod.keep_study_uid:
                _remap(item, tag, Level.STUDY, ctx.uid_map)
        elif tag == REFERENCED_SOP_INSTANCE_UID and mod.keep_sop_uid:
            pass  # references to kept SOP Instance UIDs stay valid (deviations.md, 2.7)
        else:
            _remap(item, tag, Level.INSTANCE, ctx.uid_map)


def _remove_private_in_sequences(ds: Dataset) -> None:
    """Private elements inside every item (deviation 63); a top-level Keep does not reach nested copies."""
    for tag in list(ds.keys()):
        if _is_private(tag):
            del ds[tag]
        elif element_vr(ds, tag) == "SQ":
            for item in ds[tag].value:
                _remove_private_in_sequences(item)


def _select(ds: Dataset, prefix: tuple[tuple[Any, int | None], ...]) -> Iterator[Dataset]:
    """The existing items a path prefix designates (a missing sequence or index selects nothing)."""
    if not prefix:
        yield ds
        return
    (tag, index), rest = prefix[0], prefix[1:]
    if tag not in ds or element_vr(ds, tag) != "SQ":
        return
    items = ds[tag].value
    chosen = items if index is ANY_ITEM else ([items[index]] if index < len(items) else [])
    for item in chosen:
        yield from _select(item, rest)


def _replace(ds: Dataset, tag: int, value: Any, mod: Modification, charset: Any) -> None:
    if tag & 0xFFFF == 0:
        return  # group length: ignored
    if is_image_uri(tag, value):
        embed_image(ds, value)
        return
    existing = element_vr(ds, tag) if tag in ds else None
    ds[tag] = make_element(tag, value, vr=vr_for(tag, existing, mod.private_creator), charset=charset,
                           private_creator=mod.private_creator)  # fmt: skip


def _replace_path(ds: Dataset, path: DicomPath, value: Any, mod: Modification, charset: Any) -> None:
    for item in list(_select(ds, path.prefix)):
        _replace(item, int(path.final), value, mod, charset)


def apply(
    ds: Dataset,
    mod: Modification,
    uid_map: UidMap,
    *,
    patient_name_counter: int | None = None,
    sequence_cache: dict[Any, RawDataElement] | None = None,
) -> None:
    """Modify or anonymize ``ds`` (and its ``file_meta``) in place.

    ``uid_map`` is shared by every instance of the request/job (that is what keeps a study a study);
    ``patient_name_counter`` is the N of ``Anonymized<N>`` when ``mod.needs_name_counter``.

    ``sequence_cache``: a dict the caller keeps for one job (same ``mod`` and ``uid_map``). De-identifying a
    top-level sequence is a pure function of its bytes, the request, the map and the pseudonym, and instances
    of a series mostly repeat the same sequences: the cache maps the input bytes to the output bytes, so each
    distinct sequence is decoded, visited and encoded once per job.
    """
    charset = ds[SPECIFIC_CHARACTER_SET].value if SPECIFIC_CHARACTER_SET in ds else None
    originals = {tag: _text(ds, tag) for tag in (PATIENT_ID, STUDY_UID, SERIES_UID, SOP_UID)}

    # 1. A forced replacement of an identifier: references to the old value follow it.
    if mod.is_anonymization:
        for tag, level in ((STUDY_UID, Level.STUDY), (SERIES_UID, Level.SERIES), (SOP_UID, Level.INSTANCE),
                           (PATIENT_ID, Level.PATIENT)):  # fmt: skip
            value = mod.replacements.get(tag)
            if isinstance(value, str) and originals[tag] is not None:
                uid_map.register(level, originals[tag], value)

    # 2. Private elements (top level here; nested ones in the visitor, or everywhere for /modify: deviation 63).
    if mod.remove_private:
        keep = set(mod.private_keep) | {_creator_of(t) for t in mod.private_keep}
        for tag in [t for t in ds.keys() if _is_private(t) and t not in keep]:
            del ds[tag]
        if not mod.is_anonymization:
            for tag in [t for t in ds.keys() if element_vr(ds, t) == "SQ"]:
                for item in ds[tag].value:
                    _remove_private_in_sequences(item)

    # 3. Clear (only what exists), 4. remove (and curves/overlays at the top level too: deviation 62).
    for tag in mod.clearings.intersection(ds.keys()):
        ds[tag] = _empty(tag, element_vr(ds, tag))
    for tag in mod.removals.intersection(ds.keys()):
        del ds[tag]
    if mod.removed_ranges:
        for tag in [t for t in ds.keys() if t >> 24 in (0x50, 0x60) and t not in mod.keep]:
            if any(tag & m == v for m, v in mod.removed_ranges):
                del ds[tag]

    # 5. Replace (inserted if absent).
    for tag, value in mod.replacements.items():
        if value is AUTO_PATIENT_NAME:
            if patient_name_counter is None:
                raise MissingCounter("Anonymized<N> needs the patient name counter N")
            value = f"Anonymized{patient_name_counter}"
        _replace(ds, tag, value, mod, charset)

    # 6. New Study/Series/SOP Instance UIDs according to the level, unless replaced or kept.
    regenerate = [(SOP_UID, Level.INSTANCE, mod.keep_sop_uid)]
    if mod.level <= Level.SERIES:
        regenerate.append((SERIES_UID, Level.SERIES, mod.keep_series_uid))
    if mod.level <= Level.STUDY:
        regenerate.append((STUDY_UID, Level.STUDY, mod.keep_study_uid))
    for tag, level, kept in regenerate:
        if tag in mod.replacements or kept:
            continue
        ds[tag] = DataElement(tag, "UI", uid_map.map(level, originals[tag] or ""))

    # 7. Top-level UIDs of the profile, then the nested visitor (anonymization only).
    if mod.is_anonymization:
        for tag in mod.uids.intersection(ds.keys()):
            if tag not in mod.user_tags:
                _remap(ds, tag, Level.PATIENT if tag == PATIENT_ID else Level.INSTANCE, uid_map)
        name = _text(ds, PATIENT_NAME) or ""
        ctx = _Context(mod, uid_map, name)
        keep_paths = bool(mod.keep_paths)
        cacheable = sequence_cache is not None and not (mod.remove_paths or mod.replace_paths)
        for tag in list(ds.keys()):
            if (keep_paths and ctx.kept((), tag)) or element_vr(ds, tag) != "SQ":
                continue
            raw = stored_element(ds, tag)
            key = None
            if cacheable and isinstance(raw, RawDataElement) and raw.value is not None and raw.value_tell >= 0:
                key = (tag, raw.value, raw.is_implicit_VR, raw.is_little_endian, str(charset), name)
                hit = sequence_cache.get(key)  # type: ignore[union-attr]
                if hit is not None:
                    ds._dict[tag] = hit
                    continue
            elem = ds[tag]
            for index, item in enumerate(elem.value):
                _visit_item(item, ((tag, index),), ctx)
            if key is not None:
                if len(sequence_cache) > SEQUENCE_CACHE_SIZE:  # type: ignore[arg-type]
                    sequence_cache.clear()  # type: ignore[union-attr]
                encodings = convert_encodings(charset) if charset else None
                ds._dict[tag] = sequence_cache[key] = sequence_as_raw(  # type: ignore[index]
                    elem, raw.is_implicit_VR, raw.is_little_endian, encodings
                )

    # 8. Path-based (nested) removals, then replacements: they run last.
    for path in mod.remove_paths:
        for item in list(_select(ds, path.prefix)):
            if int(path.final) in item:
                del item[int(path.final)]
    for path, value in mod.replace_paths:
        _replace_path(ds, path, value, mod, charset)

    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if SOP_UID in ds:
            meta.MediaStorageSOPInstanceUID = _text(ds, SOP_UID)
        if SOP_CLASS_UID in ds:
            meta.MediaStorageSOPClassUID = _text(ds, SOP_CLASS_UID)
