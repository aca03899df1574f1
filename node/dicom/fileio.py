"""Read a DICOM file for editing and write the edited result, touching pixel data at most once.

Reading keeps the file's bytes in memory and lets pydicom parse the elements lazily: large values (pixel data,
big private blobs) are deferred, so they are never copied into Python objects. Writing splices: every
top-level element the edit did not touch is emitted as the very bytes it had in the input (a memoryview
slice, no copy, no re-encoding), and only the elements the edit changed go through pydicom's encoder. The
result is byte-identical to what pydicom would write for the same dataset, minus retired group lengths,
at a fraction of the cost (pydicom encodes each element through a fresh buffer).

When splicing is not possible (deflated input, a different output transfer syntax) the dataset is written
by pydicom as a whole.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import dcmread
from pydicom.filewriter import dcmwrite, write_data_element, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from node import __version__
from node.dicom.values import value_text

#: Values larger than this stay in the input buffer until written.
DEFER_SIZE = 16 * 1024
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__.replace('.', '')}"[:16]
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index of files, not an instance


class NotDicom(ValueError):
    """The bytes are not a DICOM file (no ``DICM`` prefix and no plausible dataset)."""


@dataclass
class Loaded:
    """A dataset together with the input bytes its raw elements point into."""

    ds: Dataset
    data: bytes
    transfer_syntax: UID

    @property
    def sop_class(self) -> str:
        meta = getattr(self.ds, "file_meta", None)
        value = self.ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
        return str(value or "")


def iter_files(paths: Iterable[str | os.PathLike[str]], exclude: Path | None = None) -> Iterator[tuple[Path, bool]]:
    """Every file under ``paths`` (folders walked recursively, sorted), with whether the user named it itself;
    nothing under ``exclude`` (an output folder inside an input folder)."""
    excluded = exclude.resolve() if exclude is not None else None
    for p in map(Path, paths):
        if not p.is_dir():
            yield p, True
            continue
        for root, dirs, files in os.walk(p):
            here = Path(root).resolve()
            if excluded is not None and (here == excluded or excluded in here.parents):
                dirs[:] = []
                continue
            dirs.sort()
            for name in sorted(files):
                yield Path(root) / name, False


def _looks_like_dataset(data: bytes) -> bool:
    """A file without the Part-10 preamble: does it start with a low group (0002/0008) element?"""
    if len(data) < 8:
        return False
    group_le = int.from_bytes(data[0:2], "little")
    group_be = int.from_bytes(data[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


def load(source: str | os.PathLike[str] | bytes) -> Loaded:
    """Parse a file (path or bytes) for editing.

    Raises :class:`NotDicom` for something that is not DICOM at all, :class:`Truncated` for a partial copy
    (pydicom reads those without complaint: we check that the elements reach the end of the data).
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    has_prefix = len(data) >= 132 and data[128:132] == b"DICM"
    if not has_prefix and not _looks_like_dataset(data):
        raise NotDicom("not a DICOM file (no DICM prefix)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = dcmread(io.BytesIO(data), defer_size=DEFER_SIZE, force=not has_prefix)
        except InvalidDicomError as exc:
            raise NotDicom(f"not a DICOM file: {exc}") from None
        except (struct.error, EOFError) as exc:  # the file ends inside an element header
            raise Truncated(f"truncated file: it ends inside an element header ({exc})") from None
    for w in caught:
        if "end of file" in str(w.message).lower() or "delimiter" in str(w.message).lower():
            raise Truncated(f"truncated file: {w.message}")
    if not ds._dict:
        if has_prefix:
            raise Truncated("truncated file: a DICM header but no readable data element")
        raise NotDicom("no data elements")
    ds.preamble = None  # the input's 128 bytes may hold anything (some writers put the patient's name there)
    ts = transfer_syntax_of(ds)
    if ts != DeflatedExplicitVRLittleEndian:  # deflated: offsets are in the inflated stream, not in ``data``
        _check_complete(ds, data)
    return Loaded(ds, data, ts)


def read_header(path: str | os.PathLike[str]) -> Dataset:
    """Every element up to the pixel data, sequences included (what a routing filter may look at)."""
    return dcmread(path, stop_before_pixels=True, force=True)


def transfer_syntax_of(ds: Dataset) -> UID:
    """The file meta's transfer syntax, or the encoding pydicom found in a file without one."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None:
        return UID(str(ts))
    implicit, little = ds.original_encoding
    return ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


class Truncated(ValueError):
    """The file ends inside an element: a partial copy, never to be passed on as if it were whole."""


def _check_complete(ds: Dataset, data: bytes) -> None:
    """The last element must end where the data ends (a few zero bytes of padding aside)."""
    size = len(data)
    tag = max(ds._dict)
    if tag & 0xFFFF == 0 and tag >> 16 != 0x0002:
        raise Truncated(f"truncated file: it ends right after the group length ({tag >> 16:04x},0000)")
    elem = ds._dict[tag]
    if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
        return  # undefined length: pydicom warned above if the delimiter was missing
    end = elem.value_tell + elem.length
    short = len(elem.value) < elem.length if elem.value is not None else end > size
    where = f"element ({tag >> 16:04x},{tag & 0xFFFF:04x}) needs {elem.length} bytes at offset {elem.value_tell}"
    if short or end > size:
        raise Truncated(f"truncated file: {where}, the file has {size}")
    if 0 < size - end < 8 and data[end:].strip(b"\0"):
        raise Truncated(f"truncated file: {size - end} byte(s) of an element header after the last element")


def new_file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    """A fresh file meta group: nothing of the sender's meta (its AE title, its implementation) is carried."""
    meta = FileMetaDataset()
    old = getattr(ds, "file_meta", None) or {}
    sop_class = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
    sop_instance = ds.get("SOPInstanceUID") or old.get("MediaStorageSOPInstanceUID")
    # value_text: an (invalid, but seen) multi-valued UID joined by backslashes, not written as a Python list
    meta.MediaStorageSOPClassUID = value_text(sop_class)
    meta.MediaStorageSOPInstanceUID = value_text(sop_instance)
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _header_length(elem: RawDataElement, implicit: bool) -> int:
    if implicit:
        return 8
    return 12 if elem.VR in EXPLICIT_VR_LENGTH_32 else 8


def _spliceable(loaded: Loaded, transfer_syntax: str) -> bool:
    return transfer_syntax == loaded.transfer_syntax and loaded.transfer_syntax != DeflatedExplicitVRLittleEndian


def encode(loaded: Loaded, transfer_syntax: str | None = None) -> list[bytes | memoryview]:
    """The output file as a list of chunks (preamble, meta, elements); join or ``writelines`` them."""
    ds = loaded.ds
    ts = UID(transfer_syntax or transfer_syntax_of(ds))  # an edit (an embedded image) may have changed it
    meta = new_file_meta(ds, ts)
    if not _spliceable(loaded, ts):
        out = io.BytesIO()
        ds.file_meta = meta
        ds.preamble = None  # zeros, never the input's preamble
        dcmwrite(out, ds, enforce_file_format=True)
        return [out.getvalue()]
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    chunks: list[bytes | memoryview] = [head.getvalue()]
    chunks.extend(_body_chunks(loaded))
    return chunks


_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


def element_header(tag: int, vr: str, length: int, implicit: bool, little: bool) -> bytes | None:
    """Tag, VR and length as they precede a value (None if the length does not fit a 16-bit length VR)."""
    e = "<" if little else ">"
    if implicit:
        return struct.pack(e + "HHI", tag >> 16, tag & 0xFFFF, length)
    if vr in EXPLICIT_VR_LENGTH_32:
        return struct.pack(e + "HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)
    if length > 0xFFFF:
        return None
    return struct.pack(e + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)


def _encode_item(item: Dataset, implicit: bool, little: bool, encodings: list[str] | None, out: DicomBytesIO) -> None:
    """One sequence item, undefined length, as pydicom writes it; raw elements are emitted without decoding.

    pydicom's own writer encodes every element through a new buffer, which made writing the nested sequences
    of a typical CT header cost more than everything else together.
    """
    if 0x00080005 in item:
        encodings = convert_encodings(item[0x00080005].value)
    e = "<" if little else ">"
    out.write(struct.pack(e + "HHI", 0xFFFE, 0xE000, _UNDEFINED))
    for tag in sorted(item.keys()):
        if tag & 0xFFFF == 0:
            continue
        elem = item._dict[tag]
        if isinstance(elem, RawDataElement) and (elem.is_implicit_VR != implicit or elem.is_little_endian != little):
            elem = item[tag]  # implicit VR content in an explicit file (a UN sequence): decode, then re-encode
        if isinstance(elem, RawDataElement) and elem.value is not None and elem.length != _UNDEFINED:
            vr = elem.VR or "UN"
            header = element_header(tag, vr, len(elem.value), implicit, little)
            if header is not None and (implicit or elem.VR):
                out.write(header)
                out.write(elem.value)
                continue
        if isinstance(elem, RawDataElement):
            elem = item[tag]  # undefined length, deferred or without a VR: let pydicom decode it
        if elem.VR == "SQ":
            _encode_sequence(elem, implicit, little, encodings, out)
        else:
            write_data_element(out, elem, encodings)
    out.write(struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0))


def _encode_sequence(elem: Any, implicit: bool, little: bool, encodings: list[str] | None, out: DicomBytesIO) -> None:
    e = "<" if little else ">"
    header = element_header(elem.tag, "SQ", _UNDEFINED, implicit, little)
    assert header is not None
    out.write(header)
    for item in elem.value:
        _encode_item(item, implicit, little, encodings, out)
    out.write(struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0))


def sequence_as_raw(elem: Any, implicit: bool, little: bool, encodings: list[str] | None) -> RawDataElement:
    """A (visited) sequence element encoded back into a raw element, bytes as :func:`encode` writes them.

    Such an element is written verbatim, and the engine can hand the same bytes to the next instance whose
    sequence was identical (``apply(..., sequence_cache=…)``). ``value_tell`` is -1: it is not in the input.
    """
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = little, implicit
    for item in elem.value:
        _encode_item(item, implicit, little, encodings, out)
    # undefined length, the value without its delimiter: how pydicom keeps a raw sequence read from a file
    return RawDataElement(elem.tag, "SQ", _UNDEFINED, out.getvalue(), -1, implicit, little, True)


def _body_chunks(loaded: Loaded) -> Iterator[bytes | memoryview]:
    ds, view = loaded.ds, memoryview(loaded.data)
    implicit, little = ds.original_encoding
    encodings = convert_encodings(ds[0x00080005].value) if 0x00080005 in ds else None
    pending = DicomBytesIO()
    pending.is_little_endian, pending.is_implicit_VR = little, implicit
    for tag in sorted(ds.keys()):
        if tag & 0xFFFF == 0 or tag >> 16 == 0x0002:
            continue  # retired group lengths (now wrong) and any file meta kept in the dataset
        elem = ds._dict[tag]  # as stored: Dataset.get_item would read a deferred value into memory
        if isinstance(elem, RawDataElement) and elem.value_tell < 0:  # a sequence the engine rebuilt
            pending.write(element_header(tag, "SQ", _UNDEFINED, implicit, little) or b"")
            pending.write(elem.value)
            pending.write(struct.pack("<HHI" if little else ">HHI", 0xFFFE, 0xE0DD, 0))
        elif isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF:
            if pending.tell():
                yield pending.getvalue()
                pending = DicomBytesIO()
                pending.is_little_endian, pending.is_implicit_VR = little, implicit
            start = elem.value_tell - _header_length(elem, implicit)
            yield view[start : elem.value_tell + elem.length]
        elif not isinstance(elem, RawDataElement) and elem.VR == "SQ":
            _encode_sequence(elem, implicit, little, encodings, pending)
        else:
            if isinstance(elem, RawDataElement) and elem.value is None:
                elem = ds.get_item(tag)  # deferred with undefined length (encapsulated pixel data): read it now
            write_data_element(pending, elem, encodings)
    if pending.tell():
        yield pending.getvalue()
