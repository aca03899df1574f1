"""The modification/anonymization engine against the numbered edge cases of orthanc-semantics.md §8.

One test per case, named after it. Only the engine part of a case is tested here (parse a body, ``apply()`` it
to pydicom datasets, ``transcode()``): an HTTP 400 becomes "raises RequestError (or a subclass)", a job on a
study becomes "apply() to each instance with ONE shared UID map", a separate request gets its own map.
Where deviations.md makes dicom-node differ from Orthanc (cases 61, 62, 63, 64, 67; §2.7 Keep of a private tag
and references to kept UIDs; §3.2 multi-valued UI), the test asserts OUR behaviour and its docstring says
"inverted: deviations.md".

Datasets are built in memory, then encoded and parsed again with ``node.dicom.fileio.load`` so that the engine
sees what it sees in production (raw, lazily decoded elements). Real samples are read in place from
``../shared/samples`` (never copied).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CT_IMAGE_STORAGE, add_pixels, make_dataset
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from node.dicom import fileio
from node.dicom.apply import apply
from node.dicom.errors import (
    BadFileFormat,
    BadParameterType,
    NotSupported,
    ParameterOutOfRange,
    RequestError,
    UnknownTag,
)
from node.dicom.levels import Level
from node.dicom.request import PRODUCT, Modification, parse_anonymize, parse_modify
from node.dicom.transcode import supported_targets, transcode
from node.dicom.uidmap import KeyedUidMap, MemoryUidMap, UidMap

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PROFILE_2023B = f"{PRODUCT} - PS 3.15-2023b Table E.1-1 Basic Profile"

# Private tags of the ELSCINT1 block in group 00e1 (the tag Orthanc's test_anonymize_instance uses).
ELSCINT_CREATOR = 0x00E10010
ELSCINT_TAG = 0x00E110C2
ELSCINT_OTHER = 0x00E11001
ELSCINT_VALUE = "1.3.12.2.1107.5.99.1"

IDENTIFIER_KEYWORDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


# ---------------------------------------------------------------------------------------------- helpers


def item(**tags: Any) -> Dataset:
    """A sequence item from keyword=value pairs (a list of Datasets becomes a sequence)."""
    ds = Dataset()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def evidence_item(study: str, series: str, sop: str, sop_class: str = CT_IMAGE_STORAGE) -> Dataset:
    """One study > series > SOP reference item, as in ReferencedImageEvidenceSequence and the like."""
    sop_ref = item(ReferencedSOPClassUID=sop_class, ReferencedSOPInstanceUID=sop)
    return item(StudyInstanceUID=study, ReferencedSeriesSequence=[item(SeriesInstanceUID=series,
                                                                       ReferencedSOPSequence=[sop_ref])])  # fmt: skip


def build(*, patient_id: str | None = "PAT1", study: str | None = None, series: str | None = None,
          sop: str | None = None, sop_class: str = CT_IMAGE_STORAGE, pixels: bool = False,
          **tags: Any) -> Dataset:  # fmt: skip
    """A small synthetic instance, not yet encoded (add odd elements to it, then :func:`reload` it)."""
    tags.setdefault("PatientName", "Doe^John")
    ds = make_dataset(patient_id=patient_id, study_uid=study, series_uid=series, sop_uid=sop, sop_class=sop_class,
                      **tags)  # fmt: skip
    if pixels:
        add_pixels(ds, gradient().tobytes(), 64)
    return ds


def gradient() -> np.ndarray:
    """A smooth 64x64 16-bit image: easy for lossy encoders, exact for lossless ones (OpenJPEG's default 6
    resolution levels need at least 32 pixels a side)."""
    y, x = np.mgrid[0:64, 0:64]
    return ((x + y) * 100).astype(np.uint16)


def reload(ds: Dataset) -> Dataset:
    """Encode ``ds`` as a Part-10 file and parse it the way the engine gets real input."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return fileio.load(buf.getvalue()).ds


def make(**kwargs: Any) -> Dataset:
    """:func:`build` then :func:`reload`."""
    return reload(build(**kwargs))


def sample(relative: str) -> Dataset:
    """A real sample file, read in place."""
    return fileio.load(SAMPLES / relative).ds


def anonymize(datasets: Iterable[Dataset], body: Any = None, *, counter: int = 1,
              uid_map: UidMap | None = None) -> UidMap:  # fmt: skip
    """One anonymization request/job: one parsed body and ONE UID map for every instance."""
    mod = parse_anonymize({} if body is None else body)
    return run(mod, datasets, counter=counter, uid_map=uid_map)


def modify(datasets: Iterable[Dataset], body: Any, level: Level | None) -> UidMap:
    """One modification request/job (``level=None``: auto-detected as for ``/instances/{id}/modify``)."""
    return run(parse_modify(body, level=level), datasets)


def run(mod: Modification, datasets: Iterable[Dataset], *, counter: int = 1, uid_map: UidMap | None = None) -> UidMap:
    uid_map = MemoryUidMap() if uid_map is None else uid_map
    for ds in datasets:
        apply(ds, mod, uid_map, patient_name_counter=counter)
    return uid_map


def text(ds: Dataset, tag: int | str) -> str:
    """The value of an element as one string (multi-values joined by a backslash)."""
    value = ds[tag].value
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii").rstrip("\0 ")
    return str(value)


@dataclass(frozen=True)
class Ids:
    patient: str | None
    study: str
    series: str
    sop: str


def ids(ds: Dataset) -> Ids:
    return Ids(str(ds.PatientID) if "PatientID" in ds else None, str(ds.StudyInstanceUID),
               str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))  # fmt: skip


def private_tags(ds: Dataset) -> list[int]:
    """Every private element, at any depth."""
    found: list[int] = []
    for tag in ds.keys():
        if Tag(tag).is_private:
            found.append(int(tag))
        elif ds[tag].VR == "SQ":
            for sub in ds[tag].value:
                found += private_tags(sub)
    return found


def as_json(ds: Dataset, keyword: str) -> list[dict[str, Any]]:
    """A sequence as DICOM JSON, to compare "untouched" subtrees."""
    return [sub.to_json_dict() for sub in ds[keyword].value]


def with_elscint_private(ds: Dataset) -> Dataset:
    ds.add_new(ELSCINT_CREATOR, "LO", "ELSCINT1")
    ds.add_new(ELSCINT_OTHER, "LO", "private secret")
    ds.add_new(ELSCINT_TAG, "UI", ELSCINT_VALUE)
    return ds


def ct_and_rtstruct() -> tuple[Dataset, Dataset]:
    """A CT image and an RTSTRUCT drawn on it (same study), with the references Orthanc's test _5 checks."""
    study, for_uid = generate_uid(), generate_uid()
    ct = build(study=study, FrameOfReferenceUID=for_uid)
    contour_image = [item(ReferencedSOPClassUID=CT_IMAGE_STORAGE, ReferencedSOPInstanceUID=ct.SOPInstanceUID)]
    rt = build(study=study, sop_class=RT_STRUCTURE_SET_STORAGE, Modality="RTSTRUCT", StructureSetLabel="CONTOURS")
    rt.ReferencedFrameOfReferenceSequence = [item(
        FrameOfReferenceUID=for_uid,
        RTReferencedStudySequence=[item(
            ReferencedSOPClassUID=DETACHED_STUDY_MANAGEMENT, ReferencedSOPInstanceUID=study,
            RTReferencedSeriesSequence=[item(SeriesInstanceUID=ct.SeriesInstanceUID,
                                             ContourImageSequence=contour_image)],
        )],
    )]  # fmt: skip
    rt.StructureSetROISequence = [item(ROINumber=1, ReferencedFrameOfReferenceUID=for_uid, ROIName="Tumour")]
    rt.ROIContourSequence = [item(ReferencedROINumber=1, ContourSequence=[
        item(ContourImageSequence=contour_image, ContourGeometricType="POINT", NumberOfContourPoints=1,
             ContourData=[1.0, 2.0, 3.0]),
        item(ContourImageSequence=contour_image, ContourGeometricType="POINT", NumberOfContourPoints=1,
             ContourData=[4.0, 5.0, 6.0]),
    ])]  # fmt: skip
    return reload(ct), reload(rt)


def rt_study_reference(rt: Dataset) -> str:
    ref = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    return str(ref.ReferencedSOPInstanceUID)


def rt_contour_references(rt: Dataset) -> list[str]:
    series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    refs = [str(series.ContourImageSequence[0].ReferencedSOPInstanceUID)]
    refs += [str(c.ContourImageSequence[0].ReferencedSOPInstanceUID) for c in rt.ROIContourSequence[0].ContourSequence]
    return refs


# ---------------------------------------------------------------------------------------------- 1-16


def test_case_01_study_anonymization_defaults() -> None:
    """Case 1: ``/studies/{id}/anonymize {}``: new PatientID (36-char UUID), ``Anonymized<N>``, 0012,0062 YES,
    0012,0063 the 2023b profile string (with our product name instead of "Orthanc <v>"), SOPClassUID kept;
    every instance of the study lands in one new study and series."""
    study, series = generate_uid(), generate_uid()
    instances = [make(study=study, series=series) for _ in range(2)]
    old_sops = [ds.SOPInstanceUID for ds in instances]
    anonymize(instances, {}, counter=7)
    for ds, old_sop in zip(instances, old_sops, strict=True):
        assert UUID4.fullmatch(ds.PatientID), ds.PatientID
        assert str(ds.PatientName) == "Anonymized7"
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethod == PROFILE_2023B
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.SOPInstanceUID != old_sop
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    a, b = instances
    assert a.PatientID == b.PatientID
    assert a.StudyInstanceUID == b.StudyInstanceUID != study
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != series
    assert a.SOPInstanceUID != b.SOPInstanceUID


def test_case_02_dicom_version_2008_keeps_dates() -> None:
    """Case 2: ``DicomVersion: "2008"`` keeps StudyDate and writes the 2008 DeidentificationMethod; the default
    (2023b) clears StudyDate."""
    old = make(StudyDate="20200101")
    anonymize([old], {"DicomVersion": "2008"})
    assert old.StudyDate == "20200101"
    assert old.DeidentificationMethod == f"{PRODUCT} - PS 3.15-2008 Table E.1-1"
    new = make(StudyDate="20200101")
    anonymize([new], {})
    assert new.StudyDate == ""


def test_case_03_unknown_dicom_version_is_refused() -> None:
    """Case 3: ``DicomVersion: "nope"`` → 400 (ParameterOutOfRange) before anything is touched; a non-string
    version is refused too."""
    with pytest.raises(ParameterOutOfRange, match="nope"):
        parse_anonymize({"DicomVersion": "nope"})
    with pytest.raises(RequestError):
        parse_anonymize({"DicomVersion": 2023})


def test_case_04_device_description_and_structure_set_label_per_version() -> None:
    """Case 4: DeviceDescription 0050,0020 kept in 2017c and removed in 2021b; StructureSetLabel 3006,0002 kept
    in 2017c and emptied in 2021b."""
    old, new = (make(DeviceDescription="HELLO^C", StructureSetLabel="LABEL") for _ in range(2))
    anonymize([old], {"DicomVersion": "2017c"})
    anonymize([new], {"DicomVersion": "2021b"})
    assert old.DeviceDescription == "HELLO^C"
    assert old.StructureSetLabel == "LABEL"
    assert "DeviceDescription" not in new
    assert new.StructureSetLabel == ""


def test_case_05_customised_anonymization_deidentification_method() -> None:
    """Case 5: a customised anonymization (``Replace StationName``) does not write the profile string into
    DeidentificationMethod; like Orthanc ≥ 1.12.7 ([newer]) it writes the bare product name."""
    ds = make(StationName="CT01")
    anonymize([ds], {"Replace": {"StationName": "tutu"}})
    assert ds.StationName == "tutu"
    assert ds.DeidentificationMethod == PRODUCT
    assert ds.PatientIdentityRemoved == "YES"


def test_case_06_private_tags_removed_by_default() -> None:
    """Case 6: ``/instances/{id}/anonymize {}`` on a file with private tags: 00e1,10c2 gone (and every other
    private element, creators included), PatientName changed."""
    ds = reload(with_elscint_private(build(PatientName="Doe^John")))
    anonymize([ds], {}, counter=1)
    assert ELSCINT_TAG not in ds
    assert private_tags(ds) == []
    assert str(ds.PatientName) == "Anonymized1"


def test_case_07_keep_private_tag() -> None:
    """Case 7: ``{"Keep":["00e1-10c2"]}``: that private tag keeps its value, PatientName is still anonymized,
    the other private elements go. Inverted: deviations.md (§2.7): its private creator 00e1,0010 is kept too
    (Orthanc drops it)."""
    ds = reload(with_elscint_private(build()))
    anonymize([ds], {"Keep": ["00e1-10c2"]}, counter=2)
    assert text(ds, ELSCINT_TAG) == ELSCINT_VALUE
    assert text(ds, ELSCINT_CREATOR) == "ELSCINT1"
    assert ELSCINT_OTHER not in ds
    assert str(ds.PatientName) == "Anonymized2"


def test_case_08_keep_private_tag_and_patient_name() -> None:
    """Case 8: ``{"Keep":["00e1,10c2","PatientName"]}`` (comma form): both unchanged."""
    ds = reload(with_elscint_private(build(PatientName="Doe^John")))
    anonymize([ds], {"Keep": ["00e1,10c2", "PatientName"]})
    assert text(ds, ELSCINT_TAG) == ELSCINT_VALUE
    assert str(ds.PatientName) == "Doe^John"


def test_case_09_replace_private_tag_after_private_removal() -> None:
    """Case 9: ``{"Keep":["PatientName"],"Replace":{"00e1,10c2":"Hello"}}``: the private tag is written although
    private tags are removed (Replace runs after the removal); it survives encoding."""
    ds = reload(with_elscint_private(build(PatientName="Doe^John")))
    anonymize([ds], {"Keep": ["PatientName"], "Replace": {"00e1,10c2": "Hello"}})
    assert text(ds, ELSCINT_TAG) == "Hello"
    assert ELSCINT_OTHER not in ds
    assert str(ds.PatientName) == "Doe^John"
    assert text(reload(ds), ELSCINT_TAG) == "Hello"


def test_case_10_replace_ids_keep_descriptions_and_private_tags() -> None:
    """Case 10: Replace PatientName/PatientID (``0010-0020`` form, Force), Keep Study/SeriesDescription,
    ``KeepPrivateTags``: all honoured, while InstitutionName (profile ``X``) is still removed."""
    ds = reload(with_elscint_private(build(StudyDescription="Knee", SeriesDescription="T1",
                                           InstitutionName="Hospital")))  # fmt: skip
    anonymize([ds], {"Replace": {"PatientName": "hello", "0010-0020": "world"},
                     "Keep": ["StudyDescription", "SeriesDescription"], "KeepPrivateTags": True,
                     "Force": True})  # fmt: skip
    assert str(ds.PatientName) == "hello"
    assert ds.PatientID == "world"
    assert ds.StudyDescription == "Knee"
    assert ds.SeriesDescription == "T1"
    assert text(ds, ELSCINT_TAG) == ELSCINT_VALUE
    assert text(ds, ELSCINT_OTHER) == "private secret"
    assert "InstitutionName" not in ds


def test_case_11_replace_patient_id_needs_force() -> None:
    """Case 11: anonymization with a Replace of PatientID and no Force → 400 naming the tag and Force."""
    for key in ("PatientID", "0010-0020"):
        with pytest.raises(RequestError, match=r'"PatientID".*"Force"'):
            parse_anonymize({"Replace": {key: "world"}})


def test_case_12_study_modify_of_a_uid_needs_force() -> None:
    """Case 12: ``/studies/{id}/modify`` replacing StudyInstanceUID (also Series/SOP) without Force → 400; with
    Force the value is written and the result is a distinct instance (new SOPInstanceUID)."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        with pytest.raises(RequestError, match=f'"{keyword}"'):
            parse_modify({"Replace": {keyword: "world"}}, level=Level.STUDY)
    ds = make()
    old = ids(ds)
    modify([ds], {"Replace": {"StudyInstanceUID": "world"}, "Force": True}, Level.STUDY)
    assert ds.StudyInstanceUID == "world"
    assert ds.SOPInstanceUID != old.sop
    ds = make()
    old = ids(ds)
    modify([ds], {"Replace": {"SeriesInstanceUID": "world"}, "Force": True}, Level.STUDY)
    assert ds.SeriesInstanceUID == "world"
    assert ds.StudyInstanceUID != old.study
    ds = make()
    modify([ds], {"Replace": {"SOPInstanceUID": "world"}, "Force": True}, Level.STUDY)
    assert ds.SOPInstanceUID == "world"
    assert ds.file_meta.MediaStorageSOPInstanceUID == "world"


def test_case_13_keep_study_uid_in_anonymization_needs_force() -> None:
    """Case 13: ``/studies/{id}/anonymize {"Keep":["StudyInstanceUID"]}`` → 400; with Force the top-level
    StudyInstanceUID is kept while series and SOP UIDs are new."""
    with pytest.raises(RequestError, match=r'"StudyInstanceUID".*kept.*"Force"'):
        parse_anonymize({"Keep": ["StudyInstanceUID"]})
    ds = make()
    old = ids(ds)
    anonymize([ds], {"Keep": ["StudyInstanceUID"], "Force": True})
    assert ds.StudyInstanceUID == old.study
    assert ds.SeriesInstanceUID != old.series
    assert ds.SOPInstanceUID != old.sop


def test_case_14_removing_a_main_identifier_is_forbidden_even_with_force() -> None:
    """Case 14: ``{"Remove":["PatientID"],"Force":true}`` (and the three UIDs) → 400 "forbidden to remove one of
    the main Dicom identifiers", on every route."""
    for keyword in IDENTIFIER_KEYWORDS:
        body = {"Remove": [keyword], "Force": True}
        with pytest.raises(RequestError, match="forbidden to remove one of the main Dicom identifiers"):
            parse_anonymize(body)
        for level in (None, *Level):
            with pytest.raises(RequestError, match="forbidden to remove one of the main Dicom identifiers"):
                parse_modify(body, level=level)


def test_case_15_instance_modify_replace_remove_and_remove_private_tags() -> None:
    """Case 15: ``/instances/{id}/modify {"Replace":{"PatientName":"hello"},"Remove":["StationName"],
    "RemovePrivateTags":true}`` on PrivateTags.dcm: PatientName hello, no StationName, no private 6003,1010."""
    ds = sample("PrivateTags.dcm")
    assert 0x60031010 in ds and "StationName" in ds  # the sample has what the case needs
    modify([ds], {"Replace": {"PatientName": "hello"}, "Remove": ["StationName"], "RemovePrivateTags": True}, None)
    assert str(ds.PatientName) == "hello"
    assert "StationName" not in ds
    assert 0x60031010 not in ds
    assert 0x60030010 not in ds
    assert private_tags(ds) == []


def test_case_16_replace_inserts_missing_tags() -> None:
    """Case 16: ``/instances/{id}/modify {"Replace":{"StudyDescription":"hello","Modality":"world"}}`` on a file
    without StudyDescription: inserted."""
    ds = make()
    assert "StudyDescription" not in ds
    modify([ds], {"Replace": {"StudyDescription": "hello", "Modality": "world"}}, None)
    assert ds.StudyDescription == "hello"
    assert ds.Modality == "world"


# ---------------------------------------------------------------------------------------------- 17-34


def test_case_17_series_modify_stays_in_the_original_study() -> None:
    """Case 17: ``/series/{id}/modify {"Replace":{"SeriesDate":"19990101"}}``: new series (one for the whole
    series), new SOP UIDs, the original StudyInstanceUID (same parent study)."""
    study, series = generate_uid(), generate_uid()
    instances = [make(study=study, series=series, SeriesDate="20200101") for _ in range(2)]
    old_sops = {ds.SOPInstanceUID for ds in instances}
    modify(instances, {"Replace": {"SeriesDate": "19990101"}}, Level.SERIES)
    a, b = instances
    assert a.SeriesDate == b.SeriesDate == "19990101"
    assert a.StudyInstanceUID == b.StudyInstanceUID == study
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != series
    assert {a.SOPInstanceUID, b.SOPInstanceUID}.isdisjoint(old_sops)
    assert a.SOPInstanceUID != b.SOPInstanceUID


def test_case_18_series_modify_gives_one_new_series() -> None:
    """Case 18: ``/series/{id}/modify {"Replace":{"PatientName":"Jodogne"}}``: one new series for every instance,
    each instance a new one (ModifiedFrom is storage-level: not tested here)."""
    study, series = generate_uid(), generate_uid()
    instances = [make(study=study, series=series) for _ in range(3)]
    old_sops = [ds.SOPInstanceUID for ds in instances]
    modify(instances, {"Replace": {"PatientName": "Jodogne"}}, Level.SERIES)
    assert {str(ds.PatientName) for ds in instances} == {"Jodogne"}
    assert len({ds.SeriesInstanceUID for ds in instances}) == 1
    assert instances[0].SeriesInstanceUID != series
    new_sops = [ds.SOPInstanceUID for ds in instances]
    assert len(set(new_sops)) == 3
    assert set(new_sops).isdisjoint(old_sops)


def test_case_19_study_modify_keeps_two_series_apart() -> None:
    """Case 19: ``/studies/{id}/modify`` on 8 instances of 2 series (Knee T1 and T2): one new study with 2 new
    series, each new series made of exactly the instances of one original series."""
    files = sorted((SAMPLES / "Knee" / "T1").glob("*.dcm"))[:4] + sorted((SAMPLES / "Knee" / "T2").glob("*.dcm"))[:4]
    instances = [fileio.load(f).ds for f in files]
    before = [ids(ds) for ds in instances]
    assert len({b.study for b in before}) == 1 and len({b.series for b in before}) == 2
    modify(instances, {}, Level.STUDY)
    after = [ids(ds) for ds in instances]
    assert len({a.study for a in after}) == 1 and after[0].study != before[0].study
    pairs = {(b.series, a.series) for b, a in zip(before, after, strict=True)}  # (original, new) series
    assert len(pairs) == 2  # each original series went to exactly one new series
    assert len({new for _, new in pairs}) == 2
    assert {new for _, new in pairs}.isdisjoint(old for old, _ in pairs)
    assert len({a.sop for a in after}) == 8 and {a.sop for a in after}.isdisjoint({b.sop for b in before})
    assert {a.patient for a in after} == {"887"}


def test_case_20_study_modify_without_patient_id() -> None:
    """Case 20: ``/studies/{id}/modify {}`` on an instance without PatientID → accepted; PatientID stays absent
    (not invented), the study is a new one."""
    ds = make(patient_id=None)
    old = ids(ds)
    modify([ds], {}, Level.STUDY)
    assert "PatientID" not in ds
    assert ds.StudyInstanceUID != old.study


def test_case_21_study_modify_replace_station_name() -> None:
    """Case 21 (engine part; KeepSource is storage): ``/studies/{id}/modify {"Replace":{"StationName":"TEST"}}``
    gives the new study with StationName TEST."""
    ds = make(StationName="CT01")
    old = ids(ds)
    modify([ds], {"Replace": {"StationName": "TEST"}}, Level.STUDY)
    assert ds.StationName == "TEST"
    assert ds.StudyInstanceUID != old.study


def test_case_23_bulk_modify_without_level_stays_in_the_same_study() -> None:
    """Case 23: ``/tools/bulk-modify {"Replace":{}}`` without Level → Instance level: same study and series, only
    the SOPInstanceUID is new."""
    mod = parse_modify({"Replace": {}}, level=None)
    assert mod.level is Level.INSTANCE
    ds = make()
    old = ids(ds)
    run(mod, [ds])
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (old.study, old.series)
    assert ds.SOPInstanceUID != old.sop


def test_case_24_bulk_modify_at_study_level_gives_a_new_study() -> None:
    """Case 24: ``/tools/bulk-modify {"Level":"Study","Replace":{}}`` → a new study (and series), the source stays
    distinct."""
    ds = make()
    old = ids(ds)
    modify([ds], {"Replace": {}}, Level.STUDY)
    assert ds.StudyInstanceUID != old.study
    assert ds.SeriesInstanceUID != old.series
    assert ds.PatientID == old.patient


def test_case_25_bulk_modify_of_one_instance_keeps_its_parents() -> None:
    """Case 25: ``/tools/bulk-modify {"Resources":[instance]}``: a new instance in the same series, study and
    patient."""
    ds = make()
    old = ids(ds)
    modify([ds], {}, None)
    assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (old.patient, old.study, old.series)
    assert ds.SOPInstanceUID != old.sop


def test_case_26_bulk_anonymize_of_unrelated_resources() -> None:
    """Case 26: ``/tools/bulk-anonymize`` of two unrelated instances (one job, one map): two new patients,
    studies, series and instances."""
    knee, brainix = make(patient_id="887"), make(patient_id="5Yp0E")
    anonymize([knee, brainix], {})
    a, b = ids(knee), ids(brainix)
    assert a.patient != b.patient
    assert UUID4.fullmatch(a.patient or "") and UUID4.fullmatch(b.patient or "")
    assert a.study != b.study and a.series != b.series and a.sop != b.sop


def test_case_27_changing_the_uid_of_the_url_level_needs_force() -> None:
    """Case 27: without Force, StudyInstanceUID at study level, SeriesInstanceUID at series level and
    SOPInstanceUID at instance level are all refused (400)."""
    for keyword, level in (("StudyInstanceUID", Level.STUDY), ("SeriesInstanceUID", Level.SERIES),
                           ("SOPInstanceUID", Level.INSTANCE)):  # fmt: skip
        with pytest.raises(RequestError, match=f'"{keyword}".*replaced.*"Force"'):
            parse_modify({"Replace": {keyword: "1.2"}, "Force": False}, level=level)


def test_case_28_force_allows_changing_a_higher_level_identifier() -> None:
    """Case 28 (≥ 1.11.3): with Force, PatientID at study level, StudyInstanceUID at series level and
    SeriesInstanceUID at instance level are accepted and applied."""
    ds = make()
    old = ids(ds)
    modify([ds], {"Replace": {"PatientID": "NEW"}, "Force": True}, Level.STUDY)
    assert ds.PatientID == "NEW"
    assert ds.StudyInstanceUID != old.study
    ds = make()
    old = ids(ds)
    modify([ds], {"Replace": {"StudyInstanceUID": "1.2.3"}, "Force": True}, Level.SERIES)
    assert ds.StudyInstanceUID == "1.2.3"
    assert ds.SeriesInstanceUID != old.series
    ds = make()
    old = ids(ds)
    modify([ds], {"Replace": {"SeriesInstanceUID": "1.2.4"}, "Force": True}, Level.INSTANCE)
    assert ds.SeriesInstanceUID == "1.2.4"
    assert ds.StudyInstanceUID == old.study
    assert ds.SOPInstanceUID != old.sop


def test_case_29_study_modify_replacing_the_study_uid_by_itself() -> None:
    """Case 29: ``{"Replace":{"StudyInstanceUID":<same>,"StudyDescription":"TOTO"},"Force":true}`` at study level:
    the study keeps its UID (same Orthanc study ID), StudyDescription is updated."""
    ds = make(StudyDescription="Knee")
    old = ids(ds)
    modify([ds], {"Replace": {"StudyInstanceUID": old.study, "StudyDescription": "TOTO"}, "Force": True},
           Level.STUDY)  # fmt: skip
    assert ds.StudyInstanceUID == old.study
    assert ds.StudyDescription == "TOTO"


def test_case_34_patient_modify_keeping_study_and_series_uids() -> None:
    """Case 34: ``/patients/{id}/modify {"Replace":{"PatientName":"TOTO"},"Keep":["StudyInstanceUID",
    "SeriesInstanceUID"],"Force":true}`` on a patient with 2 studies: renamed, both studies keep their UIDs."""
    instances = [make(patient_id="P34"), make(patient_id="P34")]
    before = [ids(ds) for ds in instances]
    modify(instances, {"Replace": {"PatientName": "TOTO"}, "Keep": ["StudyInstanceUID", "SeriesInstanceUID"],
                       "Force": True}, Level.PATIENT)  # fmt: skip
    for ds, old in zip(instances, before, strict=True):
        assert str(ds.PatientName) == "TOTO"
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (old.study, old.series)
        assert ds.PatientID == "P34"
    assert instances[0].StudyInstanceUID != instances[1].StudyInstanceUID


# ---------------------------------------------------------------------------------------------- 35-48


def test_case_35_replace_attribute_tag_value() -> None:
    """Case 35: ``{"Replace":{"0020,9165":"0020,9056"}}`` stores an AT element with value (0020,9056)."""
    ds = make()
    modify([ds], {"Replace": {"0020,9165": "0020,9056"}}, Level.STUDY)
    assert ds[0x00209165].VR == "AT"
    assert ds[0x00209165].value == 0x00209056
    assert reload(ds)[0x00209165].value == 0x00209056


def test_case_36_replace_with_a_sequence_in_a_latin1_dataset() -> None:
    """Case 36: Replace ReferencedStudySequence with a JSON array of 2 items (one with a nested sequence) in a
    Latin-1 dataset → a sequence of 2 items, accented text intact after encoding."""
    ds = make(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jörg")
    body = {"Replace": {"ReferencedStudySequence": [
        {"ReferencedSOPClassUID": DETACHED_STUDY_MANAGEMENT, "ReferencedSOPInstanceUID": "1.2.3.4"},
        {"ReferencedSOPClassUID": DETACHED_STUDY_MANAGEMENT, "ReferencedSOPInstanceUID": "1.2.3.5",
         "PurposeOfReferenceCodeSequence": [{"CodeValue": "121311", "CodeMeaning": "Référence"}, []]},
    ]}}  # fmt: skip
    modify([ds], body, Level.STUDY)
    written = reload(ds)
    seq = written.ReferencedStudySequence
    assert len(seq) == 2
    assert [str(i.ReferencedSOPInstanceUID) for i in seq] == ["1.2.3.4", "1.2.3.5"]
    purpose = seq[1].PurposeOfReferenceCodeSequence
    assert len(purpose) == 2
    assert purpose[0].CodeMeaning == "Référence"
    assert len(purpose[1]) == 0
    assert str(written.PatientName) == "Müller^Jörg"


def test_case_37_private_tag_replace_keeps_its_vr() -> None:
    """Case 37: ``/series/{id}/modify {"Replace":{"4321,1012":"aaabbbccc"},"PrivateCreator":"RadioLogic"}``: the
    private element stays LO with the new value; an absent private tag gets the VR of the private dictionary
    for the given creator (not UN)."""
    ds = build()
    ds.add_new(0x43210010, "LO", "RadioLogic")
    ds.add_new(0x43211012, "LO", "old")
    ds = reload(ds)
    modify([ds], {"Replace": {"4321,1012": "aaabbbccc"}, "PrivateCreator": "RadioLogic"}, Level.SERIES)
    assert ds[0x43211012].VR == "LO"
    assert ds[0x43211012].value == "aaabbbccc"
    ds = make()
    modify([ds], {"Replace": {"0009,1024": "1.5"}, "PrivateCreator": "GEMS_ACQU_01"}, Level.SERIES)
    assert ds[0x00091024].VR == "DS"
    assert float(ds[0x00091024].value) == 1.5


def test_case_38_replace_paths_in_subsequences() -> None:
    """Case 38: path Replaces change only the addressed items: ``[1]`` one item, ``[*]`` inserts PatientName in
    all 3 items, a deep path changes item [2] of 0008,9092 only, DimensionOrganizationUID in item [0]."""
    ds = build()
    ds.DimensionIndexSequence = [item(DimensionDescriptionLabel=f"L{i}") for i in range(3)]
    refs = [generate_uid() for _ in range(3)]
    ds.ReferencedImageEvidenceSequence = [evidence_item(ds.StudyInstanceUID, ds.SeriesInstanceUID, ref) for ref in refs]
    ds.DimensionOrganizationSequence = [item(DimensionOrganizationUID="1.2.3.1")]
    ds = reload(ds)
    untouched = as_json(ds, "ReferencedImageEvidenceSequence")[1]
    modify([ds], {"Replace": {
        "DimensionIndexSequence[1].DimensionDescriptionLabel": "Hello",
        "DimensionIndexSequence[*].PatientName": "Hello^World",
        "ReferencedImageEvidenceSequence[2].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]"
        ".ReferencedSOPInstanceUID": "1.2.3.4",
        "DimensionOrganizationSequence[0].DimensionOrganizationUID": "1.2.3.5",
    }}, Level.STUDY)  # fmt: skip
    labels = [i.DimensionDescriptionLabel for i in ds.DimensionIndexSequence]
    assert labels == ["L0", "Hello", "L2"]
    assert [str(i.PatientName) for i in ds.DimensionIndexSequence] == ["Hello^World"] * 3
    evidence = [str(i.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                for i in ds.ReferencedImageEvidenceSequence]  # fmt: skip
    assert evidence == [refs[0], refs[1], "1.2.3.4"]
    assert as_json(ds, "ReferencedImageEvidenceSequence")[1] == untouched
    assert ds.DimensionOrganizationSequence[0].DimensionOrganizationUID == "1.2.3.5"


def test_case_39_remove_paths_in_subsequences() -> None:
    """Case 39: Remove of a top-level sequence, of ``[0].CodeValue``, of ``[*].[*].ReferencedSOPInstanceUID``, of
    ``[*].[1].ReferencedSOPClassUID`` and of an inexistent path: each removes exactly what it addresses."""
    ds = build()
    ds.ReferencedPerformedProcedureStepSequence = [item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.3",
                                                        ReferencedSOPInstanceUID=generate_uid())]  # fmt: skip
    ds.PerformedProtocolCodeSequence = [item(CodeValue="A", CodeMeaning="first"),
                                        item(CodeValue="B", CodeMeaning="second")]  # fmt: skip
    images = [item(ReferencedSOPClassUID=CT_IMAGE_STORAGE, ReferencedSOPInstanceUID=generate_uid()) for _ in range(3)]
    ds.SharedFunctionalGroupsSequence = [item(ReferencedImageSequence=images)]
    ds = reload(ds)
    modify([ds], {"Remove": [
        "ReferencedPerformedProcedureStepSequence",
        "PerformedProtocolCodeSequence[0].CodeValue",
        "SharedFunctionalGroupsSequence[*].ReferencedImageSequence[*].ReferencedSOPInstanceUID",
        "SharedFunctionalGroupsSequence[*].ReferencedImageSequence[1].ReferencedSOPClassUID",
        "SharedFunctionalGroupsSequence[2].ReferencedImageSequence",
    ]}, Level.STUDY)  # fmt: skip
    assert "ReferencedPerformedProcedureStepSequence" not in ds
    protocol = ds.PerformedProtocolCodeSequence
    assert "CodeValue" not in protocol[0] and protocol[0].CodeMeaning == "first"
    assert protocol[1].CodeValue == "B"
    images = ds.SharedFunctionalGroupsSequence[0].ReferencedImageSequence
    assert len(images) == 3
    assert ["ReferencedSOPInstanceUID" in i for i in images] == [False, False, False]
    assert ["ReferencedSOPClassUID" in i for i in images] == [True, False, True]


def test_case_40_anonymize_with_kept_subsequences_and_private_tags() -> None:
    """Case 40: anonymization 2021b with Keep of ReferencedImageEvidenceSequence, DimensionIndexSequence and
    ``PerFrameFunctionalGroupsSequence[*].2005,140f[*].SOPInstanceUID``, KeepPrivateTags: kept subtrees
    identical, 0020,9164 unchanged inside DimensionIndexSequence (remapped elsewhere), 0008,0014 inside the
    private 2005,140e remapped, X tags removed, Z tags emptied."""
    ds = build(SeriesDate="20200101", StudyDescription="Knee", PerformedProcedureStepStartDate="20200101",
               StudyDate="20200101", ContentDate="20200101", StudyTime="101010", ContentTime="101010")  # fmt: skip
    org_uid, creator_uid, frame_sop = generate_uid(), generate_uid(), generate_uid()
    ds.ReferencedImageEvidenceSequence = [evidence_item(ds.StudyInstanceUID, ds.SeriesInstanceUID, generate_uid())]
    ds.DimensionIndexSequence = [item(DimensionOrganizationUID=org_uid, DimensionDescriptionLabel=f"L{i}")
                                 for i in range(2)]  # fmt: skip
    ds.DimensionOrganizationSequence = [item(DimensionOrganizationUID=org_uid)]
    ds.add_new(0x20050014, "LO", "Philips MR Imaging DD 005")
    ds.add_new(0x2005140E, "SQ", [item(InstanceCreatorUID=creator_uid)])
    frames = []
    for _ in range(2):
        frame = Dataset()
        frame.add_new(0x20050014, "LO", "Philips MR Imaging DD 005")
        frame.add_new(0x2005140F, "SQ", [item(SOPInstanceUID=frame_sop, InstanceCreatorUID=creator_uid)])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds = reload(ds)
    evidence, dimension = as_json(ds, "ReferencedImageEvidenceSequence"), as_json(ds, "DimensionIndexSequence")
    anonymize([ds], {"DicomVersion": "2021b", "KeepPrivateTags": True, "Keep": [
        "ReferencedImageEvidenceSequence", "DimensionIndexSequence",
        "PerFrameFunctionalGroupsSequence[*].2005,140f[*].SOPInstanceUID"]})  # fmt: skip
    assert as_json(ds, "ReferencedImageEvidenceSequence") == evidence
    assert as_json(ds, "DimensionIndexSequence") == dimension
    assert [i.DimensionOrganizationUID for i in ds.DimensionIndexSequence] == [org_uid, org_uid]
    assert ds.DimensionOrganizationSequence[0].DimensionOrganizationUID != org_uid
    assert ds[0x2005140E].value[0].InstanceCreatorUID != creator_uid
    for frame in ds.PerFrameFunctionalGroupsSequence:
        private_item = frame[0x2005140F].value[0]
        assert private_item.SOPInstanceUID == frame_sop
        assert private_item.InstanceCreatorUID == ds[0x2005140E].value[0].InstanceCreatorUID
    for keyword in ("SeriesDate", "StudyDescription", "PerformedProcedureStepStartDate"):
        assert keyword not in ds, keyword
    assert [ds.StudyDate, ds.ContentDate, ds.StudyTime, ds.ContentTime] == ["", "", "", ""]


def test_case_41_anonymize_ct_and_rtstruct_keeps_references() -> None:
    """Case 41: study anonymization of a CT and its RTSTRUCT (one map): frame of reference equal in both (and in
    StructureSetROISequence), RTReferencedStudySequence's ReferencedSOPInstanceUID = the new StudyInstanceUID,
    every ContourImageSequence reference = the new CT SOPInstanceUID, contour count unchanged."""
    ct, rt = ct_and_rtstruct()
    old_ct = ids(ct)
    old_for = ct.FrameOfReferenceUID
    anonymize([ct, rt], {})
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert ct.FrameOfReferenceUID != old_for
    assert frame.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert rt.StructureSetROISequence[0].ReferencedFrameOfReferenceUID == ct.FrameOfReferenceUID
    assert ct.StudyInstanceUID == rt.StudyInstanceUID != old_ct.study
    assert rt_study_reference(rt) == ct.StudyInstanceUID
    assert rt_contour_references(rt) == [ct.SOPInstanceUID] * 3
    assert ct.SOPInstanceUID != old_ct.sop
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct.SeriesInstanceUID != old_ct.series
    assert series.ContourImageSequence[0].ReferencedSOPClassUID == CT_IMAGE_STORAGE
    assert len(rt.ROIContourSequence[0].ContourSequence) == 2


def test_case_42_anonymize_ct_and_rtstruct_with_forced_study_uid() -> None:
    """Case 42: same as 41 with ``{"Replace":{"StudyInstanceUID":"1.2.3.4"},"Force":true}``: both instances and
    the RT's nested study reference carry 1.2.3.4."""
    ct, rt = ct_and_rtstruct()
    anonymize([ct, rt], {"Replace": {"StudyInstanceUID": "1.2.3.4"}, "Force": True})
    assert ct.StudyInstanceUID == rt.StudyInstanceUID == "1.2.3.4"
    assert rt_study_reference(rt) == "1.2.3.4"
    assert rt_contour_references(rt) == [ct.SOPInstanceUID] * 3


def test_case_43_related_series_sequence_is_remapped() -> None:
    """Case 43: anonymization of Issue94.dcm: the StudyInstanceUID and SeriesInstanceUID nested in
    RelatedSeriesSequence (0008,1250) differ from the originals and come from the job's Study/Series maps."""
    ds = sample("Issue94.dcm")
    related = ds.RelatedSeriesSequence[0]
    old_study, old_series = related.StudyInstanceUID, related.SeriesInstanceUID
    uid_map = anonymize([ds], {})
    related = ds.RelatedSeriesSequence[0]
    assert related.StudyInstanceUID != old_study
    assert related.SeriesInstanceUID != old_series
    assert related.StudyInstanceUID == uid_map.map(Level.STUDY, old_study)
    assert related.SeriesInstanceUID == uid_map.map(Level.SERIES, old_series)


def test_case_44_keep_content_sequence_of_an_sr() -> None:
    """Case 44: anonymization of SR + MR with ``{"Keep":["ContentSequence"]}``: the SR's ContentSequence is
    identical; its evidence sequence points to the new MR study, series and SOP UIDs."""
    mr = make(sop_class=MR_IMAGE_STORAGE, Modality="MR")
    sr = build(study=mr.StudyInstanceUID, sop_class=BASIC_TEXT_SR_STORAGE, Modality="SR")
    sr.ContentSequence = [
        item(RelationshipType="CONTAINS", ValueType="TEXT", TextValue="John Doe, knee pain since 2019"),
        item(RelationshipType="CONTAINS", ValueType="IMAGE", ReferencedSOPSequence=[
            item(ReferencedSOPClassUID=MR_IMAGE_STORAGE, ReferencedSOPInstanceUID=mr.SOPInstanceUID)]),
    ]  # fmt: skip
    sr.CurrentRequestedProcedureEvidenceSequence = [
        evidence_item(mr.StudyInstanceUID, mr.SeriesInstanceUID, mr.SOPInstanceUID, MR_IMAGE_STORAGE)
    ]
    sr = reload(sr)
    content = as_json(sr, "ContentSequence")
    anonymize([mr, sr], {"Keep": ["ContentSequence"]})
    assert as_json(sr, "ContentSequence") == content
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == mr.StudyInstanceUID == sr.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == mr.SeriesInstanceUID
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == mr.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == MR_IMAGE_STORAGE


def test_case_45_nested_item_is_anonymized_recursively() -> None:
    """Case 45: an item of MappingResourceIdentificationSequence with private tags, a removed CS, a cleared OB,
    StudyDescription, StudyDate, a removed ReferencedStudySequence, CodeMeaning and EquivalentCodeSequence
    shrinks from 9 to 3 elements: StudyDate '', CodeMeaning and EquivalentCodeSequence unchanged."""
    mapping = Dataset()
    mapping.add_new(0x00091002, "LO", "private two")
    mapping.add_new(0x00160071, "CS", "N")  # GPSLatitudeRef: X
    mapping.add_new(0x00340005, "OB", b"\x01\x02")  # SourceIdentifier: Z, but binary ⇒ removed
    mapping.StudyDescription = "nested description"
    mapping.StudyDate = "20200101"
    mapping.add_new(0x00091001, "LO", "private one")
    mapping.ReferencedStudySequence = [item(ReferencedSOPClassUID=DETACHED_STUDY_MANAGEMENT,
                                            ReferencedSOPInstanceUID=generate_uid())]  # fmt: skip
    mapping.CodeMeaning = "Meaning"
    mapping.EquivalentCodeSequence = [item(CodeValue="121327", CodingSchemeDesignator="DCM", CodeMeaning="Full")]
    assert len(mapping) == 9
    ds = build()
    ds.MappingResourceIdentificationSequence = [mapping]
    ds = reload(ds)
    equivalent = as_json(ds.MappingResourceIdentificationSequence[0], "EquivalentCodeSequence")
    anonymize([ds], {})
    nested = ds.MappingResourceIdentificationSequence[0]
    assert sorted(nested.keys()) == [0x00080020, 0x00080104, 0x00080121]
    assert nested.StudyDate == ""
    assert nested.CodeMeaning == "Meaning"
    assert as_json(nested, "EquivalentCodeSequence") == equivalent


def test_case_46_modify_keeps_frame_of_reference_anonymize_changes_it() -> None:
    """Case 46: Issue94.dcm: ``/instances/{id}/modify {"Replace":{"PatientID":"toto"},"Force":true}`` keeps the
    FrameOfReferenceUID; ``/instances/{id}/anonymize`` changes it."""
    modified = sample("Issue94.dcm")
    original_for = modified.FrameOfReferenceUID
    modify([modified], {"Replace": {"PatientID": "toto"}, "Force": True}, None)
    assert modified.PatientID == "toto"
    assert modified.FrameOfReferenceUID == original_for
    anonymized = sample("Issue94.dcm")
    anonymize([anonymized], {})
    assert anonymized.FrameOfReferenceUID not in ("", original_for)


def test_case_47_transcode_to_jpeg_baseline_is_refused_clearly() -> None:
    """Case 47: ``/studies/{id}/modify {"Transcode":"1.2.840.10008.1.2.4.50"}``: the body parses, but pydicom
    cannot encode JPEG baseline: NotSupported names the target and lists the possible ones, and the dataset
    is left as it was."""
    mod = parse_modify({"Transcode": JPEGBaseline8Bit, "KeepSource": False}, level=Level.STUDY)
    assert mod.transcode == JPEGBaseline8Bit
    ds = make(pixels=True)
    run(mod, [ds])
    pixels = bytes(ds.PixelData)
    message = r"1\.2\.840\.10008\.1\.2\.4\.50.*possible targets: .*1\.2\.840\.10008\.1\.2\.5 "
    with pytest.raises(NotSupported, match=message):
        transcode(ds, mod.transcode)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert bytes(ds.PixelData) == pixels


@pytest.mark.parametrize(
    ("target", "lossy"),
    [(RLELossless, False), (JPEGLSLossless, False), (JPEGLSNearLossless, True), (JPEG2000Lossless, False),
     (JPEG2000, True)],
)  # fmt: skip
def test_case_48_instance_modify_transcode_keeping_the_sop_uid(target: str, lossy: bool) -> None:
    """Case 48: ``/instances/{id}/modify {"Transcode":<ts>,"Keep":["SOPInstanceUID"],"Force":true}``: the result
    has the requested syntax; a lossless transcoding keeps the SOPInstanceUID (both ways: compressing, and
    back to Explicit VR Little Endian) and the exact pixels. A lossy one is flagged (transcode() returns True,
    LossyImageCompression 01): giving it a new SOPInstanceUID, as Orthanc does for .81/.91, is the caller's
    decision, so the SOPInstanceUID is not asserted then."""
    assert target in supported_targets()
    mod = parse_modify({"Transcode": target, "Keep": ["SOPInstanceUID"], "Force": True}, level=None)
    assert mod.level is Level.INSTANCE
    ds = make(pixels=True)
    sop = ds.SOPInstanceUID
    run(mod, [ds])
    assert ds.SOPInstanceUID == sop
    assert transcode(ds, mod.transcode) is lossy
    assert ds.file_meta.TransferSyntaxUID == target
    written = reload(ds)
    assert written.file_meta.TransferSyntaxUID == target
    if lossy:
        assert written.LossyImageCompression == "01"
        assert written.pixel_array.shape == (64, 64)
        return
    assert "LossyImageCompression" not in written
    assert np.array_equal(written.pixel_array, gradient())
    assert written.SOPInstanceUID == sop
    assert transcode(written, ExplicitVRLittleEndian) is False
    assert written.SOPInstanceUID == sop
    assert np.array_equal(reload(written).pixel_array, gradient())


# ---------------------------------------------------------------------------------------------- 61-72


def test_case_61_nested_patient_name_takes_the_pseudonym() -> None:
    """Case 61, inverted: deviations.md. Orthanc leaves a nested PatientName untouched by REST anonymization;
    we give it the top-level pseudonym, or empty it when the top-level PatientName is removed."""

    def with_nested_names() -> Dataset:
        ds = build(PatientName="Doe^John")
        ds.DimensionIndexSequence = [item(PatientName="Doe^John", DimensionDescriptionLabel=f"L{i}") for i in range(3)]
        return reload(ds)

    ds = with_nested_names()
    anonymize([ds], {}, counter=3)
    assert str(ds.PatientName) == "Anonymized3"
    assert [str(i.PatientName) for i in ds.DimensionIndexSequence] == ["Anonymized3"] * 3
    ds = with_nested_names()
    anonymize([ds], {"Remove": ["PatientName"]})
    assert "PatientName" not in ds
    assert [str(i.PatientName) for i in ds.DimensionIndexSequence] == [""] * 3


def test_case_62_curves_and_overlays_removed_at_every_depth() -> None:
    """Case 62, inverted: deviations.md. Orthanc keeps top-level OverlayData 6000,3000 / CurveData 50xx (ranges
    act only inside sequences); we remove them at the top level too, and still inside items. Other 60xx
    elements (OverlayRows) are not in the ranges and stay."""
    ds = build()
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)
    ds.add_new(0x60004000, "LT", "burned-in name")
    ds.add_new(0x60000010, "US", 4)
    ds.add_new(0x50003000, "OB", b"\x01\x02")
    nested = item(ReferencedSOPClassUID=CT_IMAGE_STORAGE, ReferencedSOPInstanceUID=generate_uid())
    nested.add_new(0x60003000, "OW", b"\x00\x01" * 8)
    nested.add_new(0x50003000, "OB", b"\x01\x02")
    ds.ReferencedImageSequence = [nested]
    ds = reload(ds)
    anonymize([ds], {})
    for tag in (0x60003000, 0x60004000, 0x50003000):
        assert tag not in ds, hex(tag)
        assert tag not in ds.ReferencedImageSequence[0], hex(tag)
    assert ds[0x60000010].value == 4
    assert "ReferencedSOPInstanceUID" in ds.ReferencedImageSequence[0]


def test_case_63_modify_remove_private_tags_at_every_depth() -> None:
    """Case 63, inverted: deviations.md. Orthanc's /modify ``RemovePrivateTags`` removes top-level private
    elements only; we also remove private elements nested in public sequences. Public nested elements stay
    as they were (no UID remapping in /modify)."""
    ds = build()
    ds.add_new(0x00090010, "LO", "ACME 1")
    ds.add_new(0x00091001, "LO", "top secret")
    ref = generate_uid()
    nested = item(ReferencedSOPClassUID=CT_IMAGE_STORAGE, ReferencedSOPInstanceUID=ref)
    nested.add_new(0x00290010, "LO", "ACME 2")
    nested.add_new(0x00291010, "LO", "nested secret")
    ds.ReferencedImageSequence = [nested]
    ds = reload(ds)
    assert len(private_tags(ds)) == 4
    modify([ds], {"RemovePrivateTags": True}, None)
    assert private_tags(ds) == []
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ref
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == CT_IMAGE_STORAGE


def test_case_64_replace_does_not_shield_nested_copies_from_the_profile() -> None:
    """Case 64, inverted: deviations.md. Orthanc stops clearing nested StudyDate once the user replaces the
    top-level one; we replace the top level only and still clear the nested copy (profile ``Z``)."""
    ds = build(StudyDate="20200101")
    ds.RelatedSeriesSequence = [item(StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                                     StudyDate="20200101")]  # fmt: skip
    ds = reload(ds)
    anonymize([ds], {"Replace": {"StudyDate": "20000101"}})
    assert ds.StudyDate == "20000101"
    assert ds.RelatedSeriesSequence[0].StudyDate == ""


def test_case_65_empty_frame_of_reference_gets_one_new_uid() -> None:
    """Case 65: a study whose instances have an empty FrameOfReferenceUID: all get the same new non-empty UID
    (the map has a key for "")."""
    study = generate_uid()
    instances = [make(study=study, FrameOfReferenceUID="") for _ in range(2)]
    anonymize(instances, {})
    a, b = (ds.FrameOfReferenceUID for ds in instances)
    assert a == b
    assert len(a) > 10


def test_case_66_replace_value_types() -> None:
    """Case 66: ``{"Replace":{"InstanceNumber":5}}`` (JSON number) → BadParameterType; ``"5"`` works;
    ``{"Replace":{"Rows":"abc"}}`` (US) → out-of-range value (400)."""
    with pytest.raises(BadParameterType, match="InstanceNumber"):
        parse_modify({"Replace": {"InstanceNumber": 5}})
    ds = make(InstanceNumber=1)
    modify([ds], {"Replace": {"InstanceNumber": "5"}}, None)
    assert ds.InstanceNumber == 5
    assert text(reload(ds), "InstanceNumber") == "5"
    for bad in ("abc", "70000"):
        ds = make(pixels=True)
        with pytest.raises(ParameterOutOfRange, match="0028,0010"):
            modify([ds], {"Replace": {"Rows": bad}}, None)


def test_case_67_unknown_tag_name_is_a_400_naming_it() -> None:
    """Case 67, inverted: deviations.md. Orthanc answers an unknown tag name with HTTP 500; we raise UnknownTag,
    a RequestError (HTTP 400), whose message names the tag — in Replace, Remove and Keep."""
    bodies = [{"Replace": {"NotATag": "x"}}, {"Remove": ["NotATag"]}, {"Keep": ["NotATag"]},
              {"Replace": {"ReferencedStudySequence": [{"NotATag": "x"}]}}]  # fmt: skip
    for body in bodies:
        for parse in (parse_modify, parse_anonymize):
            with pytest.raises(UnknownTag, match="NotATag") as caught:
                parse(body)
            assert isinstance(caught.value, RequestError)


def test_case_68_malformed_paths_are_400() -> None:
    """Case 68: ``ReferencedImageSequence[-1].ReferencedSOPInstanceUID``, ``X[].Y``, ``X0].Y`` and
    ``(0010,0010)[.PatientID`` → 400 (ParameterOutOfRange) in Remove, Replace and Keep."""
    bad_paths = ["ReferencedImageSequence[-1].ReferencedSOPInstanceUID", "X[].Y", "X0].Y", "(0010,0010)[.PatientID"]
    for path in bad_paths:
        for body in ({"Remove": [path]}, {"Replace": {path: "x"}}, {"Keep": [path]}):
            with pytest.raises(ParameterOutOfRange):
                parse_modify(body)
            with pytest.raises(ParameterOutOfRange):
                parse_anonymize(body)


def test_case_69_series_level_modify_of_a_whole_study() -> None:
    """Case 69: ``/series/{studyId}/modify``: every instance of the study processed at Series level: same study,
    one new series per original series."""
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    instances = [make(study=study, series=s) for s in (s1, s1, s2, s2)]
    modify(instances, {"Replace": {"StationName": "X"}}, Level.SERIES)
    assert {ds.StudyInstanceUID for ds in instances} == {study}
    new = [ds.SeriesInstanceUID for ds in instances]
    assert new[0] == new[1] and new[2] == new[3] and new[0] != new[2]
    assert {new[0], new[2]}.isdisjoint({s1, s2})


def test_case_70_separate_requests_do_not_share_a_map() -> None:
    """Case 70: two ``/instances/{id}/anonymize`` calls on two instances of the same study (one map each, the
    global counter N then N+1): different new studies, different PatientIDs, Anonymized<N> and <N+1>."""
    study, series = generate_uid(), generate_uid()
    first, second = make(study=study, series=series), make(study=study, series=series)
    anonymize([first], {}, counter=41)
    anonymize([second], {}, counter=42)
    assert first.StudyInstanceUID != second.StudyInstanceUID
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    assert first.PatientID != second.PatientID
    assert (str(first.PatientName), str(second.PatientName)) == ("Anonymized41", "Anonymized42")


def test_case_71_bulk_anonymize_of_two_studies_of_one_patient() -> None:
    """Case 71: ``/tools/bulk-anonymize`` of two studies sharing a PatientID (one job, one map): one new
    PatientID for both, still two studies."""
    a, b = make(patient_id="SHARED"), make(patient_id="SHARED")
    anonymize([a, b], {})
    assert a.PatientID == b.PatientID != "SHARED"
    assert UUID4.fullmatch(a.PatientID)
    assert a.StudyInstanceUID != b.StudyInstanceUID


def test_case_72_instance_modify_level_is_auto_detected() -> None:
    """Case 72: ``/instances/{id}/modify {"Replace":{"PatientID":"X"},"Force":true}`` → level Patient: new
    StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID. (Study UID replaced ⇒ Study, Series ⇒ Series.)"""
    mod = parse_modify({"Replace": {"PatientID": "X"}, "Force": True}, level=None)
    assert mod.level is Level.PATIENT
    ds = make()
    old = ids(ds)
    run(mod, [ds])
    assert ds.PatientID == "X"
    assert ds.StudyInstanceUID != old.study
    assert ds.SeriesInstanceUID != old.series
    assert ds.SOPInstanceUID != old.sop
    assert parse_modify({"Replace": {"StudyInstanceUID": "1.2"}, "Force": True}).level is Level.STUDY
    assert parse_modify({"Replace": {"SeriesInstanceUID": "1.2"}, "Force": True}).level is Level.SERIES


# ---------------------------------------------------------------------------------------------- other deviations


def test_section_2_7_references_to_kept_uids_are_kept() -> None:
    """§2.7, inverted: deviations.md. Orthanc keeps a kept Study/Series/SOP UID at the top level only and
    remaps nested references to it; we keep the references too. UIDs that are not kept (FrameOfReferenceUID,
    a nested DimensionOrganizationUID) are still remapped."""
    study, series = generate_uid(), generate_uid()
    target = make(study=study, series=series)
    ref = build(study=study, series=series, FrameOfReferenceUID=generate_uid())
    ref.ReferencedImageSequence = [item(ReferencedSOPClassUID=CT_IMAGE_STORAGE,
                                        ReferencedSOPInstanceUID=target.SOPInstanceUID)]  # fmt: skip
    ref.RelatedSeriesSequence = [item(StudyInstanceUID=study, SeriesInstanceUID=series)]
    old_org = generate_uid()
    ref.DimensionOrganizationSequence = [item(DimensionOrganizationUID=old_org)]
    ref = reload(ref)
    old_for = ref.FrameOfReferenceUID
    uid_map = anonymize(
        [target, ref], {"Keep": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"], "Force": True}
    )
    assert ref.ReferencedImageSequence[0].ReferencedSOPInstanceUID == target.SOPInstanceUID
    assert ref.RelatedSeriesSequence[0].StudyInstanceUID == study == ref.StudyInstanceUID
    assert ref.RelatedSeriesSequence[0].SeriesInstanceUID == series == ref.SeriesInstanceUID
    assert ref.FrameOfReferenceUID != old_for
    new_org = ref.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert new_org == uid_map.map(Level.INSTANCE, old_org) != old_org


def test_section_3_2_multi_valued_ui_remapped_value_by_value() -> None:
    """§3.2, inverted: deviations.md. Orthanc remaps a multi-valued UI element as one string into a single UID;
    we remap each value on its own (VM preserved, consistent with single-valued occurrences)."""
    first, second = generate_uid(), generate_uid()
    multi = make(IrradiationEventUID=[first, second])
    single = make(IrradiationEventUID=second)
    uid_map = anonymize([multi, single], {})
    values = list(multi.IrradiationEventUID)
    assert values == [uid_map.map(Level.INSTANCE, first), uid_map.map(Level.INSTANCE, second)]
    assert len(set(values)) == 2 and {first, second}.isdisjoint(values)
    assert single.IrradiationEventUID == values[1]


def test_deviation_persistent_map_keeps_one_study_across_requests() -> None:
    """deviations.md (last row): with a persistent keyed map (routing rules, REST opt-in), instances anonymized
    one request at a time still land in one study and the same patient gets the same pseudonym; another key
    gives other values."""
    key = b"k" * 32
    study, series = generate_uid(), generate_uid()
    first, second, other = (make(study=study, series=series) for _ in range(3))
    anonymize([first], {}, uid_map=KeyedUidMap(key))
    anonymize([second], {}, uid_map=KeyedUidMap(key))
    anonymize([other], {}, uid_map=KeyedUidMap(b"o" * 32))
    assert (first.PatientID, first.StudyInstanceUID, first.SeriesInstanceUID) == (
        second.PatientID, second.StudyInstanceUID, second.SeriesInstanceUID)  # fmt: skip
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert other.StudyInstanceUID != first.StudyInstanceUID and other.PatientID != first.PatientID


def test_section_2_1_transcode_must_be_a_transfer_syntax() -> None:
    """§2.1 (the parse part of cases 47/48): ``Transcode`` that is not a transfer syntax UID → 400
    (BadFileFormat) naming the field."""
    for bad in ("nope", "1.2.3", 5):
        with pytest.raises(BadFileFormat, match='"Transcode"'):
            parse_modify({"Transcode": bad})
        with pytest.raises(BadFileFormat, match='"Transcode"'):
            parse_anonymize({"Transcode": bad})


def test_replace_value_the_character_set_cannot_encode_is_refused() -> None:
    """Orthanc writes replacement characters; we refuse, naming the tag and the character set (compatibility.md)."""
    ds = make()
    ds.SpecificCharacterSet = "ISO_IR 100"
    with pytest.raises(ParameterOutOfRange, match=r"0008,0080.*ISO_IR 100"):
        modify([ds], {"Replace": {"InstitutionName": "東京病院"}}, None)
    modify([ds], {"Replace": {"InstitutionName": "Hôpital Liège"}}, None)
    assert reload(ds).InstitutionName == "Hôpital Liège"


def test_section_2_5_image_data_uri_becomes_the_pixel_data() -> None:
    """Spec §2.5: ``data:image/png|jpeg;base64,…`` on PixelData embeds the picture and its image attributes;
    a compressed file becomes native (its pixels are new); something that is not an image is a 400."""
    import base64

    import numpy as np
    import pydicom
    from PIL import Image

    png = (SAMPLES / "Formats" / "Brainix.png").read_bytes()
    loaded = fileio.load(str(SAMPLES / "Knee" / "T1" / "IM-0001-0001.dcm"))  # JPEG 2000
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    apply(loaded.ds, parse_modify({"Replace": {"PixelData": uri}}), MemoryUidMap())
    out = pydicom.dcmread(io.BytesIO(b"".join(bytes(c) for c in fileio.encode(loaded))))
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    expected = np.asarray(Image.open(io.BytesIO(png)))
    assert (out.Rows, out.Columns, out.PhotometricInterpretation) == (256, 256, "MONOCHROME2")
    assert np.array_equal(out.pixel_array, expected)

    jpeg = io.BytesIO()
    Image.fromarray(np.full((8, 12, 3), (200, 10, 10), dtype=np.uint8)).save(jpeg, format="JPEG")
    ds = make()
    modify([ds], {"Replace": {"PixelData": "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()}},
           None)  # fmt: skip
    colour = reload(ds)
    assert (colour.Rows, colour.Columns, colour.SamplesPerPixel, colour.PhotometricInterpretation) == (8, 12, 3, "RGB")
    assert abs(int(colour.pixel_array[4, 6, 0]) - 200) < 8
    with pytest.raises(ParameterOutOfRange, match="not a readable image"):
        modify([make()], {"Replace": {"PixelData": "data:image/png;base64," + base64.b64encode(b"nope").decode()}},
               None)  # fmt: skip


def test_section_2_5_octet_stream_data_uri_gives_raw_bytes() -> None:
    """Spec §2.5: ``data:application/octet-stream;base64,…`` is decoded to the value, any VR; bad base64 → 400."""
    import base64

    ds = make()
    payload = bytes(range(256)) * 2
    modify([ds], {"Replace": {"0009,0010": "ACME", "0009,1001": "data:application/octet-stream;base64,"
                              + base64.b64encode(payload).decode()}}, None)  # fmt: skip
    assert reload(ds)[0x00091001].value == payload
    with pytest.raises(ParameterOutOfRange, match="base64"):
        modify([make()], {"Replace": {"0009,1001": "data:application/octet-stream;base64,@@@"}}, None)
