"""The tags the index keeps for each level, and how to read them from a received file.

These are Orthanc's "main DICOM tags" (Orthanc 1.10, ``DicomMap.cpp``): what ``/patients/{id}`` and friends show
as ``MainDicomTags`` and what C-FIND answers from the index without opening files.  Values are kept as Orthanc
keeps them: decoded strings with trailing padding removed, multiple values joined by a backslash.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import IO, Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_partial
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName

PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDs")
STUDY_TAGS = (
    "StudyDate", "StudyTime", "StudyID", "StudyDescription", "AccessionNumber", "StudyInstanceUID",
    "RequestedProcedureDescription", "InstitutionName", "RequestingPhysician", "ReferringPhysicianName",
)  # fmt: skip
SERIES_TAGS = (
    "SeriesDate", "SeriesTime", "Modality", "Manufacturer", "StationName", "SeriesDescription",
    "BodyPartExamined", "SequenceName", "ProtocolName", "SeriesNumber", "CardiacNumberOfImages",
    "ImagesInAcquisition", "NumberOfTemporalPositions", "NumberOfSlices", "NumberOfTimeSlices",
    "SeriesInstanceUID", "ImageOrientationPatient", "SeriesType", "OperatorsName",
    "PerformedProcedureStepDescription", "AcquisitionDeviceProcessingDescription", "ContrastBolusAgent",
)  # fmt: skip
INSTANCE_TAGS = (
    "InstanceCreationDate", "InstanceCreationTime", "AcquisitionNumber", "ImageIndex", "InstanceNumber",
    "NumberOfFrames", "TemporalPositionIdentifier", "SOPInstanceUID", "ImagePositionPatient", "ImageComments",
    "ImageOrientationPatient",
)  # fmt: skip

#: Everything the index needs from a dataset; reading stops before the pixel data and skips the rest.
INDEX_TAGS = tuple(
    sorted(
        {Tag(k) for k in (*PATIENT_TAGS, *STUDY_TAGS, *SERIES_TAGS, *INSTANCE_TAGS)}
        | {Tag("SpecificCharacterSet"), Tag("SOPClassUID")}
    )
)


_TAG_OF = {kw: Tag(kw) for kw in (*PATIENT_TAGS, *STUDY_TAGS, *SERIES_TAGS, *INSTANCE_TAGS)}


class MalformedDataset(ValueError):
    """The bytes are not a DICOM dataset we can index (unreadable, or an identifier is missing or empty)."""


@dataclass(frozen=True, slots=True)
class IndexTags:
    """What the index keeps of one instance, per level."""

    patient: dict[str, str]
    study: dict[str, str]
    series: dict[str, str]
    instance: dict[str, str]
    sop_class_uid: str
    transfer_syntax: str = ""

    @property
    def patient_id(self) -> str:
        return self.patient.get("PatientID", "")

    @property
    def study_uid(self) -> str:
        return self.study["StudyInstanceUID"]

    @property
    def series_uid(self) -> str:
        return self.series["SeriesInstanceUID"]

    @property
    def sop_uid(self) -> str:
        return self.instance["SOPInstanceUID"]


def element_string(value: Any) -> str:
    """A DICOM value as Orthanc's index keeps it: a string, multi-values joined by ``\\``, padding trimmed."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(element_string(v) for v in value)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).rstrip(" \x00")


_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})


def _value_string(elem: Any, encodings: list[str]) -> str:
    """One element's value as an index string, decoding raw bytes with pydicom's charset handling only.

    Going through ``Dataset.__getitem__`` would build a full ``DataElement`` per tag (≈40 µs each here); the
    index needs strings, so raw values are decoded directly: text VRs and PN with the dataset's character
    set, every other VR is ASCII by definition.
    """
    value = elem.value
    if value is None:
        return ""
    if not isinstance(value, (bytes, bytearray)):
        return element_string(value)  # already converted (a Dataset built in memory)
    vr = elem.VR or dictionary_VR(elem.tag)
    if vr == "SQ":
        return ""
    if vr == "PN":
        text = str(PersonName(bytes(value), encodings=encodings))
    elif vr in _TEXT_VRS:
        text = decode_bytes(bytes(value), encodings, TEXT_VR_DELIMS)
    else:
        text = bytes(value).decode("ascii", "replace")
    return text.rstrip(" \x00")


def _level_tags(ds: Dataset, keywords: tuple[str, ...], encodings: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for kw in keywords:
        elem = ds.get_item(_TAG_OF[kw])
        if elem is not None and (elem.VR or dictionary_VR(elem.tag)) != "SQ":
            out[kw] = _value_string(elem, encodings)
    return out


def index_tags(ds: Dataset) -> IndexTags:
    """Extract the index tags of a dataset; raise :class:`MalformedDataset` where Orthanc would refuse it.

    Orthanc refuses an instance whose StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID is absent or empty
    (spec §5); an absent PatientID is tolerated and indexed as ``""``.
    """
    try:
        encodings = convert_encodings(ds.get("SpecificCharacterSet"))
        sop_class = ds.get_item(Tag("SOPClassUID"))
        tags = IndexTags(
            patient=_level_tags(ds, PATIENT_TAGS, encodings),
            study=_level_tags(ds, STUDY_TAGS, encodings),
            series=_level_tags(ds, SERIES_TAGS, encodings),
            instance=_level_tags(ds, INSTANCE_TAGS, encodings),
            sop_class_uid=_value_string(sop_class, encodings) if sop_class is not None else "",
            transfer_syntax=str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
        )
    except Exception as exc:  # any decoding error of a value means a malformed dataset
        raise MalformedDataset(f"cannot decode the main DICOM tags: {exc}") from exc
    for level, kw in (
        (tags.study, "StudyInstanceUID"),
        (tags.series, "SeriesInstanceUID"),
        (tags.instance, "SOPInstanceUID"),
    ):
        if kw not in level:
            raise MalformedDataset(f"missing {kw}")
        if not level[kw]:
            raise MalformedDataset(f"empty {kw}")
    return tags


_HEAD_BYTES = 256 * 1024
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_UNDEFINED = 0xFFFFFFFF
_SEQ_DELIMITER = (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")


_PART10_META_START = b"DICM\x02\x00\x00\x00UL\x04\x00"  # "DICM", then (0002,0000) UL, length 4


def _parse(fp: IO[bytes], ts: UID | None) -> tuple[Dataset, tuple[int, int] | None]:
    """The header up to the pixel data, and where the pixel data value starts and how long it says it is.

    With ``ts`` (the SCP knows the transfer syntax: it is the accepted presentation context's, and the file
    meta was written by pynetdicom), the file meta group is skipped by its group length instead of being
    decoded into a dataset, which is a third of the parsing time of a small instance.
    """
    pixel: list[tuple[int, int]] = []

    def stop(tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            pixel.append((fp.tell(), length))
            return True
        return False

    fp.seek(128)
    header = fp.read(12)
    if ts is not None and not ts.is_deflated and header == _PART10_META_START:
        fp.seek(144 + int.from_bytes(fp.read(4), "little"))
        ds = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=stop,
                          specific_tags=list(INDEX_TAGS), defer_size=65536)  # fmt: skip
    else:
        fp.seek(0)
        ds = read_partial(fp, stop_when=stop, specific_tags=list(INDEX_TAGS), defer_size=65536)
        ts = getattr(ds.file_meta, "TransferSyntaxUID", None)
    ds.file_meta = FileMetaDataset()
    if ts is not None:
        ds.file_meta.TransferSyntaxUID = ts
    return ds, (pixel[0] if pixel else None)


def _check_complete(fh: IO[bytes], size: int, pixel: tuple[int, int] | None) -> None:
    """Refuse a dataset whose pixel data is cut short (a truncated file sent as it was)."""
    if pixel is None:
        return
    start, length = pixel
    if length != _UNDEFINED:
        if start + length > size:
            raise MalformedDataset(f"truncated: pixel data announces {length} bytes, {max(size - start, 0)} present")
        return
    fh.seek(max(start, size - 65536))
    tail = fh.read()
    if not any(d in tail for d in _SEQ_DELIMITER):
        raise MalformedDataset("truncated: encapsulated pixel data has no sequence delimiter")


def read_index_tags(path: str, transfer_syntax: str | None = None) -> IndexTags:
    """Read only what the index needs from a Part-10 file: no pixel data, no value we do not index.

    ``transfer_syntax``, when the caller knows it, spares decoding the file meta group.

    The header is parsed from one read of the file's start (pydicom reading the file itself issues a small
    read per element); when the header is larger than that, the file is parsed in place.  A file whose pixel
    data is shorter than its header says is refused as malformed.
    """
    ts = UID(transfer_syntax) if transfer_syntax else None
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(_HEAD_BYTES)
            try:
                ds, pixel = _parse(io.BytesIO(head), ts)
            except Exception:
                if len(head) < _HEAD_BYTES:
                    raise
                ds, pixel = None, None
            if pixel is None and len(head) == _HEAD_BYTES:
                # The header may go on past the buffer (pydicom skips unwanted values by seeking, silently
                # past the end of a buffer): decide on the whole file.
                ds, pixel = _parse(fh, ts)
            if not getattr(ds.file_meta, "TransferSyntaxUID", None) or not ds.file_meta.TransferSyntaxUID.is_deflated:
                _check_complete(fh, size, pixel)  # (a deflated stream's offsets are not the file's)
    except MalformedDataset:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise  # the disk, not the data
        raise MalformedDataset(f"not a readable DICOM dataset: {exc}") from exc
    except Exception as exc:  # zlib.error, RecursionError, pydicom's own: all mean bad data
        raise MalformedDataset(f"not a readable DICOM dataset: {type(exc).__name__}: {exc}") from exc
    return index_tags(ds)
