"""Properties of the engine that must hold for any body and any file (hypothesis).

* anonymizing twice with the same UID map gives the same output, byte for byte, whatever the options;
* the splice writer gives exactly the dataset pydicom's own writer gives (for anonymize and modify bodies);
* any body the parser accepts applies to every kind of file without an error (both tests run it).
"""

from __future__ import annotations

import copy
import io

import pydicom
from conftest import SAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.dicom import fileio
from node.dicom.apply import apply
from node.dicom.errors import RequestError
from node.dicom.request import parse_anonymize, parse_modify
from node.dicom.uidmap import KeyedUidMap, MemoryUidMap

FILES = [
    SAMPLES / "Knee" / "T1" / "IM-0001-0001.dcm",
    SAMPLES / "PrivateTags.dcm",
    SAMPLES / "DicomSeg.dcm",
    SAMPLES / "MarekLatin2.dcm",
    SAMPLES / "Encodings" / "Lena-shift-jis.dcm",
    SAMPLES / "Formats" / "Rle.dcm",
    SAMPLES / "TransferSyntaxes" / "1.2.840.10008.1.2.2.dcm",
    SAMPLES / "Implicit-vr-us-palette.dcm",
]
TAGS = ["StudyDescription", "SeriesDescription", "InstitutionName", "PatientBirthDate", "ContentSequence",
        "ReferencedImageSequence", "0008,0014", "StudyDate", "PatientName", "OtherPatientIDsSequence"]  # fmt: skip

bodies = st.fixed_dictionaries(
    {},
    optional={
        "DicomVersion": st.sampled_from(["2008", "2017c", "2021b", "2023b"]),
        "KeepPrivateTags": st.booleans(),
        "Keep": st.lists(st.sampled_from(TAGS), max_size=3, unique=True),
        "Remove": st.lists(st.sampled_from(TAGS), max_size=2, unique=True),
        "Replace": st.dictionaries(
            st.sampled_from(["InstitutionName", "StudyDescription", "PatientName"]),
            st.text(alphabet="ABCxyz 019^", max_size=12),
            max_size=2,
        ),
    },
)


def encoded(path, mod, uid_map) -> bytes:  # type: ignore[no-untyped-def]
    loaded = fileio.load(path)
    apply(loaded.ds, mod, uid_map, patient_name_counter=3)
    return b"".join(bytes(c) for c in fileio.encode(loaded))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, index=st.integers(0, len(FILES) - 1))
def test_anonymizing_twice_with_the_same_map_gives_the_same_bytes(body: dict, index: int) -> None:
    mod = parse_anonymize(body)
    for uid_map in (MemoryUidMap(), KeyedUidMap(b"p" * 32)):
        assert encoded(FILES[index], mod, uid_map) == encoded(FILES[index], mod, uid_map)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, index=st.integers(0, len(FILES) - 1), anonymize=st.booleans())
def test_the_splice_writer_writes_what_pydicom_writes(body: dict, index: int, anonymize: bool) -> None:
    try:
        mod = parse_anonymize(body) if anonymize else parse_modify({k: v for k, v in body.items()
                                                                    if k in ("Replace", "Remove", "Keep")})  # fmt: skip
    except RequestError:
        return  # e.g. Keep of a UID tag without Force: refused, nothing to write
    path = FILES[index]
    loaded = fileio.load(path)
    reference = pydicom.dcmread(path, force=True)
    apply(loaded.ds, mod, KeyedUidMap(b"s" * 32), patient_name_counter=1)
    apply(reference, mod, KeyedUidMap(b"s" * 32), patient_name_counter=1)
    reference.file_meta = fileio.new_file_meta(reference, loaded.transfer_syntax)
    ours = pydicom.dcmread(io.BytesIO(b"".join(bytes(c) for c in fileio.encode(loaded))))
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, copy.deepcopy(reference), enforce_file_format=True)
    theirs = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    for ds in (ours, theirs):
        for tag in [t for t in ds.keys() if t & 0xFFFF == 0]:
            del ds[tag]
    assert ours == theirs
    assert ours.file_meta.MediaStorageSOPInstanceUID == ours.SOPInstanceUID


def _bytes(loaded: fileio.Loaded) -> bytes:
    return b"".join(bytes(c) for c in fileio.encode(loaded))


def test_the_sequence_cache_changes_nothing_but_the_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A job-wide cache of visited sequences gives the bytes the engine gives without it, for every instance
    of a series (hits from the second instance on), and never hands one patient's pseudonym to another."""
    nested_name = tmp_path / "nested-name.dcm"
    ds = pydicom.dcmread(SAMPLES / "Knee" / "T1" / "IM-0001-0001.dcm")
    item = pydicom.Dataset()
    item.CodeValue, item.PatientName = "X1", "DOE^JOHN"
    ds.ProcedureCodeSequence = pydicom.Sequence([item])
    ds.save_as(nested_name)
    files = [*sorted((SAMPLES / "Knee" / "T1").iterdir())[:6], SAMPLES / "DicomSeg.dcm", nested_name]
    mod = parse_anonymize({"Keep": ["StudyDescription"]})
    cache: dict = {}
    for counter in (2, 2, 9):
        for path in files:
            with_cache = fileio.load(path)
            apply(with_cache.ds, mod, KeyedUidMap(b"c" * 32), patient_name_counter=counter, sequence_cache=cache)
            without = fileio.load(path)
            apply(without.ds, mod, KeyedUidMap(b"c" * 32), patient_name_counter=counter)
            assert _bytes(with_cache) == _bytes(without), (path, counter)
    assert len(cache) >= 3
    last = pydicom.dcmread(io.BytesIO(_bytes(with_cache)))
    assert last.ProcedureCodeSequence[0].PatientName == "Anonymized9"


def test_one_memory_map_shared_by_eight_threads_keeps_one_study() -> None:
    """Batch semantics (spec §3.2) when a job processes instances concurrently: one study, one patient, one
    new UID per original UID, references included."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted((SAMPLES / "Knee").rglob("*.dcm"))
    uid_map = MemoryUidMap()
    mod = parse_anonymize({})

    def one(path):  # type: ignore[no-untyped-def]
        loaded = fileio.load(path)
        apply(loaded.ds, mod, uid_map, patient_name_counter=4)
        return pydicom.dcmread(io.BytesIO(_bytes(loaded)))

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(one, files))
    assert len({d.StudyInstanceUID for d in out}) == 1 and len({d.PatientID for d in out}) == 1
    assert len({d.SeriesInstanceUID for d in out}) == 2 and len({d.SOPInstanceUID for d in out}) == len(files)
    refs = {item.ReferencedSOPInstanceUID for d in out for item in d.get("ReferencedImageSequence", [])}
    sources = [pydicom.dcmread(f) for f in files]
    old_refs = {i.ReferencedSOPInstanceUID for d in sources for i in d.get("ReferencedImageSequence", [])}
    assert len(refs) == len(old_refs) > 0 and not refs & old_refs  # each localizer reference: one new UID
