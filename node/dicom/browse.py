"""Orthanc's raw content browsing (``/instances/{id}/content/...``), resolved on a stored file.

A path alternates tags and item indexes, as in Orthanc (``ParsedDicomFile::SendPathValue``): an even number of
components names a dataset (the top level or a sequence item) and answers the list of its tags as
``gggg-eeee``; an odd number names an element: a sequence answers its item indexes (``"0"``, ``"1"``…), any other
element its value *as stored* (bytes, padding included). ``7fe0-0010`` at the top level is special: it lists the
pixel data's fragments (``["0"]`` for native pixel data; for encapsulated data every item, the basic offset table
first) and ``7fe0-0010/N`` answers fragment N.

Large values are never loaded: they are answered as a byte range of the file, which the caller streams.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import dcmread
from pydicom.filewriter import write_data_element

from node.dicom.dicomjson import DEFER_SIZE, PIXEL_DATA, dictionary_vr, format_tag, private_creator
from node.dicom.tags import TagError, parse_tag

_UNDEFINED = 0xFFFFFFFF
_ITEM, _SEQ_DELIMITER = 0xFFFEE000, 0xFFFEE0DD


class NotFound(LookupError):
    """The path names no tag, item or fragment of this instance."""


@dataclass(frozen=True, slots=True)
class Value:
    """An element's value: ``data`` when held in memory, else ``length`` bytes of ``path`` from ``offset``."""

    data: bytes | None = None
    path: str = ""
    offset: int = 0
    length: int = 0

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.length


def _tag(token: str) -> int:
    try:
        return int(parse_tag(token, parentheses=False))
    except TagError as exc:
        raise NotFound(str(exc)) from None


def _index(token: str) -> int:
    if not token.isdigit():
        raise NotFound(f"{token!r} is not an item index")
    return int(token)


def _read(path: str, deflated_whole: bool = False) -> Dataset:
    return dcmread(path, defer_size=None if deflated_whole else DEFER_SIZE, force=True)


def _vr_of(item: Dataset, tag: int) -> str:
    """The element's VR, without converting it (``Dataset[tag]`` would replace the raw bytes we answer)."""
    raw = item.get_item(tag, keep_deferred=True)
    if not isinstance(raw, RawDataElement):
        return str(raw.VR)
    if raw.VR and raw.VR != "UN":
        return str(raw.VR)
    vr = dictionary_vr(tag, private_creator(item, tag))
    if vr:
        return vr
    if raw.value is not None and bytes(raw.value[:4]) in (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00"):
        return "SQ"  # an unknown tag whose value is made of items
    return "UN"


def _encoded(elem: DataElement, ds: Dataset) -> bytes:
    """A value pydicom already converted, encoded back as it would be stored (rare: nested undefined lengths)."""
    implicit, little = ds.original_encoding
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = bool(implicit), bool(little if little is not None else True)
    write_data_element(buf, elem)
    data = buf.getvalue()
    header = 8 if implicit or elem.VR not in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                                               "UT", "UV") else 12  # fmt: skip
    return data[header:]


def _leaf(path: str, item: Dataset, tag: int, in_memory: bool) -> Value:
    raw = item.get_item(tag, keep_deferred=True)
    if isinstance(raw, RawDataElement):
        if raw.value is not None:
            return Value(data=bytes(raw.value))
        if raw.length not in (0, _UNDEFINED) and not in_memory:
            return Value(path=path, offset=raw.value_tell, length=raw.length)
        if raw.length == 0:
            return Value(data=b"")
    return Value(data=_encoded(item[tag], item))


def _fragments(fh: BinaryIO, start: int) -> list[tuple[int, int]]:
    """(offset, length) of every item of encapsulated pixel data whose value starts at ``start``."""
    out = []
    fh.seek(start)
    while True:
        header = fh.read(8)
        if len(header) < 8:
            break
        group, elem, length = struct.unpack("<HHI", header)
        tag = group << 16 | elem
        if tag == _SEQ_DELIMITER or tag != _ITEM or length == _UNDEFINED:
            break
        out.append((fh.tell(), length))
        fh.seek(length, os.SEEK_CUR)
    return out


def _pixel_data(path: str, ds: Dataset, block: str | None) -> list[str] | Value:
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if raw is None:
        raise NotFound("this instance has no pixel data")
    if isinstance(raw, RawDataElement) and raw.length != _UNDEFINED:  # native: one block
        if block is None:
            return ["0"]
        if block != "0":
            raise NotFound(f"native pixel data has one block only, not {block!r}")
        return _leaf(path, ds, PIXEL_DATA, in_memory=False)
    if isinstance(raw, RawDataElement) and raw.value is not None:
        data = bytes(raw.value)  # encapsulated and small: held in memory
        frags = _fragments(DicomBytesIO(data), 0)  # type: ignore[arg-type]
        pieces = [Value(data=data[o : o + n]) for o, n in frags]
    else:
        start = raw.value_tell if isinstance(raw, RawDataElement) else -1
        if start < 0:
            raise NotFound("pixel data cannot be located in the file")
        with open(path, "rb") as fh:
            frags = _fragments(fh, start)
        pieces = [Value(path=path, offset=o, length=n) for o, n in frags]
    if block is None:
        return [str(i) for i in range(len(pieces))]
    index = _index(block)
    if index >= len(pieces):
        raise NotFound(f"pixel data has {len(pieces)} fragments, no fragment {index}")
    return pieces[index]


def browse(path: str | os.PathLike[str], parts: list[str]) -> list[str] | Value:
    """Resolve a content path in a stored file: a JSON list (tags or indexes) or a raw value."""
    path = os.fspath(path)
    ds = _read(path)
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    in_memory = bool(ts is not None and ts.is_deflated)  # offsets are the inflated stream's: read it whole
    if in_memory:
        ds = _read(path, deflated_whole=True)
    if parts and _tag(parts[0]) == PIXEL_DATA and len(parts) <= 2:
        return _pixel_data(path, ds, parts[1] if len(parts) == 2 else None)
    item = ds
    for i in range(len(parts) // 2):
        seq_tag, index = _tag(parts[2 * i]), _index(parts[2 * i + 1])
        if seq_tag not in item or _vr_of(item, seq_tag) != "SQ":
            raise NotFound(f"no sequence {format_tag(seq_tag)} here")
        items = item[seq_tag].value or []
        if index >= len(items):
            raise NotFound(f"sequence {format_tag(seq_tag)} has {len(items)} item(s), no item {index}")
        item = items[index]
    if len(parts) % 2 == 0:
        return [format_tag(t, "-") for t in sorted(item.keys())]
    tag = _tag(parts[-1])
    if tag not in item:
        raise NotFound(f"no tag {format_tag(tag)} here")
    if _vr_of(item, tag) == "SQ":
        return [str(i) for i in range(len(item[tag].value or []))]
    return _leaf(path, item, tag, in_memory)
