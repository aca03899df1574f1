"""``dicom-node anonymize`` / ``modify`` on folders: outputs, summary, exit codes, dry run, keys, transcode."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
from conftest import SAMPLES
from pydicom.uid import RLELossless


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=300)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def outputs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if p.is_file())


def knee_copy(tmp_path: Path) -> Path:
    """Knee (2 series) plus a text file and a truncated DICOM file, in a folder named after the patient."""
    src = tmp_path / "DOE^JOHN 887"
    shutil.copytree(SAMPLES / "Knee", src / "Knee")
    (src / "notes.txt").write_text("not dicom")
    data = (SAMPLES / "Knee" / "T1" / "IM-0001-0001.dcm").read_bytes()
    (src / "broken.dcm").write_bytes(data[:1200])
    return src


def test_anonymize_a_folder_never_touches_inputs_and_reports_every_file(tmp_path: Path) -> None:
    src = knee_copy(tmp_path)
    before = tree_digest(src)
    out = tmp_path / "out"
    r = cli("anonymize", str(src), "--out", str(out), "-q", "--jobs", "2")
    assert r.returncode == 1, "a broken file makes the run fail"
    assert "50 written, 0 duplicate(s), 1 skipped (not DICOM), 1 failed" in r.stdout, r.stdout
    assert f"FAILED {src / 'broken.dcm'}: " in r.stderr
    assert tree_digest(src) == before
    files = outputs(out)
    assert len(files) == 50
    datasets = [pydicom.dcmread(f) for f in files]
    assert len({d.StudyInstanceUID for d in datasets}) == 1 and len({d.SeriesInstanceUID for d in datasets}) == 2
    for f, d in zip(files, datasets, strict=True):
        assert f.relative_to(out).parts == (d.StudyInstanceUID, d.SeriesInstanceUID, f"{d.SOPInstanceUID}.dcm")
        assert "DOE" not in str(f.relative_to(out)) and "Knee" not in str(f.relative_to(out))
        assert d.PatientName == "Anonymized1" and d.PatientID != "887"


def test_a_bad_body_stops_before_any_file_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for body, words in [
        ('{"DicomVersion": "nope"}', "DicomVersion"),
        ('{"Replace": {"PatientID": "x"}}', '"Force"'),
        ('{"Remove": ["NotATag"]}', "NotATag"),
        ("{not json", "not valid JSON"),
        ('{"Replace": {"InstanceNumber": 5}}', "InstanceNumber"),
    ]:
        r = cli("anonymize", str(SAMPLES / "Knee"), "--out", str(out), "--body", body, "-q")
        assert r.returncode == 2, (body, r.stdout, r.stderr)
        assert words in r.stderr, (body, r.stderr)
        assert not out.exists()


def test_body_from_a_file_and_modify_keeps_the_study(tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"Replace": {"InstitutionName": "Research"}, "Remove": ["StationName"]}))
    out = tmp_path / "out"
    r = cli("modify", str(SAMPLES / "Knee" / "T1"), "--out", str(out), "--body", f"@{body}", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    src = {pydicom.dcmread(p).InstanceNumber: pydicom.dcmread(p) for p in (SAMPLES / "Knee" / "T1").iterdir()}
    for f in outputs(out):
        d = pydicom.dcmread(f)
        orig = src[d.InstanceNumber]
        assert d.InstitutionName == "Research" and "StationName" not in d
        assert d.PatientName == orig.PatientName and d.StudyInstanceUID == orig.StudyInstanceUID
        assert d.SeriesInstanceUID == orig.SeriesInstanceUID and d.SOPInstanceUID != orig.SOPInstanceUID


def test_dry_run_previews_every_element_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = cli("anonymize", str(SAMPLES / "Knee" / "T1"), "--out", str(out), "--dry-run",
            "--body", '{"Keep": ["StudyDescription"], "Replace": {"InstitutionName": "Research"}}')  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    lines = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:] if line.strip()}
    assert lines["PatientName"][:3] == ["replaced", "->", "Anonymized1"]
    assert lines["StudyDate"] == ["emptied"]
    assert lines["InstitutionName"][:3] == ["replaced", "->", "Research"]
    assert lines["StudyDescription"] == ["kept"]
    assert lines["SeriesDescription"] == ["removed"]
    assert lines["SOPInstanceUID"][:2] == ["new", "UID"]
    assert lines["ReferencedImageSequence[0].ReferencedSOPInstanceUID"][:2] == ["new", "UID"]
    assert lines["SOPClassUID"] == ["kept"]
    assert "Knee" not in "".join(r.stdout.splitlines()[1:])  # values of removed elements are not printed


def test_a_key_file_gives_the_same_pseudonyms_in_every_run(tmp_path: Path) -> None:
    key = tmp_path / "project.key"
    runs = []
    for name, extra in [("a", ["--key-file", str(key)]), ("b", ["--key-file", str(key), "--jobs", "1"]),
                        ("c", [])]:  # fmt: skip
        r = cli("anonymize", str(SAMPLES / "Knee" / "T2"), "--out", str(tmp_path / name), "-q", *extra)
        assert r.returncode == 0, r.stderr
        runs.append({pydicom.dcmread(f).StudyInstanceUID for f in outputs(tmp_path / name)})
    assert runs[0] == runs[1] and len(runs[0]) == 1
    assert runs[2] != runs[0]
    assert key.stat().st_mode & 0o077 == 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")  # byte-identical, whatever the job count


def test_a_rerun_into_the_same_folder_reports_duplicates_not_failures(tmp_path: Path) -> None:
    key = tmp_path / "k"
    out = tmp_path / "out"
    for _ in range(2):
        r = cli("anonymize", str(SAMPLES / "Series"), "--out", str(out), "--key-file", str(key), "-q")
        assert r.returncode == 0, r.stderr
    assert "0 written, 5 duplicate(s)" in r.stdout
    r = cli("modify", str(SAMPLES / "Series"), "--out", str(out / "m"), "-q", "--body", '{"Keep": ["SOPInstanceUID"],'
            ' "Force": true}')  # fmt: skip
    assert r.returncode == 0
    r = cli("modify", str(SAMPLES / "Series"), "--out", str(out / "m"), "-q", "--body",
            '{"Keep": ["SOPInstanceUID"], "Force": true, "Replace": {"InstitutionName": "other"}}')  # fmt: skip
    assert r.returncode == 1 and "already exists with other content" in r.stderr


def test_transcode_to_rle_and_a_refused_target(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = cli("anonymize", str(SAMPLES / "Series"), "--out", str(out), "-q", "--transcode", RLELossless)
    assert r.returncode == 0, r.stderr
    for f in outputs(out):
        d = pydicom.dcmread(f)
        assert d.file_meta.TransferSyntaxUID == RLELossless
        assert d.pixel_array.shape == (d.Rows, d.Columns, 3) or d.pixel_array.shape == (d.Rows, d.Columns)
    r = cli("anonymize", str(SAMPLES / "Series"), "--out", str(tmp_path / "jpeg"), "-q",
            "--body", '{"Transcode": "1.2.840.10008.1.2.4.50"}')  # fmt: skip
    assert r.returncode == 2 and "1.2.840.10008.1.2.4.50" in r.stderr and "possible targets" in r.stderr
    assert not (tmp_path / "jpeg").exists()


def test_an_output_folder_inside_the_input_is_not_read_back(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(SAMPLES / "Series", src)
    out = src / "anon"
    for _ in range(2):
        r = cli("anonymize", str(src), "--out", str(out), "-q")
        assert r.returncode == 0, r.stderr
        assert "5 written, 0 duplicate(s), 0 skipped" in r.stdout, r.stdout
    assert len(outputs(out)) == 10


def test_overwrite_replaces_and_show_values_prints_the_originals(tmp_path: Path) -> None:
    out = tmp_path / "out"
    keep = '{"Keep": ["SOPInstanceUID"], "Force": true'
    assert cli("modify", str(SAMPLES / "Series"), "--out", str(out), "-q", "--body", keep + "}").returncode == 0
    r = cli("modify", str(SAMPLES / "Series"), "--out", str(out), "-q", "--overwrite",
            "--body", keep + ', "Replace": {"InstitutionName": "other"}}')  # fmt: skip
    assert r.returncode == 0 and "5 written" in r.stdout, r.stdout + r.stderr
    assert {pydicom.dcmread(f).InstitutionName for f in outputs(out)} == {"other"}
    knee = SAMPLES / "Knee" / "T1" / "IM-0001-0001.dcm"
    original = str(pydicom.dcmread(knee).PatientName)
    assert original
    hidden = cli("anonymize", str(knee), "--out", str(tmp_path / "x"), "--dry-run")
    shown = cli("anonymize", str(knee), "--out", str(tmp_path / "x"), "--dry-run", "--show-values")
    assert original not in hidden.stdout and original in shown.stdout
