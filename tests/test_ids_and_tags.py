"""Pure DICOM logic: Orthanc identifiers and the index tags read from files."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SAMPLES, make_instance

from node.dicom.ids import orthanc_hash, resource_ids
from node.dicom.maintags import MalformedDataset, read_index_tags

KNEE_STUDY = "2.16.840.1.113669.632.20.121711.10000160881"
KNEE_SERIES = "1.3.46.670589.11.17521.5.0.3124.2008081908564160709"


def test_edge_case_54_orthanc_ids_of_the_knee_study() -> None:
    ids = resource_ids("887", KNEE_STUDY, KNEE_SERIES, "1.2.3")
    assert ids.patient == "ca29faea-b6a0e17f-067743a1-8b778011-a48b2a17"
    assert ids.study == "0a9b3153-2512774b-2d9580de-1fc3dcf6-3bd83918"
    assert ids.series == "6de73705-c4e65c1b-9d9ea1b5-cabcd8e7-f15e4285"


def test_hash_format_and_case_sensitivity() -> None:
    h = orthanc_hash("5Yp0E")
    assert len(h) == 44 and h.count("-") == 4 and h == h.lower()
    assert orthanc_hash("5Yp0E") != orthanc_hash("5YP0E")  # a case change in PatientID is a new patient


def test_same_study_uid_under_two_patients_is_two_studies() -> None:
    assert resource_ids("A", "1.2", "1.3", "1.4").study != resource_ids("B", "1.2", "1.3", "1.4").study


def test_index_tags_of_a_knee_file() -> None:
    tags = read_index_tags(str(SAMPLES / "Knee" / "T1" / "IM-0001-0001.dcm"))
    assert tags.patient_id == "887" and tags.patient["PatientName"] == "KNEE"
    assert tags.study_uid == KNEE_STUDY and tags.series_uid == KNEE_SERIES
    assert tags.transfer_syntax == "1.2.840.10008.1.2.4.91"
    assert tags.series["Modality"] == "MR"
    assert tags.series["ImageOrientationPatient"].count("\\") == 5  # multi-valued: joined by backslash


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Lena-utf8.dcm", "Test-éüäöòДΘĝדصķћ๛ﾈİ"),
        ("Lena-shift-jis.dcm", "Test-ДΘﾈ"),
        ("Lena-latin1.dcm", "Test-éüäöò"),
        ("Lena-cyrillic.dcm", "Test-Дћ"),
    ],
)
def test_patient_names_are_decoded_with_the_specific_character_set(name: str, expected: str) -> None:
    assert read_index_tags(str(SAMPLES / "Encodings" / name)).patient["PatientName"] == expected


def test_every_sample_is_indexable_or_refused_with_a_reason() -> None:
    for path in sorted(SAMPLES.rglob("*.dcm")):
        try:
            read_index_tags(str(path))
        except MalformedDataset as exc:
            # only the two bare datasets without a Part-10 header (they never arrive so over the network)
            assert "File Meta Information" in str(exc), path


def test_missing_and_empty_identifiers_are_malformed(tmp_path: Path) -> None:
    p = make_instance(tmp_path / "a.dcm")
    import pydicom

    ds = pydicom.dcmread(p)
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "b.dcm")
    with pytest.raises(MalformedDataset, match="missing SeriesInstanceUID"):
        read_index_tags(str(tmp_path / "b.dcm"))
    ds = pydicom.dcmread(p)
    ds.StudyInstanceUID = ""
    ds.save_as(tmp_path / "c.dcm")
    with pytest.raises(MalformedDataset, match="empty StudyInstanceUID"):
        read_index_tags(str(tmp_path / "c.dcm"))


def test_truncated_pixel_data_is_malformed(tmp_path: Path) -> None:
    for src in (SAMPLES / "Knee" / "T1" / "IM-0001-0001.dcm", make_instance(tmp_path / "s.dcm", rows=64)):
        data = src.read_bytes()
        cut = tmp_path / "cut.dcm"
        cut.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(MalformedDataset, match="truncated"):
            read_index_tags(str(cut))


def test_random_bytes_are_malformed(tmp_path: Path) -> None:
    p = tmp_path / "r.dcm"
    p.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(MalformedDataset):
        read_index_tags(str(p))
