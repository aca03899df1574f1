"""A dataset as Orthanc 1.10 shows it in JSON: ``/instances/{id}/tags`` and its ``?simplify`` / ``?short`` forms.

Scripts written against Orthanc read these shapes field by field, so they are reproduced from Orthanc's source
(``FromDcmtkBridge::DatasetToJson`` / ``ElementToJson`` / ``ConvertLeafElement`` with
``DicomToJsonFlags_Default`` and ``ORTHANC_MAXIMUM_TAG_LENGTH`` = 256, ``Toolbox::SimplifyDicomAsJson``):

- *full*: ``{"0010,0010": {"Name": "PatientName", "Type": "String", "Value": "DOE^JOHN"}}``, keys in lowercase hex.
  ``Type`` is ``String`` (every string VR, the whole value with its backslashes and trailing padding removed;
  numbers as strings, all values joined by ``\\``, floats with 17 significant digits; AT as ``gggg,eeee``),
  ``Sequence`` (``Value`` a list of items in the same format), ``TooLong`` (``Value`` null: longer than 256 UTF-8
  bytes), or ``Null`` (``Value`` null: binary VRs OB/OW/OF/OD/OL/OV/UN/SV/UV, PixelData, empty numbers). An empty
  string is ``String`` with ``""``, as in Orthanc. Private data elements carry ``PrivateCreator``.
- Top-level elements after PixelData are left out (``StopAfterPixelData``); group lengths are kept.
- Names: the DICOM keyword, ``RETIRED_`` + keyword for retired tags (DCMTK's dictionary, which Orthanc uses),
  ``PrivateCreator`` / ``PrivateGroupLength`` / ``GenericGroupLength``, a private tag known to pydicom's private
  dictionary by its description in CamelCase, anything else ``Unknown Tag & Data`` (DCMTK's name for a tag it does
  not know). DCMTK's private dictionary and pydicom's differ, so names of known private tags may differ from
  Orthanc's.
- *simplify* (``Human``): keyed by ``Name`` (colliding names, e.g. two unknown private tags: the last in tag order
  wins, as in Orthanc), values plain (``null`` for Null/TooLong); *short*: keyed by ``gggg,eeee``.
- Text is decoded with the top-level SpecificCharacterSet for every element, nested ones included (Orthanc detects
  the encoding once per dataset); files are read with large values deferred, so pixel data is never loaded.

Pure: no database, no web framework.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import (
    dictionary_is_retired,
    dictionary_keyword,
    dictionary_VR,
    private_dictionary_description,
    private_dictionary_VR,
)
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import dcmread
from pydicom.multival import MultiValue
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName

FULL, SHORT, SIMPLIFY = "full", "short", "simplify"
MAX_TAG_LENGTH = 256  # ORTHANC_MAXIMUM_TAG_LENGTH
#: Values larger than this are not read from the file (a string or number array this long is TooLong anyway).
DEFER_SIZE = 64 * 1024
UNKNOWN_NAME = "Unknown Tag & Data"  # DCMTK's DcmTag_ERROR_TagName
PIXEL_DATA = 0x7FE00010

STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                        "UR", "UT"})  # fmt: skip
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL"})
_FLOAT_VRS = frozenset({"FL", "FD"})


def read(path: str | os.PathLike[str]) -> Dataset:
    """A stored file's dataset, values above :data:`DEFER_SIZE` left on disk (pixel data is never loaded)."""
    return dcmread(os.fspath(path), defer_size=DEFER_SIZE, force=True)


def format_tag(tag: int, sep: str = ",") -> str:
    return f"{tag >> 16:04x}{sep}{tag & 0xFFFF:04x}"


# -- names -------------------------------------------------------------------------------------------------------


def _camel(description: str) -> str:
    return "".join(w[:1].upper() + w[1:] for w in re.split(r"[^0-9A-Za-z]+", description) if w)


def private_creator(ds: Dataset, tag: int) -> str | None:
    """The creator of a private data element (gggg,xxyy with xx >= 0x10) in the same dataset, if declared."""
    group, elem = tag >> 16, tag & 0xFFFF
    if group % 2 == 0 or elem < 0x1000:
        return None
    creator = ds.get_item((group << 16) | (elem >> 8))
    if creator is None or creator.value is None:
        return None
    value = creator.value
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return text.split("\0", 1)[0].strip() or None


def tag_name(tag: int, creator: str | None = None) -> str:
    """The name Orthanc (DCMTK's dictionary) gives a tag."""
    group, elem = tag >> 16, tag & 0xFFFF
    if group % 2:
        illegal = group in (1, 3, 5, 7)
        if elem == 0:
            return "IllegalGroupLength" if illegal else "PrivateGroupLength"
        if 0x10 <= elem <= 0xFF:
            return "IllegalPrivateCreator" if illegal else "PrivateCreator"
        if creator:
            try:
                description = private_dictionary_description(tag, creator)
            except KeyError:
                return UNKNOWN_NAME
            return _camel(description) or UNKNOWN_NAME
        return UNKNOWN_NAME
    try:
        keyword = dictionary_keyword(tag)
    except KeyError:
        return "GenericGroupLength" if elem == 0 else UNKNOWN_NAME
    if not keyword:
        return UNKNOWN_NAME
    # Orthanc keeps the plain name of OtherPatientIDs, retired since DCMTK 3.6.4 (FromDcmtkBridge's patches)
    if dictionary_is_retired(tag) and keyword != "OtherPatientIDs":
        return "RETIRED_" + keyword
    return keyword


def dictionary_vr(tag: int, creator: str | None) -> str | None:
    try:
        if tag >> 16 & 1:
            return private_dictionary_VR(tag, creator) if creator else None
        return dictionary_VR(tag)
    except KeyError:
        return None


# -- values ------------------------------------------------------------------------------------------------------


def _decode_string(data: bytes, vr: str, encodings: list[str]) -> str:
    """DCMTK's ``getString`` (a C string: up to the first NUL, trailing padding removed), then UTF-8."""
    data = data.split(b"\0", 1)[0]
    if vr != "UI":
        data = data.rstrip(b" ")
    if vr == "PN":
        return "\\".join(str(PersonName(v, encodings=encodings)) for v in data.split(b"\\"))
    if vr in _TEXT_VRS:
        return decode_bytes(data, encodings, TEXT_VR_DELIMS)
    return decode_bytes(data, encodings, set())


def _number(value: float, vr: str) -> str:
    return f"{value:.17g}" if vr in _FLOAT_VRS else str(int(value))


def _numbers(value: Any, vr: str) -> str | None:
    if value is None or value == "" or (isinstance(value, (list, MultiValue)) and len(value) == 0):
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(_number(v, vr) for v in value)
    return _number(value, vr)


def _is_ascii_text(data: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in data)


class _Converter:
    """One dataset's elements as Orthanc's full JSON; ``encodings`` is the top-level character set."""

    def __init__(self, encodings: list[str], max_length: int, sequences: bool) -> None:
        self.encodings = encodings
        self.max_length = max_length
        self.sequences = sequences

    def dataset(self, ds: Dataset, top: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for tag in sorted(ds.keys()):
            if top and tag > PIXEL_DATA:
                break  # StopAfterPixelData
            try:
                node = self.element(ds, tag)
            except Exception:  # noqa: BLE001 - a value pydicom cannot decode: shown without value, as binary
                node = self._leaf(tag_name(tag, private_creator(ds, tag)), private_creator(ds, tag), "Null")
            if node is not None:
                out[format_tag(tag)] = node
        return out

    def _leaf(self, name: str, creator: str | None, kind: str, value: str | None = None) -> dict[str, Any]:
        node: dict[str, Any] = {"Name": name}
        if creator is not None:
            node["PrivateCreator"] = creator
        if kind == "String" and value is not None and self.max_length and len(value.encode()) > self.max_length:
            kind, value = "TooLong", None
        node["Type"] = kind
        node["Value"] = value if kind == "String" else None
        return node

    def element(self, ds: Dataset, tag: int) -> dict[str, Any] | None:
        raw = ds.get_item(tag, keep_deferred=True)
        creator = private_creator(ds, tag)
        name = tag_name(tag, creator)
        if tag == PIXEL_DATA:
            return self._leaf(name, creator, "Null")
        if isinstance(raw, RawDataElement):
            if raw.value is None and raw.length:  # deferred: too large to read, never loaded for /tags
                vr = raw.VR or dictionary_vr(tag, creator) or "UN"
                if vr != "SQ":
                    return self._leaf(name, creator, "TooLong" if vr in STRING_VRS | _INT_VRS | _FLOAT_VRS else "Null")
            elif raw.VR == "UN" and raw.length != 0xFFFFFFFF:
                return self._unknown_vr(raw, tag, name, creator)
        elem = ds[tag]
        vr = elem.VR
        if vr == "SQ":
            if not self.sequences:
                return None
            items = [self.dataset(item, top=False) for item in (elem.value or [])]
            return {"Name": name, "Type": "Sequence", "Value": items}
        if vr in STRING_VRS:
            if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
                text = _decode_string(raw.value, vr, self.encodings)
            else:
                text = _plain(elem.value)
            return self._leaf(name, creator, "String", text)
        if vr in _INT_VRS or vr in _FLOAT_VRS:
            text = _numbers(elem.value, vr)
            return self._leaf(name, creator, "Null" if text is None else "String", text)
        if vr == "AT":
            value = elem.value
            first = value[0] if isinstance(value, (list, MultiValue)) and value else value
            if first is None or first == "" or isinstance(first, (list, MultiValue)):
                return self._leaf(name, creator, "Null")
            return self._leaf(name, creator, "String", format_tag(int(first)))
        return self._leaf(name, creator, "Null")  # OB, OW, OF, OD, OL, OV, UN, SV, UV: binary, never shown

    def _unknown_vr(self, raw: RawDataElement, tag: int, name: str, creator: str | None) -> dict[str, Any]:
        """An explicit UN element: a string if the dictionary says so (private ones only if plain ASCII)."""
        vr = dictionary_vr(tag, creator)
        data = bytes(raw.value or b"")
        if vr not in STRING_VRS:
            return self._leaf(name, creator, "Null")
        if len(data) % 2 == 0 and data.endswith(b"\0"):
            data = data[:-1]
        if tag >> 16 & 1:
            if not _is_ascii_text(data):
                return self._leaf(name, creator, "Null")
            return self._leaf(name, creator, "String", data.decode("ascii"))
        return self._leaf(name, creator, "String", decode_bytes(data, self.encodings, TEXT_VR_DELIMS))


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(_plain(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip(" \0")
    return str(value).rstrip(" \0")


def to_full(ds: Dataset, *, max_length: int = MAX_TAG_LENGTH, sequences: bool = True) -> dict[str, Any]:
    """Orthanc's full format of a dataset (``sequences=False`` leaves sequences out: what shared-tags needs)."""
    encodings = convert_encodings(ds.get("SpecificCharacterSet"))
    return _Converter(encodings, max_length, sequences).dataset(ds, top=True)


def simplify(full: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Orthanc's ``SimplifyDicomAsJson``: full → ``simplify`` (keyed by name) or ``short`` (keyed by hex tag)."""
    if fmt == FULL:
        return full
    out: dict[str, Any] = {}
    for key, node in full.items():
        name = node["Name"] if fmt == SIMPLIFY else key
        kind = node["Type"]
        if kind == "String":
            out[name] = node["Value"]
        elif kind == "Sequence":
            out[name] = [simplify(item, fmt) for item in node["Value"]]
        else:  # Null, TooLong
            out[name] = None
    return out


def dataset_json(ds: Dataset, fmt: str = FULL) -> dict[str, Any]:
    return simplify(to_full(ds), fmt)


def shared(fulls: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Orthanc's shared tags: the top-level ``String`` elements identical (name, value, creator) in every dataset."""
    common: dict[str, Any] | None = None
    for full in fulls:
        strings = {k: v for k, v in full.items() if v.get("Type") == "String"}
        common = strings if common is None else {k: v for k, v in common.items() if strings.get(k) == v}
        if not common:
            return {}
    return common or {}
