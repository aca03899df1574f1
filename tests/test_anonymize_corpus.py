"""Anonymize every real sample file with each DicomVersion and check what a research gateway relies on.

* the output re-reads with pydicom (pixel data included) and ``dciodvfy`` finds no new error, except the
  ones the profile causes by design (an attribute it removes or empties that the IOD requires);
* no PHI survives: every value the profile removes, empties or remaps, at any depth, is searched in the
  output file's bytes;
* UID references stay consistent: across the whole run, one original UID becomes exactly one new UID, and two
  different originals never collapse into one.

Files are read in place from ``../shared/samples``; outputs go to a temporary folder.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pydicom
import pytest
from conftest import SAMPLES
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from node import batch
from node.dicom import fileio
from node.dicom.profiles import load_profile, versions
from node.dicom.request import parse_anonymize

VERSIONS = versions()
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
IDENTIFIERS = {0x00100010, 0x00100020, 0x0020000D, 0x0020000E, 0x00080018}
DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module", params=VERSIONS)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, batch.Summary]:
    version = request.param
    out = tmp_path_factory.mktemp(f"anon-{version}")
    inputs = [str(p) for p, _named in fileio.iter_files([SAMPLES])]
    job = batch.Job(mod=parse_anonymize({"DicomVersion": version}), out_dir=str(out), key=b"k" * 32,
                    name_counter=7)  # fmt: skip
    return version, batch.run(inputs, job, jobs=2)


def _phi_tag(tag: int, version: str) -> bool:
    p = load_profile(version)
    return (tag in p.removals or tag in p.clearings or tag in p.uids or tag in IDENTIFIERS
            or p.in_removed_range(tag) or bool((tag >> 16) & 1))  # fmt: skip


def _walk(ds: Dataset) -> Iterator[tuple[Dataset, int]]:
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)
        yield ds, tag


def _raw_values(ds: Dataset, tag: int) -> list[bytes]:
    """The value components of a text element exactly as encoded in the input (its character set)."""
    raw = ds.get_item(tag)
    if not isinstance(raw, RawDataElement) or raw.value is None:
        elem = ds[tag]
        if elem.VR not in TEXT_VRS or elem.value is None:
            return []
        value = elem.value
        texts = [str(v) for v in value] if isinstance(value, list | pydicom.multival.MultiValue) else [str(value)]
        return [t.encode("utf-8") for t in texts]
    return [v.strip(b" \0") for v in raw.value.split(b"\\")]


def _values(path: str, version: str) -> tuple[set[bytes], set[bytes]]:
    """(values of elements the profile touches, values of elements it keeps) in one input file."""
    ds = pydicom.dcmread(path, force=True)
    phi: set[bytes] = set()
    kept: set[bytes] = set()
    for parent, tag in _walk(ds):
        vr = parent[tag].VR
        if vr not in TEXT_VRS and not ((tag >> 16) & 1 and vr in ("UN", "OB")):
            continue
        values = _raw_values(parent, tag)
        (phi if _phi_tag(tag, version) else kept).update(values)
    return phi, kept


def test_every_sample_is_written_and_reads_back(run: tuple[str, batch.Summary]) -> None:
    _version, summary = run
    assert summary.failed == []
    written = [o for o in summary.outcomes if o.status == "written"]
    assert len(written) >= 150
    assert {o.status for o in summary.outcomes} <= {"written", "skipped"}
    for o in written:
        ds = pydicom.dcmread(o.output)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientName == "Anonymized7"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert "SourceApplicationEntityTitle" not in ds.file_meta  # the sender's meta is never carried over
        assert ds.file_meta.ImplementationClassUID == pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        if "PixelData" in ds:
            assert len(ds.PixelData) > 0


def _present(value: bytes, data: bytes) -> bool:
    """``value`` occurs in ``data`` as a whole token (not inside a longer number, UID or word)."""
    return re.search(rb"(?<![0-9A-Za-z.])" + re.escape(value) + rb"(?![0-9A-Za-z])", data) is not None


def _without_pixel_data(data: bytes) -> bytes:
    """The file's bytes minus the pixel values (text PHI is what we look for; pixels match digits by chance)."""
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=1024)
    raw = ds._dict.get(0x7FE00010)
    if raw is None or getattr(raw, "value_tell", None) is None:
        return data
    length = raw.length if raw.length != 0xFFFFFFFF else len(ds.PixelData)
    return data[: raw.value_tell] + data[raw.value_tell + length :]


def test_no_phi_survives(run: tuple[str, batch.Summary]) -> None:
    """Every value (4+ characters) of an element the profile removes, empties or remaps is absent from the
    output bytes, unless an element the profile keeps holds it too (e.g. a protocol name repeated in a kept
    description)."""
    version, summary = run
    leaks = []
    for o in summary.outcomes:
        if o.status != "written":
            continue
        phi, kept = _values(o.source, version)
        suspects = {v for v in phi if len(v) >= 4 and not any(v in k for k in kept)}
        data = _without_pixel_data(Path(o.output).read_bytes())
        found = sorted(v for v in suspects if _present(v, data))
        if found:
            leaks.append((o.source, found[:5]))
    assert leaks == []


def _uid_pairs(source: Dataset, output: Dataset) -> Iterator[tuple[str, str]]:
    for tag in source.keys():
        if tag not in output:
            continue
        a, b = source[tag], output[tag]
        if a.VR == "SQ" and b.VR == "SQ" and len(a.value) == len(b.value):
            for x, y in zip(a.value, b.value, strict=True):
                yield from _uid_pairs(x, y)
        elif a.VR == "UI" and a.value and b.value and a.value != b.value:
            olds = a.value if isinstance(a.value, list | pydicom.multival.MultiValue) else [a.value]
            news = b.value if isinstance(b.value, list | pydicom.multival.MultiValue) else [b.value]
            assert len(olds) == len(news), f"{tag:08x}: value multiplicity changed"
            yield from zip(map(str, olds), map(str, news), strict=True)


def test_uid_references_are_consistent_across_the_run(run: tuple[str, batch.Summary]) -> None:
    _version, summary = run
    forward: dict[str, set[str]] = defaultdict(set)
    backward: dict[str, set[str]] = defaultdict(set)
    for o in summary.outcomes:
        if o.status != "written":
            continue
        for old, new in _uid_pairs(pydicom.dcmread(o.source, force=True), pydicom.dcmread(o.output)):
            forward[old.strip()].add(new)
            backward[new].add(old.strip())
    assert forward, "no UID was remapped"
    assert {k: v for k, v in forward.items() if len(v) > 1} == {}
    assert {k: v for k, v in backward.items() if len(v) > 1} == {}


def test_a_study_stays_one_study(run: tuple[str, batch.Summary]) -> None:
    """Knee has two series in one study: one new StudyInstanceUID, two new series, one new PatientID."""
    _version, summary = run
    knee = [pydicom.dcmread(o.output) for o in summary.outcomes if "/Knee/" in o.source and o.output]
    assert len(knee) == 50
    assert len({d.StudyInstanceUID for d in knee}) == 1
    assert len({d.SeriesInstanceUID for d in knee}) == 2
    assert len({d.PatientID for d in knee}) == 1 and len(knee[0].PatientID) == 36


_NOISE = re.compile(r"= '.*'$|values are .*$|<[0-9.]+>")
_PROFILE_ERROR = re.compile(r"^Error - (Missing|Empty) attribute.*Element=<(\w+)>")


@cache
def _dciodvfy_errors(path: str) -> frozenset[str]:
    assert DCIODVFY is not None
    r = subprocess.run([DCIODVFY, path], capture_output=True, timeout=60, check=False)
    lines = (r.stdout + r.stderr).decode("latin-1").splitlines()
    return frozenset(_NOISE.sub("", line).strip() for line in lines if line.startswith("Error"))


def test_dciodvfy_finds_no_new_error(run: tuple[str, batch.Summary]) -> None:
    """Only "missing/empty attribute" errors for attributes the profile itself removes or empties are new.

    PS3.15 allows "D" (dummy value) for some Type 1 attributes; Orthanc, and so this profile, empties them.
    """
    assert DCIODVFY is not None, "dciodvfy missing: apt-get install dicom3tools (scripts/test.sh does)"
    version, summary = run
    profile = load_profile(version)
    touched = {pydicom.datadict.keyword_for_tag(t) for t in profile.removals | profile.clearings}
    touched |= {"OverlayData", "OverlayComments", "CurveData"}
    written = [o for o in summary.outcomes if o.status == "written"]
    with ThreadPoolExecutor(4) as pool:
        before = list(pool.map(lambda o: _dciodvfy_errors(o.source), written))
        after = list(pool.map(lambda o: _dciodvfy_errors(o.output), written))
    unexpected = {}
    for o, old, new in zip(written, before, after, strict=True):
        extra = []
        for line in new - old:
            m = _PROFILE_ERROR.match(line)
            if not (m and m.group(2) in touched):
                extra.append(line)
        if extra:
            unexpected[o.source] = sorted(extra)
    assert unexpected == {}
