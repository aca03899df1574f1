"""What is inside the stored files, over the real app on a real SQLite archive: tags in Orthanc's three formats,
raw content browsing, shared tags, per-resource statistics, streamed ZIP archives, and uploads of ZIP and
multipart bodies (zip bombs refused with nothing stored)."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import pydicom
from conftest import SAMPLES, add_pixels, make_dataset, make_instance, store_file
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.archive.store import Archive
from node.dicom.ids import resource_ids
from node.rest import content

UTF8_NAME = "Müller^Jürgen"


def _rich_instance(path: Path, rows: int = 16) -> Path:
    """An instance with a nested sequence, private tags, UTF-8 text, binary, numbers, and data after the pixels."""
    ds = make_dataset(patient_id="PRICH", study_uid="1.5.1", series_uid="1.5.1.1", sop_uid="1.5.1.1.1",
                      PatientName=UTF8_NAME, SpecificCharacterSet="ISO_IR 192", AccessionNumber="",
                      StudyDescription="CHEST", ImagePositionPatient=["1", "2.5", "-3"], InstanceNumber=7,
                      ImageComments="x" * 300, RecognitionCode="OLD", AcquisitionMatrix=[0, 256, 192, 0],
                      DiffusionBValue=0.1, FrameIncrementPointer=0x00181063)  # fmt: skip
    refs = []
    for i in range(2):
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        item.ReferencedSOPInstanceUID = f"1.5.9.{i}"
        refs.append(item)
    ds.ReferencedStudySequence = Sequence(refs)
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "secret")
    block.add_new(0x02, "OB", b"\x00\x01\x02\x03")
    add_pixels(ds, bytes(range(256)) * (rows * rows * 2 // 256), rows)
    ds.add_new(0xFFFCFFFC, "OB", b"\x00\x00")  # DataSetTrailingPadding: after PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


RICH = resource_ids("PRICH", "1.5.1", "1.5.1.1", "1.5.1.1.1")


def test_tags_in_orthancs_full_simplified_and_short_formats(rest_client: TestClient, rest_archive: Archive,
                                                            tmp_path: Path) -> None:  # fmt: skip
    store_file(rest_archive, _rich_instance(tmp_path / "rich.dcm"))
    full = rest_client.get(f"/instances/{RICH.instance}/tags").json()
    assert full["0010,0010"] == {"Name": "PatientName", "Type": "String", "Value": UTF8_NAME}
    assert full["0008,0005"] == {"Name": "SpecificCharacterSet", "Type": "String", "Value": "ISO_IR 192"}
    assert full["0008,0050"] == {"Name": "AccessionNumber", "Type": "String", "Value": ""}  # empty: String ""
    assert full["0020,0032"] == {"Name": "ImagePositionPatient", "Type": "String", "Value": "1\\2.5\\-3"}
    assert full["0020,0013"] == {"Name": "InstanceNumber", "Type": "String", "Value": "7"}
    assert full["0028,0010"] == {"Name": "Rows", "Type": "String", "Value": "16"}  # US as a string
    assert full["0018,1310"] == {"Name": "AcquisitionMatrix", "Type": "String", "Value": "0\\256\\192\\0"}
    assert full["0018,9087"] == {"Name": "DiffusionBValue", "Type": "String", "Value": "0.10000000000000001"}
    assert full["0028,0009"] == {"Name": "FrameIncrementPointer", "Type": "String", "Value": "0018,1063"}
    assert full["0020,4000"] == {"Name": "ImageComments", "Type": "TooLong", "Value": None}  # > 256 bytes
    assert full["0008,0010"] == {"Name": "RETIRED_RecognitionCode", "Type": "String", "Value": "OLD"}
    assert full["7fe0,0010"] == {"Name": "PixelData", "Type": "Null", "Value": None}
    assert "fffc,fffc" not in full  # nothing after the pixel data
    assert full["0009,0010"] == {"Name": "PrivateCreator", "Type": "String", "Value": "ACME 1.0"}
    assert full["0009,1001"] == {"Name": "Unknown Tag & Data", "PrivateCreator": "ACME 1.0", "Type": "String",
                                 "Value": "secret"}  # fmt: skip
    assert full["0009,1002"] == {"Name": "Unknown Tag & Data", "PrivateCreator": "ACME 1.0", "Type": "Null",
                                 "Value": None}  # binary: never shown  # fmt: skip
    ref_class = {"Name": "ReferencedSOPClassUID", "Type": "String", "Value": "1.2.840.10008.3.1.2.3.1"}
    assert full["0008,1110"] == {"Name": "ReferencedStudySequence", "Type": "Sequence", "Value": [
        {"0008,1150": ref_class, "0008,1155": {"Name": "ReferencedSOPInstanceUID", "Type": "String",
                                               "Value": f"1.5.9.{i}"}}
        for i in range(2)]}  # fmt: skip
    assert list(full) == sorted(full)

    simple = rest_client.get(f"/instances/{RICH.instance}/tags", params={"simplify": ""}).json()
    assert simple["PatientName"] == UTF8_NAME and simple["Rows"] == "16" and simple["PixelData"] is None
    assert simple["ImageComments"] is None and simple["AccessionNumber"] == ""
    assert simple["ReferencedStudySequence"] == [
        {"ReferencedSOPClassUID": "1.2.840.10008.3.1.2.3.1", "ReferencedSOPInstanceUID": f"1.5.9.{i}"}
        for i in range(2)]  # fmt: skip
    assert simple["Unknown Tag & Data"] is None  # two unknown private tags: the last one wins, as in Orthanc
    assert simple["PrivateCreator"] == "ACME 1.0"
    assert len(simple) == len({n["Name"] for n in full.values()})
    assert rest_client.get(f"/instances/{RICH.instance}/simplified-tags").json() == simple
    # ?simplify wins over ?short, whatever the values
    assert rest_client.get(f"/instances/{RICH.instance}/tags?short&simplify=false").json() == simple

    short = rest_client.get(f"/instances/{RICH.instance}/tags", params={"short": "1"}).json()
    assert list(short) == list(full)
    assert short["0010,0010"] == UTF8_NAME and short["0009,1001"] == "secret" and short["0009,1002"] is None
    assert short["0008,1110"][1] == {"0008,1150": "1.2.840.10008.3.1.2.3.1", "0008,1155": "1.5.9.1"}

    r = rest_client.get("/instances/nope/tags")
    assert r.status_code == 404 and r.json()["OrthancStatus"] == 17


def test_tags_of_real_samples_decode_their_character_set(rest_client: TestClient) -> None:
    latin1 = SAMPLES / "Encodings" / "Lena-latin1.dcm"
    answer = rest_client.post("/instances", content=latin1.read_bytes()).json()
    tags = rest_client.get(f"/instances/{answer['ID']}/tags").json()
    assert tags["0008,0005"]["Value"] == "ISO_IR 100"
    assert tags["0010,0010"] == {"Name": "PatientName", "Type": "String", "Value": "Test-éüäöò"}
    private = SAMPLES / "PrivateTags.dcm"
    answer = rest_client.post("/instances", content=private.read_bytes()).json()
    tags = rest_client.get(f"/instances/{answer['ID']}/tags").json()
    assert tags["6003,0010"] == {"Name": "PrivateCreator", "Type": "String",
                                 "Value": "GEMS_Ultrasound_ImageGroup_001"}  # fmt: skip
    assert tags["6003,1010"]["Type"] == "Sequence" and "PrivateCreator" not in tags["6003,1010"]
    assert tags["7fe0,0010"]["Type"] == "Null"


def test_content_browsing_answers_raw_values_and_404s(rest_client: TestClient, rest_archive: Archive,
                                                      tmp_path: Path) -> None:  # fmt: skip
    path = _rich_instance(tmp_path / "rich.dcm", rows=256)  # 128 KiB of pixels: streamed from the file
    store_file(rest_archive, path)
    ds = pydicom.dcmread(path)
    base = f"/instances/{RICH.instance}/content"
    top = rest_client.get(base).json()
    assert top == [f"{t >> 16:04x}-{t & 0xFFFF:04x}" for t in sorted(ds.keys())]
    assert "0010-0010" in top and "7fe0-0010" in top and top[-1] == "fffc-fffc"
    assert rest_client.get(base + "/").json() == top
    r = rest_client.get(base + "/0010-0010")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.content == UTF8_NAME.encode() + b" "  # as stored: UTF-8, padded to an even length
    assert rest_client.get(base + "/PatientName").content == r.content  # keywords work too
    assert rest_client.get(base + "/0009-1002").content == b"\x00\x01\x02\x03"
    assert rest_client.get(base + "/0008-1110").json() == ["0", "1"]
    assert rest_client.get(base + "/0008-1110/1").json() == ["0008-1150", "0008-1155"]
    assert rest_client.get(base + "/0008-1110/1/0008-1155").content == b"1.5.9.1\x00"
    assert rest_client.get(base + "/7fe0-0010").json() == ["0"]
    pixels = rest_client.get(base + "/7fe0-0010/0")
    assert pixels.content == ds.PixelData and len(pixels.content) == 256 * 256 * 2
    assert pixels.headers["content-length"] == str(256 * 256 * 2)
    for missing in ("/0010-0011", "/0008-1110/2", "/0008-1110/x", "/0008-1110/-1", "/zzzz", "/7fe0-0010/1",
                    "/0010-0010/0/0010-0010", "/0008-1110/0/0010-0010"):  # fmt: skip
        r = rest_client.get(base + missing)
        assert r.status_code == 404, (missing, r.text)
        assert r.json()["OrthancError"] == "Unknown resource" and r.json()["Uri"] == base + missing
    assert rest_client.get("/instances/nope/content").status_code == 404


def _fragments(encapsulated: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 8 <= len(encapsulated):
        group, elem, length = struct.unpack_from("<HHI", encapsulated, pos)
        if (group, elem) != (0xFFFE, 0xE000):
            break
        out.append(encapsulated[pos + 8 : pos + 8 + length])
        pos += 8 + length
    return out


def test_content_lists_the_fragments_of_encapsulated_pixel_data(rest_client: TestClient) -> None:
    jpeg = SAMPLES / "TransferSyntaxes" / "1.2.840.10008.1.2.4.50.dcm"
    answer = rest_client.post("/instances", content=jpeg.read_bytes()).json()
    frags = _fragments(pydicom.dcmread(jpeg).PixelData)
    assert len(frags) >= 2  # the basic offset table, then the frame
    base = f"/instances/{answer['ID']}/content/7fe0-0010"
    assert rest_client.get(base).json() == [str(i) for i in range(len(frags))]
    assert rest_client.get(f"{base}/1").content == frags[1]
    assert rest_client.get(f"{base}/{len(frags)}").status_code == 404


def test_shared_tags_keep_the_strings_equal_in_every_instance(rest_client: TestClient, rest_archive: Archive,
                                                              tmp_path: Path) -> None:  # fmt: skip
    for i in range(2):
        store_file(rest_archive, make_instance(tmp_path / f"{i}.dcm", patient_id="PS", study_uid="1.6",
                                               series_uid="1.6.1", sop_uid=f"1.6.1.{i}", InstanceNumber=i + 1,
                                               PatientName="SHARED^NAME", StudyDescription="HEAD",
                                               ImageComments=f"comment {i}"))  # fmt: skip
    ids = resource_ids("PS", "1.6", "1.6.1", "1.6.1.0")
    other = resource_ids("PS", "1.6", "1.6.1", "1.6.1.1").instance
    first = rest_client.get(f"/instances/{ids.instance}/tags").json()
    differing = {"0008,0018", "0020,0013", "0020,4000"}  # SOPInstanceUID, InstanceNumber, ImageComments
    expected = {k: v for k, v in first.items() if v["Type"] == "String" and k not in differing}
    for level, public_id in (("series", ids.series), ("studies", ids.study), ("patients", ids.patient)):
        shared = rest_client.get(f"/{level}/{public_id}/shared-tags").json()
        assert shared == expected, level
    assert shared["0010,0010"] == {"Name": "PatientName", "Type": "String", "Value": "SHARED^NAME"}
    assert "7fe0,0010" not in shared  # Null, not String
    simple = rest_client.get(f"/series/{ids.series}/shared-tags", params={"simplify": ""}).json()
    assert simple == {v["Name"]: v["Value"] for v in expected.values()}
    assert simple["StudyDescription"] == "HEAD" and "SOPInstanceUID" not in simple
    short = rest_client.get(f"/studies/{ids.study}/shared-tags", params={"short": ""}).json()
    assert short == {k: v["Value"] for k, v in expected.items()}
    every = rest_client.get(f"/series/{ids.series}/instances-tags", params={"simplify": ""}).json()
    assert set(every) == {ids.instance, other}
    assert every[other]["ImageComments"] == "comment 1" and every[ids.instance]["InstanceNumber"] == "1"
    assert rest_client.get("/series/nope/shared-tags").status_code == 404


def test_statistics_per_level_in_orthancs_shape(rest_client: TestClient, rest_archive: Archive,
                                                tmp_path: Path) -> None:  # fmt: skip
    layout = [("1.7", "1.7.1", "1.7.1.1"), ("1.7", "1.7.1", "1.7.1.2"), ("1.7", "1.7.2", "1.7.2.1"),
              ("1.8", "1.8.1", "1.8.1.1")]  # fmt: skip
    sizes = {}
    for study, series, sop in layout:
        path = make_instance(tmp_path / f"{sop}.dcm", patient_id="PST", study_uid=study, series_uid=series,
                             sop_uid=sop)  # fmt: skip
        store_file(rest_archive, path)
        sizes[sop] = path.stat().st_size
    ids = resource_ids("PST", "1.7", "1.7.1", "1.7.1.1")

    def sizes_of(total: int) -> dict[str, Any]:
        return {"DiskSize": str(total), "DiskSizeMB": 0, "UncompressedSize": str(total), "UncompressedSizeMB": 0,
                "DicomDiskSize": str(total), "DicomDiskSizeMB": 0, "DicomUncompressedSize": str(total),
                "DicomUncompressedSizeMB": 0}  # fmt: skip

    total = sum(sizes.values())
    assert rest_client.get(f"/patients/{ids.patient}/statistics").json() == {
        "CountStudies": 2, "CountSeries": 3, "CountInstances": 4, **sizes_of(total)}  # fmt: skip
    study_a = sizes["1.7.1.1"] + sizes["1.7.1.2"] + sizes["1.7.2.1"]
    assert rest_client.get(f"/studies/{ids.study}/statistics").json() == {
        "CountSeries": 2, "CountInstances": 3, **sizes_of(study_a)}  # fmt: skip
    assert rest_client.get(f"/series/{ids.series}/statistics").json() == {
        "CountInstances": 2, **sizes_of(sizes["1.7.1.1"] + sizes["1.7.1.2"])}  # fmt: skip
    assert rest_client.get(f"/instances/{ids.instance}/statistics").json() == sizes_of(sizes["1.7.1.1"])
    assert rest_client.get("/studies/nope/statistics").status_code == 404


def _stored_bytes(rest_client: TestClient, instance: str) -> bytes:
    return rest_client.get(f"/instances/{instance}/file").content


def test_archive_is_a_streamed_zip_of_the_stored_files_with_sanitised_names(
    rest_client: TestClient, rest_archive: Archive, tmp_path: Path
) -> None:
    hostile = {"PatientName": "../x/y", "StudyDescription": "..", "AccessionNumber": "",
               "SeriesDescription": "a\\b/..\\c"}  # fmt: skip
    sops = ["1.9.1.1", "1.9.1.2", "1.9.2.1"]
    for sop in sops:
        series = sop.rsplit(".", 1)[0]
        store_file(rest_archive, make_instance(tmp_path / f"{sop}.dcm", patient_id="P/1", study_uid="1.9",
                                               series_uid=series, sop_uid=sop, **hostile))  # fmt: skip
    ids = {sop: resource_ids("P/1", "1.9", sop.rsplit(".", 1)[0], sop) for sop in sops}
    study = ids[sops[0]].study
    r = rest_client.get(f"/studies/{study}/archive")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"] == f'filename="{study}.zip"'
    assert "content-length" not in r.headers  # streamed, not built first
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    assert zf.testzip() is None
    names = zf.namelist()
    # Orthanc's names (PatientID PatientName / AccessionNumber StudyDescription / Modality SeriesDescription),
    # filtered to letters, digits, '.', '_' and spaces, never '..'; two series with one name: "-2" (in ID order)
    s1, s2 = ids["1.9.1.1"].series, ids["1.9.2.1"].series
    dir1, dir2 = ("CT ab.c", "CT ab.c-2") if s1 < s2 else ("CT ab.c-2", "CT ab.c")
    assert sorted(names) == sorted([f"P1 .xy/Unknown Study/{dir1}/CT000000.dcm",
                                    f"P1 .xy/Unknown Study/{dir1}/CT000001.dcm",
                                    f"P1 .xy/Unknown Study/{dir2}/CT000000.dcm"])  # fmt: skip
    for name in names:
        parts = name.split("/")
        assert all(p and p not in (".", "..") and not p.startswith(".") and "\\" not in p for p in parts)
        assert not os.path.isabs(name) and not os.path.normpath(name).startswith("..")
    by_sop = {pydicom.dcmread(io.BytesIO(zf.read(n))).SOPInstanceUID: zf.read(n) for n in names}
    assert set(by_sop) == set(sops)
    for sop in sops:
        assert by_sop[sop] == _stored_bytes(rest_client, ids[sop].instance) == (tmp_path / f"{sop}.dcm").read_bytes()
    unzipped = tmp_path / "unzipped"
    zf.extractall(unzipped)
    assert {p.relative_to(unzipped).as_posix() for p in unzipped.rglob("*.dcm")} == set(names)

    posted = rest_client.post(f"/studies/{study}/archive", json={"Synchronous": True})
    assert sorted(zipfile.ZipFile(io.BytesIO(posted.content)).namelist()) == sorted(names)
    r = rest_client.post(f"/studies/{study}/archive", json={"Asynchronous": True})
    assert r.status_code == 400 and "asynchronous" in r.json()["Details"]
    one = zipfile.ZipFile(io.BytesIO(rest_client.get(f"/instances/{ids[sops[2]].instance}/archive").content))
    assert one.namelist() == ["P1 .xy/Unknown Study/CT ab.c/CT000000.dcm"]
    patient = zipfile.ZipFile(io.BytesIO(rest_client.get(f"/patients/{ids[sops[0]].patient}/archive").content))
    assert sorted(patient.namelist()) == sorted(names)
    assert rest_client.get("/series/nope/archive").status_code == 404


def test_zip_names_never_escape_and_the_stream_stays_small(tmp_path: Path) -> None:
    assert content.zip_name("../../etc/passwd", "X") == "etcpasswd"
    for hostile in ("..", "../..", "/", "\\..\\", "\x00\x01", "^^^", " . ", "é", ".hidden", "a" * 500):
        name = content.zip_name(hostile, "Unknown")
        assert name and name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name
        assert not name.startswith(".") and len(name) <= content.MAX_NAME
    assert content.zip_name("    Hel^^  ^\r\n\t^^lo  \t  <world>  ", "X") == "Hel lo world"  # Orthanc's own test
    big = make_instance(tmp_path / "big.dcm", rows=1024)  # 2 MiB of random pixels: incompressible
    path = tmp_path / "big.dcm"
    entries = [content.ZipEntry("A/B/C/CT000000.dcm", path, path.stat().st_size)]
    chunks = list(content.zip_stream(entries))
    assert len([c for c in chunks if c]) >= 3 and max(len(c) for c in chunks) < 2 * 1024 * 1024
    zf = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert zf.read("A/B/C/CT000000.dcm") == big.read_bytes()
    huge = content.ZipEntry("Z/CT000000.dcm", path, 5 * 1024**3)  # a file that may pass 4 GiB: ZIP64 entry
    zf64 = zipfile.ZipFile(io.BytesIO(b"".join(content.zip_stream([huge]))))
    assert zf64.infolist()[0].extract_version >= 45 and zf64.read("Z/CT000000.dcm") == big.read_bytes()


def _zip(members: list[tuple[str, bytes]], level: int = 6) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _answer(ids: Any) -> dict[str, str]:
    return {"ID": ids.instance, "ParentPatient": ids.patient, "ParentSeries": ids.series, "ParentStudy": ids.study,
            "Path": f"/instances/{ids.instance}", "Status": "Success"}  # fmt: skip


def _leftovers(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "storage" / ".tmp").rglob("*") if p.is_file()]


def test_zip_upload_stores_every_dicom_member_and_skips_the_rest(rest_client: TestClient, tmp_path: Path) -> None:
    files = [make_instance(tmp_path / f"{i}.dcm", patient_id="PZ", study_uid="1.10", series_uid="1.10.1",
                           sop_uid=f"1.10.1.{i}") for i in range(3)]  # fmt: skip
    broken = files[0].read_bytes()[:-200]
    body = _zip([("a/0.dcm", files[0].read_bytes()), ("../../etc/evil.dcm", files[1].read_bytes()),
                 ("README.txt", b"not dicom at all\n" * 20),
                 ("DICOMDIR", (SAMPLES / "Encodings" / "DavidClunie" / "DICOMDIR").read_bytes()),
                 ("empty/", b""), ("2.dcm", files[2].read_bytes()), ("broken.dcm", broken)])  # fmt: skip
    r = rest_client.post("/instances", content=body, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 200, r.text
    answers = r.json()
    expected = []
    for i in range(3):
        ids = resource_ids("PZ", "1.10", "1.10.1", f"1.10.1.{i}")
        expected.append(_answer(ids))
    assert answers[:3] == expected
    assert len(answers) == 4 and answers[3]["Status"] == "Failure"
    assert answers[3]["Details"].startswith("'broken.dcm': not a storable DICOM instance: truncated")
    assert rest_client.get("/statistics").json()["CountInstances"] == 3
    for i in range(3):
        assert _stored_bytes(rest_client, expected[i]["ID"]) == files[i].read_bytes()
    assert not list(tmp_path.rglob("evil.dcm")) and not Path("etc/evil.dcm").exists()
    assert _leftovers(tmp_path) == []
    again = rest_client.post("/instances", content=body).json()
    assert [a["Status"] for a in again] == ["AlreadyStored"] * 3 + ["Failure"]
    assert rest_client.post("/instances", content=b"PK\x03\x04 not really a zip").status_code == 400


def test_zip_bomb_is_refused_before_anything_is_stored(rest_client: TestClient, tmp_path: Path) -> None:
    good = make_instance(tmp_path / "good.dcm", patient_id="PB", study_uid="1.11", series_uid="1.11.1",
                         sop_uid="1.11.1.1").read_bytes()  # fmt: skip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("good.dcm", good)
        with zf.open("bomb.dcm", "w") as member:
            zeros = bytes(1024 * 1024)
            for _ in range(80):  # 80 MiB of zeros in ~80 KB
                member.write(zeros)
    body = buf.getvalue()
    assert len(body) < 200 * 1024
    r = rest_client.post("/instances", content=body)
    assert r.status_code == 400 and "zip bomb" in r.json()["Details"], r.text
    assert rest_client.get("/statistics").json()["CountInstances"] == 0
    assert _leftovers(tmp_path) == []


def test_multipart_upload_stores_each_file_part(rest_client: TestClient, tmp_path: Path) -> None:
    files = [make_instance(tmp_path / f"{i}.dcm", patient_id="PM", study_uid="1.12", series_uid="1.12.1",
                           sop_uid=f"1.12.1.{i}") for i in range(3)]  # fmt: skip
    ids = [resource_ids("PM", "1.12", "1.12.1", f"1.12.1.{i}") for i in range(3)]
    parts = [("file", (f"{i}.dcm", files[i].read_bytes(), "application/dicom")) for i in range(2)]
    r = rest_client.post("/instances", files=parts, data={"comment": "a plain field, ignored"})
    assert r.status_code == 200, r.text
    assert [(a["ID"], a["Status"]) for a in r.json()] == [(ids[0].instance, "Success"), (ids[1].instance, "Success")]
    for i in range(2):
        assert _stored_bytes(rest_client, ids[i].instance) == files[i].read_bytes()
    one = rest_client.post("/instances", files={"file": ("2.dcm", files[2].read_bytes(), "application/dicom")})
    assert one.json() == _answer(ids[2])
    dicom_part = ("file", ("0.dcm", files[0].read_bytes(), "application/dicom"))
    mixed = rest_client.post("/instances", files=[("file", ("x.txt", b"hello" * 100, "text/plain")), dicom_part])
    answers = mixed.json()
    assert answers[0]["Status"] == "Failure" and "not a storable DICOM instance" in answers[0]["Details"]
    assert answers[1]["Status"] == "AlreadyStored"
    zipped = rest_client.post("/instances", files={"file": ("all.zip", _zip([("0.dcm", files[0].read_bytes())]),
                                                            "application/zip")})  # fmt: skip
    assert [a["Status"] for a in zipped.json()] == ["AlreadyStored"]
    assert rest_client.post("/instances", files={"f": ("x.txt", b"not dicom" * 50, "text/plain")}).status_code == 400
    unterminated = b"--xyz\r\nContent-Disposition: form-data; name=a; filename=a\r\n\r\nab"
    bad = rest_client.post("/instances", content=unterminated,
                           headers={"Content-Type": "multipart/form-data; boundary=xyz"})  # fmt: skip
    assert bad.status_code == 400 and "closing boundary" in bad.json()["Details"]
    assert rest_client.get("/statistics").json()["CountInstances"] == 3
    assert _leftovers(tmp_path) == []


def test_multipart_splitter_handles_boundaries_split_across_chunks() -> None:
    from node.rest.upload import MultipartSplitter

    class Sink:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> int:
            self.data += data
            return len(data)

    sinks: list[Sink] = []

    def open_part(headers: Any) -> Any:
        if headers.get_param("filename", header="content-disposition") is None:
            return None
        sinks.append(Sink())
        return sinks[-1]

    payloads = [b"\r\n--not the boundary\r\n" + bytes(range(256)) * 3, b"second\r\n--boun"]
    body = b"preamble\r\n"
    for i, payload in enumerate(payloads):
        body += (b"--bound\r\nContent-Disposition: form-data; name=\"f\"; filename=\"%d\"\r\n"
                 b"Content-Type: application/octet-stream\r\n\r\n" % i) + payload + b"\r\n"  # fmt: skip
    body += b'--bound\r\nContent-Disposition: form-data; name="x"\r\n\r\nfield\r\n--bound--\r\nepilogue'
    for size in (1, 2, 3, 7, 64, len(body)):
        sinks.clear()
        splitter = MultipartSplitter("bound", open_part)
        for i in range(0, len(body), size):
            splitter.feed(body[i : i + size])
        assert splitter.done and [s.data for s in sinks] == payloads, size
