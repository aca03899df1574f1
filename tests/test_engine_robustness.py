"""Inputs that once leaked PHI, corrupted pixels or killed a run (found by review), pinned one by one."""

from __future__ import annotations

import copy
import faulthandler
import io
import os
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SAMPLES
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from node import batch
from node.dicom import fileio
from node.dicom.apply import apply
from node.dicom.request import parse_anonymize, parse_modify
from node.dicom.transcode import transcode
from node.dicom.uidmap import KeyedUidMap

PHI = (b"SMITH", b"PID12345", b"19600101", b"SECRET")


def base(ts: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.SeriesInstanceUID = "1.2.3.4.5.6"
    ds.PatientName = "SMITH^JOHN"
    ds.PatientID = "PID12345"
    ds.PatientBirthDate = "19600101"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def to_bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def anonymize(data: bytes, body: dict | None = None, ts: str | None = None) -> bytes:
    loaded = fileio.load(data)
    apply(loaded.ds, parse_anonymize(body or {}), KeyedUidMap(b"r" * 32), patient_name_counter=1)
    if ts is not None:
        transcode(loaded.ds, ts)
    return b"".join(bytes(c) for c in fileio.encode(loaded, ts))


def phi_item() -> Dataset:
    item = Dataset()
    item.PatientName, item.PatientBirthDate = "SMITH^JOHN", "19600101"
    item.ReferencedSOPInstanceUID, item.InstitutionName = "1.2.3.4.5.6.7", "SECRET HOSPITAL"
    return item


def implicit_items(items: list[Dataset], undefined: bool = False) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    for it in items:
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, True
        write_dataset(buf, it)
        value = buf.getvalue()
        out.write_tag(0xFFFEE000)
        out.write_UL(0xFFFFFFFF if undefined else len(value))
        out.write(value)
        if undefined:
            out.write_tag(0xFFFEE00D)
            out.write_UL(0)
    return out.getvalue()


@pytest.mark.parametrize("tag", [0x00081250, 0x00081140, 0x00400260])
def test_a_sequence_received_as_un_is_de_identified_inside(tag: int) -> None:
    ds = base()
    ds[tag] = DataElement(tag, "OB", implicit_items([phi_item()]))
    header = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    data = to_bytes(ds).replace(header + b"OB", header + b"UN")
    out = anonymize(data)
    assert [w for w in PHI if w in out] == []
    assert b"1.2.3.4.5.6.7" not in out
    assert pydicom.dcmread(io.BytesIO(out))[tag].VR == "SQ"


def test_a_private_sequence_of_an_implicit_vr_file_is_visited_when_private_tags_are_kept() -> None:
    ds = base(ImplicitVRLittleEndian)
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "SQ", Sequence([phi_item()]))
    out = anonymize(to_bytes(ds), {"KeepPrivateTags": True})
    assert [w for w in PHI if w in out] == []
    assert b"ACME" in out


def test_implicit_vr_items_inside_an_explicit_vr_file_are_written_correctly() -> None:
    """A vendor SQ whose items are implicit VR: pydicom reads it; our writer converts rather than crashing."""
    ds = base()
    raw = to_bytes(ds)
    item = phi_item()
    item.CodeMeaning = "hello"
    tag = 0x00400260
    element = (struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
               + implicit_items([item], undefined=True) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))  # fmt: skip
    for body, is_modify in (({}, False), ({"Replace": {"InstitutionName": "X"}}, True)):
        loaded = fileio.load(raw + element)
        mod = parse_modify(body) if is_modify else parse_anonymize(body)
        apply(loaded.ds, mod, KeyedUidMap(b"r" * 32), patient_name_counter=1)
        out = pydicom.dcmread(io.BytesIO(b"".join(bytes(c) for c in fileio.encode(loaded))))
        assert out[tag][0].CodeMeaning == "hello"
        if not is_modify:
            assert [w for w in PHI if w in to_bytes(out)] == []


@pytest.mark.parametrize("ts", [None, ImplicitVRLittleEndian])
def test_the_input_preamble_never_reaches_the_output(ts: str | None) -> None:
    for source_ts in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds = base(source_ts)
        ds.preamble = b"PATIENT SMITH^JOHN MRN PID12345".ljust(128, b" ")
        out = anonymize(to_bytes(ds), ts=ts)
        assert out[:128] == b"\0" * 128


def test_big_endian_words_survive_transcoding() -> None:
    ds = base(ExplicitVRBigEndian)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 2, 2, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    expected = [[1, 256], [1000, 65535]]
    ds.PixelData = np.array(expected, dtype=">u2").tobytes()
    ds["PixelData"].VR = "OW"
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless):
        out = pydicom.dcmread(io.BytesIO(anonymize(to_bytes(ds), ts=target)))
        assert out.file_meta.TransferSyntaxUID == target
        assert out.pixel_array.tolist() == expected


def test_planar_colour_is_compressed_from_the_pixels_not_the_bytes() -> None:
    source = SAMPLES / "TransferSyntaxes" / "1.2.840.10008.1.2.2.dcm"
    before = pydicom.dcmread(source).pixel_array
    out = pydicom.dcmread(io.BytesIO(anonymize(source.read_bytes(), ts=RLELossless)))
    assert np.array_equal(out.pixel_array, before)


def _cut(tmp_path: Path, source: Path, size: int) -> Path:
    path = tmp_path / f"{source.stem}-cut-{size}.dcm"
    path.write_bytes(source.read_bytes()[:size])
    return path


def test_partial_copies_fail_instead_of_passing_as_whole_or_as_not_dicom(tmp_path: Path) -> None:
    jpeg = SAMPLES / "TransferSyntaxes" / "1.2.840.10008.1.2.4.50.dcm"
    knee = SAMPLES / "Knee" / "T1" / "IM-0001-0001.dcm"
    size = jpeg.stat().st_size
    cuts = [_cut(tmp_path, jpeg, n) for n in (300, 1000, size // 2, size - 20)]
    cuts += [_cut(tmp_path, knee, n) for n in (400, 1000, knee.stat().st_size // 2)]
    out = tmp_path / "out"
    summary = batch.run([str(p) for p in cuts], batch.Job(parse_anonymize({}), str(out), b"k" * 32, 1), jobs=1)
    assert [o.status for o in summary.outcomes] == ["failed"] * len(cuts)
    assert all("truncated" in o.reason for o in summary.outcomes)
    assert not out.exists() or not any(out.rglob("*.dcm"))


def test_a_worker_that_dies_costs_one_file_not_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(str(p) for p in (SAMPLES / "Knee" / "T1").iterdir())[:8]
    real = batch.process_one

    def dies_on_the_fifth(path: str) -> batch.Outcome:
        if path == files[4]:
            faulthandler.disable()  # no traceback dump in the test output: the death is the point
            os.abort()  # what gdcm's RLE encoder does on some images (std::terminate)
        return real(path)

    monkeypatch.setattr(batch, "process_one", dies_on_the_fifth)
    for jobs in (1, 2):
        out = tmp_path / f"out{jobs}"
        summary = batch.run(files, batch.Job(parse_anonymize({}), str(out), b"k" * 32, 1), jobs=jobs)
        # a file of the dead worker's batch that was already written is found again as a duplicate on retry
        assert summary.count("written") + summary.count("duplicate") == 7
        assert [(o.source, o.status) for o in summary.failed] == [(files[4], "failed")]
        assert "worker process died" in summary.failed[0].reason


def test_files_without_identifiers_are_refused_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    ds = base()
    del ds.SOPInstanceUID
    path = tmp_path / "no-sop.dcm"
    path.write_bytes(to_bytes(ds))
    out = tmp_path / "out"
    summary = batch.run([str(path)], batch.Job(parse_anonymize({}), str(out), b"k" * 32, 1))
    assert summary.failed[0].reason == "missing or empty SOPInstanceUID"
    ok = tmp_path / "ok.dcm"
    ok.write_bytes(to_bytes(base()))
    job = batch.Job(parse_anonymize({}), str(out), b"k" * 32, 1)
    batch._init(job)
    loaded = fileio.load(str(ok))
    batch.edit(loaded, job, KeyedUidMap(job.key))

    class Boom(Exception):
        pass

    def chunks():  # type: ignore[no-untyped-def]
        yield b"partial"
        raise Boom

    with pytest.raises(Boom):
        batch._publish(chunks(), batch.output_path(str(out), loaded), False)  # type: ignore[arg-type]
    assert [p.name for p in out.rglob("*") if p.is_file()] == []


def test_an_empty_frame_of_reference_and_a_missing_series_do_not_share_a_new_uid() -> None:
    ds = base()
    ds.FrameOfReferenceUID = ""
    ds.SeriesInstanceUID = ""
    out = pydicom.dcmread(io.BytesIO(anonymize(to_bytes(copy.deepcopy(ds)))))
    assert out.FrameOfReferenceUID and out.SeriesInstanceUID
    assert out.FrameOfReferenceUID != out.SeriesInstanceUID
