"""Anonymize one instance straight from its bytes: the fast path of ``POST /instances/{id}/anonymize``.

Why: scripts anonymize instance by instance (Orthanc's Lua recipe, pyorthanc loops), and on such a route the
general engine (:func:`node.dicom.apply.apply` over a pydicom ``Dataset``, then :func:`node.dicom.fileio.encode`)
spends most of its time building the Dataset tree: a CT header with sequences three levels deep costs about
5 ms, where Orthanc answers the whole request in 3.5 ms of CPU.

This module walks the element headers once and never builds a Dataset:

* an element the request does not touch is copied as a slice of the input (as ``fileio.encode`` does for
  the top level);
* an element it changes is handed to pydicom: ``convert_raw_data_element`` decodes the value (charsets,
  multi-values, padding), the engine's own helpers compute the new value (``UidMap``, ``_map_value``,
  ``make_element``) and ``write_data_element`` encodes it (plain UIDs, empty values and the file meta are
  written directly, with ``fileio.element_header``);
* sequences are written as the general engine writes them (undefined lengths, items in tag order).

So the output is byte for byte what the general engine writes for the same request, UID map and counter;
``tests/test_fastanon.py`` holds it to that over every sample file and a set of bodies. The rules below mirror
``apply()`` step by step (the numbers in comments are its steps); a change to one must go to the other, and
the differential test fails until it does.

It covers the common request only. :func:`anonymize_bytes` returns ``None`` (the caller then uses the general
engine) for: ``Keep``, path-based ``Remove``/``Replace``, sequence or data-URI replacements, a replaced private
tag, ``Transcode``; data that is not explicit VR little endian with a ``DICM`` header (implicit VR, big endian,
deflated); any ``UN`` element (it may hide a sequence); elements out of order, group 0002 in the dataset,
undefined-length values other than sequences and encapsulated pixel data; anything that does not parse to the
exact end of the data (the general engine then names the problem: truncated, not DICOM…).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from node.dicom.apply import (
    REFERENCED_FRAME_OF_REFERENCE_SEQUENCE,
    REFERENCED_SOP_INSTANCE_UID,
    RT_REFERENCED_STUDY_SEQUENCE,
    SPECIFIC_CHARACTER_SET,
    UID_LEVEL,
    MissingCounter,
    _is_private,
    _map_value,
)
from node.dicom.fileio import IMPLEMENTATION_VERSION_NAME, element_header
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
from node.dicom.uidmap import UidMap
from node.dicom.values import TEXT_VRS, is_image_uri, make_element, value_text, vr_for

PIXEL_DATA = 0x7FE00010
PIXEL_REPRESENTATION = 0x00280103
#: Top-level elements the general engine decodes even when it leaves them alone (to read the character set, the
#: identifiers, the SOP class for the file meta): pydicom then writes them from their value, in canonical form
#: (padding, stripped spaces), so this path must too.
DECODED_BY_THE_ENGINE = (SPECIFIC_CHARACTER_SET, SOP_CLASS_UID, SOP_UID, PATIENT_ID, PATIENT_NAME, STUDY_UID,
                         SERIES_UID)  # fmt: skip
UNDEFINED = 0xFFFFFFFF
ITEM_END = 0xFFFEE00D
#: VR bytes -> (VR, whether its length has 32 bits); UN is left out on purpose (it may hide a sequence)
_VR_INFO = {
    v.value.encode(): (v.value, v.value in EXPLICIT_VR_LENGTH_32) for v in VR if len(v.value) == 2 and v != "UN"
}
_TAG = struct.Struct("<HH")
_SHORT_HEAD = struct.Struct("<HH2sH")
_LONG_HEAD = struct.Struct("<HH2s2xI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ITEM_HEAD = struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
_ITEM_TAIL = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_TAIL = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_NOT_OUR_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}


class _Unsupported(Exception):
    """Something this path does not handle: the general engine takes the instance."""


@dataclass(slots=True)
class _Elem:
    tag: int
    vr: str
    start: int  # first byte of the header
    value: int  # first byte of the value
    length: int  # value length (defined lengths only; sequences keep their items instead)
    end: int  # first byte after the element, delimiters included
    items: list[list[_Elem]] | None = None  # sequences: the items' elements


# --- parsing: headers only, values stay in the input -------------------------------------------------


def _parse(data: bytes, pos: int, end: int, *, until_delimiter: bool, top: bool) -> tuple[list[_Elem], int]:
    """Elements from ``pos`` to ``end`` (or to an item delimiter); returns them and the position after."""
    elems: list[_Elem] = []
    append = elems.append
    last = -1
    size = len(data)
    while pos < end:
        if pos + 8 > size:
            raise _Unsupported("ends inside an element header")
        group, number, vr, length = _SHORT_HEAD.unpack_from(data, pos)
        tag = group << 16 | number
        if group == 0xFFFE:
            if until_delimiter and tag == ITEM_END:
                return elems, pos + 8
            raise _Unsupported("delimiter out of place")
        if tag <= last or (top and group == 0x0002):
            raise _Unsupported("elements out of order, or file meta inside the dataset")
        last = tag
        info = _VR_INFO.get(vr)
        if info is None:
            raise _Unsupported("UN or unknown VR")
        vr_text, long = info
        if tag == PIXEL_REPRESENTATION and vr_text != "US":
            raise _Unsupported("PixelRepresentation with a VR other than US (pydicom re-encodes it)")
        if long:
            if pos + 12 > size:
                raise _Unsupported("ends inside an element header")
            length = _U32.unpack_from(data, pos + 8)[0]
            value = pos + 12
        else:
            value = pos + 8
        if vr_text == "SQ":
            items, after = _parse_items(data, value, length)
            append(_Elem(tag, vr_text, pos, value, length, after, items))
            pos = after
            continue
        if length == UNDEFINED:
            if not (top and tag == PIXEL_DATA) or data[pos + 6 : pos + 8] != b"\0\0":
                raise _Unsupported("undefined length outside a sequence or the pixel data")
            after = _skip_fragments(data, value)
        else:
            after = value + length
        if after > end or after > size:
            raise _Unsupported("value runs past its container")
        append(_Elem(tag, vr_text, pos, value, length, after))
        pos = after
    if until_delimiter:
        raise _Unsupported("item without its delimiter")
    if pos != end:
        raise _Unsupported("element runs past its container")
    return elems, pos


def _parse_items(data: bytes, pos: int, length: int) -> tuple[list[list[_Elem]], int]:
    end = len(data) if length == UNDEFINED else pos + length
    if end > len(data):
        raise _Unsupported("sequence runs past the data")
    items: list[list[_Elem]] = []
    while True:
        if length != UNDEFINED and pos == end:
            return items, pos
        if pos + 8 > end:
            raise _Unsupported("sequence without its delimiter")
        tag = _TAG.unpack_from(data, pos)
        item_length = _U32.unpack_from(data, pos + 4)[0]
        if tag == (0xFFFE, 0xE0DD) and length == UNDEFINED:
            return items, pos + 8
        if tag != (0xFFFE, 0xE000):
            raise _Unsupported("not an item")
        if item_length == UNDEFINED:
            elems, pos = _parse(data, pos + 8, end, until_delimiter=True, top=False)
        else:
            elems, pos = _parse(data, pos + 8, pos + 8 + item_length, until_delimiter=False, top=False)
        items.append(elems)


def _skip_fragments(data: bytes, pos: int) -> int:
    """Encapsulated pixel data: items of defined length up to the sequence delimiter."""
    size = len(data)
    while pos + 8 <= size:
        tag = _TAG.unpack_from(data, pos)
        length = _U32.unpack_from(data, pos + 4)[0]
        if tag == (0xFFFE, 0xE0DD) and length == 0:
            return pos + 8
        if tag != (0xFFFE, 0xE000) or length == UNDEFINED:
            raise _Unsupported("not a fragment")
        pos += 8 + length
    raise _Unsupported("encapsulated pixel data without its delimiter")


# --- values: pydicom decodes and encodes, exactly as for a Dataset -------------------------------------


def _decode(data: bytes, e: _Elem, encodings: Any) -> DataElement:
    raw = RawDataElement(e.tag, e.vr, e.length, data[e.value : e.value + e.length], e.value, False, True)
    return convert_raw_data_element(raw, encoding=encodings)


def _encoded(elem: DataElement, encodings: Any) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_data_element(out, elem, encodings)
    return out.getvalue()


_UID_TEXT = re.compile(r"[0-9.]{0,64}")


def _uid_parts(data: bytes, e: _Elem) -> list[str]:
    """A UI value's parts as pydicom's ``convert_UI`` decodes them (``UidMap.map`` strips each part)."""
    return data[e.value : e.value + e.length].decode("latin-1").rstrip("\0 ").split("\\")


def _header(tag: int, vr: str, length: int) -> bytes | None:
    """``fileio.element_header`` for explicit VR little endian, the only encoding this path writes."""
    return element_header(tag, vr, length, False, True)


def _uid_element(tag: int, parts: list[str]) -> bytes | None:
    """A UI element as ``write_data_element`` writes it (parts joined, padded with NUL), or ``None`` if a part
    is not a plain UID (a user's forced replacement may be anything) or the value outgrows a 16-bit length
    (pydicom writes it as UN): pydicom must then decide."""
    if not all(_UID_TEXT.fullmatch(p) for p in parts):
        return None
    value = "\\".join(parts).encode("ascii")
    if len(value) % 2:
        value += b"\0"
    header = _header(tag, "UI", len(value))
    return None if header is None else header + value


def _empty_element(tag: int, vr: str) -> bytes:
    """``apply._empty`` (an empty string, or no value; an empty sequence) as written."""
    if vr == "SQ":
        return _sequence_head(tag) + _SEQUENCE_TAIL
    return _header(tag, vr, 0) or b""


#: Pure functions of their arguments that every request of a series repeats (the character set, the SOP class,
#: the profile's replacements): remembered per process, bounded.
_MEMO: dict[tuple[Any, ...], tuple[bytes, str, str]] = {}
_MEMO_SIZE = 4096


def _remember(key: tuple[Any, ...], make: Any) -> tuple[bytes, str, str]:
    hit = _MEMO.get(key)
    if hit is None:
        hit = make()
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.clear()
        _MEMO[key] = hit
    return hit


def _canonical(data: bytes, e: _Elem, encodings: Any) -> tuple[bytes, str]:
    """An untouched element as pydicom writes it once decoded, and its value as text."""

    def make() -> tuple[bytes, str, str]:
        elem = _decode(data, e, encodings)
        return _encoded(elem, encodings), value_text(elem.value), e.vr

    encoded, text, _ = _remember(("decoded", e.tag, e.vr, data[e.value : e.value + e.length], str(encodings)), make)
    return encoded, text


def _replacement(tag: int, value: str | None, vr: str, charset: Any, private_creator: str) -> tuple[bytes, str, str]:
    """``apply._replace`` for a plain value: the element as written, its text and its VR."""

    def make() -> tuple[bytes, str, str]:
        elem = make_element(tag, value, vr=vr, charset=charset, private_creator=private_creator)
        if elem.VR == "SQ":
            raise _Unsupported("a sequence made by a replacement")
        encodings = convert_encodings(charset) if charset else None
        return _encoded(elem, encodings), value_text(elem.value), str(elem.VR)

    if tag == PATIENT_NAME and isinstance(value, str) and value.startswith("Anonymized"):
        return make()  # a new name each request: not worth remembering
    return _remember(("replaced", tag, value, vr, str(charset), private_creator), make)


def _original(data: bytes, e: _Elem, encodings: Any) -> str:
    """``apply._text`` of an identifier: a UI value as ``convert_UI`` and ``UID()`` read it (trailing NULs and
    spaces dropped, then each value stripped), anything else through pydicom."""
    if e.vr == "UI":
        return "\\".join(part.strip() for part in _uid_parts(data, e))
    return value_text(_decode(data, e, encodings).value)


def _sequence_head(tag: int) -> bytes:
    return _header(tag, "SQ", UNDEFINED) or b""


def _raw_nested(data: bytes, e: _Elem) -> bytes | memoryview:
    """An untouched element inside an item, as ``fileio._encode_item`` writes it: a canonical header (the
    reserved bytes of a 32-bit length header are zero there) and the value."""
    if e.value - e.start == 12 and data[e.start + 6 : e.start + 8] != b"\0\0":
        return (_header(e.tag, e.vr, e.length) or b"") + data[e.value : e.value + e.length]
    return memoryview(data)[e.start : e.end]


# --- the request ----------------------------------------------------------------------------------------


def supports(mod: Modification) -> bool:
    """Whether the request is one this path covers (the data may still send it to the general engine)."""
    if not mod.is_anonymization or mod.keep_paths or mod.remove_paths or mod.replace_paths or mod.keep:
        return False
    if mod.transcode is not None or mod.private_keep or mod.keep_study_uid or mod.keep_series_uid:
        return False
    for tag, value in mod.replacements.items():
        if value is AUTO_PATIENT_NAME:
            continue
        if not (value is None or isinstance(value, str)):
            return False  # a sequence
        if _is_private(tag) or tag & 0xFFFF == 0 or tag >> 16 == 0x0002:
            return False
        if is_image_uri(tag, value) or (isinstance(value, str) and value.startswith("data:")):
            return False
    charset_sets = (mod.removals, mod.clearings, mod.uids, mod.nested_removals, mod.nested_clearings,
                    mod.nested_uids, mod.replacements)  # fmt: skip
    return not any(SPECIFIC_CHARACTER_SET in s for s in charset_sets)


@dataclass
class _Walk:
    data: bytes
    mod: Modification
    uid_map: UidMap
    patient_name: str
    _names: dict[str, bytes] = field(default_factory=dict)

    def remap(self, e: _Elem, level: Level, encodings: Any) -> bytes:
        if e.vr == "UI":  # each value remapped on its own (apply._map_value); "" maps too
            fast = _uid_element(e.tag, [self.uid_map.map(level, p) for p in _uid_parts(self.data, e)])
            if fast is not None:
                return fast
        elem = _decode(self.data, e, encodings)
        elem.value = _map_value(elem.value, level, self.uid_map)
        return _encoded(elem, encodings)

    def nested_name(self, encodings: Any) -> bytes:
        key = str(encodings)
        encoded = self._names.get(key)
        if encoded is None:
            encoded = self._names[key] = _encoded(DataElement(PATIENT_NAME, "PN", self.patient_name), encodings)
        return encoded

    def sequence(self, e: _Elem, stack: tuple[tuple[int, int], ...], encodings: Any, out: list[Any]) -> None:
        out.append(_sequence_head(e.tag))
        for index, item in enumerate(e.items or ()):
            self.item(item, (*stack, (e.tag, index)), encodings, out)
        out.append(_SEQUENCE_TAIL)

    def item(self, elems: list[_Elem], stack: tuple[tuple[int, int], ...], parent_enc: Any, out: list[Any]) -> None:
        """``apply._visit_item`` then ``fileio._encode_item``, in one pass (the item's elements are sorted)."""
        mod, data = self.mod, self.data
        encodings = parent_enc  # an item's own SpecificCharacterSet, else its parent's (pydicom's rule)
        charset = None
        sequence_seen = False
        for e in elems:
            if e.tag == SPECIFIC_CHARACTER_SET:
                if sequence_seen:  # pydicom may have read it with the character set seen so far
                    raise _Unsupported("a sequence before an item's SpecificCharacterSet")
                charset = _decode(data, e, parent_enc)
                encodings = convert_encodings(charset.value)
                break
            if e.tag > SPECIFIC_CHARACTER_SET:
                break
            sequence_seen = sequence_seen or e.vr == "SQ"
        out.append(_ITEM_HEAD)
        for e in elems:
            tag = e.tag
            if tag & 0xFFFF == 0:
                continue  # group lengths are not written (and private ones are removed anyway)
            if mod.remove_private and tag >> 16 & 1:  # private
                continue
            if tag == PATIENT_NAME:  # the top-level pseudonym (deviation 61)
                out.append(self.nested_name(encodings))
                continue
            if tag == SPECIFIC_CHARACTER_SET and charset is not None:  # fileio._encode_item decodes it
                out.append(_encoded(charset, encodings))
                continue
            if tag in mod.nested_removals or (tag >> 24 in (0x50, 0x60) and _in_range(mod, tag)):
                continue
            if tag in mod.nested_clearings:
                if e.vr in TEXT_VRS:
                    out.append(_empty_element(tag, e.vr))
                continue
            if e.vr == "SQ":
                self.sequence(e, stack, encodings, out)
                continue
            level = UID_LEVEL.get(tag)
            if level is not None:
                out.append(self.remap(e, level, encodings))
            elif tag in mod.nested_uids:
                if tag == PATIENT_ID:
                    level = Level.PATIENT
                elif (tag == REFERENCED_SOP_INSTANCE_UID and len(stack) == 2
                      and stack[0][0] == REFERENCED_FRAME_OF_REFERENCE_SEQUENCE
                      and stack[1][0] == RT_REFERENCED_STUDY_SEQUENCE):  # fmt: skip
                    level = Level.STUDY  # RTSTRUCT: a StudyInstanceUID in a "SOP instance" slot (spec §3.4)
                else:
                    level = Level.INSTANCE
                out.append(self.remap(e, level, encodings))
            else:
                out.append(_raw_nested(data, e))
        out.append(_ITEM_TAIL)


def _in_range(mod: Modification, tag: int) -> bool:
    return any(tag & mask == value for mask, value in mod.removed_ranges)


def _meta(data: bytes) -> tuple[str, dict[int, Any], int]:
    """Transfer syntax, the meta elements' values and where the dataset starts."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise _Unsupported("no DICM header")
    group, number = _TAG.unpack_from(data, 132)
    if (group, number) != (0x0002, 0x0000) or data[136:138] != b"UL":
        raise _Unsupported("no file meta group length")
    end = 144 + _U32.unpack_from(data, 140)[0]
    elems, _ = _parse(data, 132, end, until_delimiter=False, top=False)
    # pydicom ignores the group length and reads group 0002 up to the first other tag: they must agree
    if any(e.tag >> 16 != 0x0002 for e in elems) or (end + 2 <= len(data) and _U16.unpack_from(data, end)[0] == 2):
        raise _Unsupported("the file meta group length does not match its elements")
    values: dict[int, str] = {}
    for e in elems:
        if e.tag in (0x00020002, 0x00020003, 0x00020010) and e.vr == "UI":
            parts = _uid_parts(data, e)
            if len(parts) != 1:
                raise _Unsupported("a multi-valued file meta UID")
            values[e.tag] = parts[0].strip()  # pydicom's UID() strips both ends
    ts = values.get(0x00020010, "")
    if not ts or ts in _NOT_OUR_SYNTAXES:
        raise _Unsupported("not explicit VR little endian")
    return ts, values, end


def anonymize_bytes(
    data: bytes, mod: Modification, uid_map: UidMap, *, patient_name_counter: int | None = None
) -> list[bytes | memoryview] | None:
    """The anonymized file as chunks (join them), or ``None`` when the general engine must do it."""
    if not supports(mod):
        return None
    try:
        return _anonymize(data, mod, uid_map, patient_name_counter)
    except _Unsupported:
        return None


def _anonymize(data: bytes, mod: Modification, uid_map: UidMap, counter: int | None) -> list[bytes | memoryview]:
    ts, meta_values, start = _meta(data)
    top, _ = _parse(data, start, len(data), until_delimiter=False, top=True)
    if not top:
        raise _Unsupported("no data elements")
    if top[-1].tag & 0xFFFF == 0:
        raise _Unsupported("a group length as the last element")  # fileio.load calls that truncated
    by_tag = {e.tag: e for e in top}
    charset_elem = by_tag.get(SPECIFIC_CHARACTER_SET)
    if charset_elem is not None and any(e.vr == "SQ" and e.tag < SPECIFIC_CHARACTER_SET for e in top):
        raise _Unsupported("a sequence before SpecificCharacterSet")  # pydicom reads it with the default
    charset = _decode(data, charset_elem, None).value if charset_elem is not None else None
    # supports() ruled out requests that change SpecificCharacterSet: it decodes and encodes everything
    encodings = convert_encodings(charset) if charset_elem is not None else default_encoding

    originals = {tag: (_original(data, by_tag[tag], encodings) if tag in by_tag else None)
                 for tag in (PATIENT_ID, STUDY_UID, SERIES_UID, SOP_UID)}  # fmt: skip

    # 1. A forced replacement of an identifier: references to the old value follow it.
    for tag, level in ((STUDY_UID, Level.STUDY), (SERIES_UID, Level.SERIES), (SOP_UID, Level.INSTANCE),
                       (PATIENT_ID, Level.PATIENT)):  # fmt: skip
        value = mod.replacements.get(tag)
        if isinstance(value, str) and originals[tag] is not None:
            uid_map.register(level, originals[tag], value)

    # What each top-level tag becomes: an _Elem (copied as it is), a DataElement (pydicom encodes it) or the
    # bytes of the element already encoded (with its text in ``texts`` where the file meta needs it).
    state: dict[int, _Elem | DataElement | bytes] = {}
    vrs: dict[int, str] = {}
    texts: dict[int, str] = {}

    # 2.-4. Private elements, clearings, removals (curves and overlays too).
    for e in top:
        tag = e.tag
        if (mod.remove_private and tag >> 16 & 1) or tag in mod.removals:  # private, or removed
            continue
        if tag >> 24 in (0x50, 0x60) and _in_range(mod, tag):
            continue
        vrs[tag] = e.vr
        state[tag] = _empty_element(tag, e.vr) if tag in mod.clearings else e

    # 5. Replace (inserted if absent).
    for tag, value in mod.replacements.items():
        if value is AUTO_PATIENT_NAME:
            if counter is None:
                raise MissingCounter("Anonymized<N> needs the patient name counter N")
            value = f"Anonymized{counter}"
        state[tag], texts[tag], vrs[tag] = _replacement(tag, value, vr_for(tag, vrs.get(tag), mod.private_creator),
                                                        charset, mod.private_creator)  # fmt: skip

    # 6. New Study/Series/SOP Instance UIDs (an anonymization is at the patient level), unless replaced.
    for tag, level in ((SOP_UID, Level.INSTANCE), (SERIES_UID, Level.SERIES), (STUDY_UID, Level.STUDY)):
        if tag not in mod.replacements:
            new = uid_map.map(level, originals[tag] or "")
            state[tag] = _uid_element(tag, [new]) or DataElement(tag, "UI", new)
            texts[tag], vrs[tag] = new, "UI"

    # 7. Top-level UIDs of the profile.
    walk = _Walk(data, mod, uid_map, "")
    for tag in mod.uids.intersection(state):
        if tag in mod.user_tags:
            continue
        current = state[tag]
        if not isinstance(current, _Elem):  # cleared or replaced by the profile too: apply() remaps that value
            raise _Unsupported("a profile UID that an earlier step changed")
        state[tag] = walk.remap(current, Level.PATIENT if tag == PATIENT_ID else Level.INSTANCE, encodings)

    for tag in DECODED_BY_THE_ENGINE:
        current = state.get(tag)
        if isinstance(current, _Elem):
            state[tag], texts[tag] = _canonical(data, current, encodings)

    if PATIENT_NAME in state and PATIENT_NAME not in texts:
        raise _Unsupported("PatientName cleared")
    walk.patient_name = texts.get(PATIENT_NAME, "")  # replaced (Anonymized<N>, a user's value) or removed

    body: list[bytes | memoryview] = []
    view = memoryview(data)
    for tag in sorted(state):
        if tag & 0xFFFF == 0:
            continue
        current = state[tag]
        if isinstance(current, _Elem):
            if current.vr == "SQ":
                walk.sequence(current, (), encodings, body)  # visited, then written with undefined lengths
            else:
                body.append(view[current.start : current.end])
        elif isinstance(current, DataElement):
            body.append(_encoded(current, encodings))
        else:
            body.append(current)

    sop = {tag: texts[tag] for tag in (SOP_CLASS_UID, SOP_UID) if tag in state}
    return [_file_meta(sop, meta_values, ts), *body]


def _file_meta(sop: dict[int, str], meta_values: dict[int, Any], ts: str) -> bytes:
    """``apply()``'s last step and ``fileio.new_file_meta`` on the result, as ``fileio.encode`` writes it.

    Written here rather than by ``write_file_meta_info``: building and validating a ``FileMetaDataset`` cost
    0.6 ms, a third of this whole path. The seven elements are fixed; the tests compare the bytes with
    pydicom's.
    """
    # apply() sets the old meta's values from the dataset; new_file_meta takes the dataset's, or the old meta's
    sop_class = sop[SOP_CLASS_UID] if SOP_CLASS_UID in sop else meta_values.get(0x00020002)
    sop_instance = sop[SOP_UID] if SOP_UID in sop else meta_values.get(0x00020003)
    if not sop_class or not sop_instance or "\\" in sop_class or "\\" in sop_instance:
        raise _Unsupported("an empty or multi-valued SOP class or instance")  # pydicom refuses or mangles it
    elements = b"".join((
        _LONG_HEAD.pack(0x0002, 0x0001, b"OB", 2) + b"\0\1",
        _meta_text(0x0002, "UI", sop_class),
        _meta_text(0x0003, "UI", sop_instance),
        _meta_text(0x0010, "UI", ts),
        _meta_text(0x0012, "UI", PYDICOM_IMPLEMENTATION_UID),
        _meta_text(0x0013, "SH", IMPLEMENTATION_VERSION_NAME),
    ))  # fmt: skip
    return b"\0" * 128 + b"DICM" + _SHORT_HEAD.pack(0x0002, 0x0000, b"UL", 4) + _U32.pack(len(elements)) + elements


def _meta_text(number: int, vr: str, text: str) -> bytes:
    try:
        value = text.encode("ascii")
    except UnicodeEncodeError:
        raise _Unsupported("a file meta value that is not ASCII") from None
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    header = _header(0x00020000 | number, vr, len(value))
    if header is None:
        raise _Unsupported("a file meta value too long for its header")
    return header + value
