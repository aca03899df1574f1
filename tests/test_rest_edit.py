"""``POST /instances/{id}/anonymize|modify`` (spec §4.1): the edited file comes back, nothing is stored."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from conftest import make_instance, store_file
from fastapi.testclient import TestClient

from node.archive.store import Archive
from node.dicom.ids import resource_ids


@pytest.fixture
def stored(rest_client: TestClient, rest_archive: Archive, tmp_path: Path) -> str:
    store_file(rest_archive, make_instance(tmp_path / "a.dcm", patient_id="P5", study_uid="1.5", series_uid="1.5.1",
                               sop_uid="1.5.1.1", PatientName="Doe^Jane", InstitutionName="General"))  # fmt: skip
    return resource_ids("P5", "1.5", "1.5.1", "1.5.1.1").instance


def dicom(response: object) -> pydicom.Dataset:
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    assert response.headers["content-type"] == "application/dicom"  # type: ignore[attr-defined]
    return pydicom.dcmread(io.BytesIO(response.content))  # type: ignore[attr-defined]


def test_each_anonymize_call_takes_a_new_name_and_new_uids(rest_client: TestClient, stored: str) -> None:
    first = dicom(rest_client.post(f"/instances/{stored}/anonymize", content=b""))
    second = dicom(rest_client.post(f"/instances/{stored}/anonymize", json={}))
    assert (str(first.PatientName), str(second.PatientName)) == ("Anonymized1", "Anonymized2")  # edge case 70
    assert first.StudyInstanceUID != "1.5" and first.StudyInstanceUID != second.StudyInstanceUID
    assert "InstitutionName" not in first and first.PatientID != "P5"
    assert rest_client.get("/statistics").json()["CountInstances"] == 1  # nothing stored


def test_modify_picks_its_level_from_what_it_replaces(rest_client: TestClient, stored: str) -> None:
    # curl -d sends application/x-www-form-urlencoded: the body is JSON all the same
    r = rest_client.post(f"/instances/{stored}/modify", content=b'{"Replace": {"InstitutionName": "Research"}}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    ds = dicom(r)
    assert ds.InstitutionName == "Research" and ds.StudyInstanceUID == "1.5" and ds.SeriesInstanceUID == "1.5.1"
    assert ds.SOPInstanceUID != "1.5.1.1"  # instance level: only the SOP Instance UID changes
    ds = dicom(rest_client.post(f"/instances/{stored}/modify", json={"Replace": {"PatientID": "X"}, "Force": True}))
    assert ds.PatientID == "X" and ds.StudyInstanceUID != "1.5" and ds.SeriesInstanceUID != "1.5.1"  # patient level


def test_bad_requests_are_400_naming_the_problem_and_unknown_instances_404(rest_client: TestClient,
                                                                          stored: str) -> None:  # fmt: skip
    r = rest_client.post(f"/instances/{stored}/anonymize", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["Details"]
    r = rest_client.post(f"/instances/{stored}/anonymize", json={"DicomVersion": "1999"})
    assert r.status_code == 400 and "DicomVersion" in r.json()["Details"]
    r = rest_client.post(f"/instances/{stored}/modify", json={"Replace": {"NoSuchTag": "x"}})
    assert r.status_code == 400 and "NoSuchTag" in r.json()["Details"] and r.json()["OrthancStatus"] == 27
    assert rest_client.post("/instances/nope/anonymize", json={}).status_code == 404


def test_the_edit_routes_are_behind_authentication(rest_archive: Archive, tmp_path: Path, stored: str) -> None:
    """The edit routes have their own ASGI front (edit.EditFront); authentication must still come first."""
    from node import config
    from node.rest.app import create_app

    cfg = config.build(None, {"StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path),
                              "AuthenticationEnabled": True, "RegisteredUsers": {"alice": "s3cret"}})  # fmt: skip
    client = TestClient(create_app(cfg, rest_archive))
    for route in ("anonymize", "modify"):
        r = client.post(f"/instances/{stored}/{route}", json={})
        assert r.status_code == 401 and r.json()["HttpStatus"] == 401
    assert dicom(client.post(f"/instances/{stored}/anonymize", json={}, auth=("alice", "s3cret"))).PatientID != "P5"


def test_an_oversized_body_is_refused_and_other_methods_go_to_fastapi(rest_client: TestClient, stored: str) -> None:
    from node.rest.edit import MAX_BODY

    r = rest_client.post(f"/instances/{stored}/anonymize", content=b" " * (MAX_BODY + 10))
    assert r.status_code == 413 and "over" in r.json()["Details"]
    assert rest_client.get(f"/instances/{stored}/anonymize").status_code == 405  # FastAPI's answer, not the front's


def test_files_the_fast_path_declines_go_to_the_general_engine(rest_client: TestClient, rest_archive: Archive,
                                                               tmp_path: Path) -> None:  # fmt: skip
    syntax = "1.2.840.10008.1.2"  # implicit VR: fastanon.py leaves it to the general engine
    path = make_instance(tmp_path / "i.dcm", patient_id="P6", study_uid="1.6", series_uid="1.6.1", sop_uid="1.6.1.1",
                         PatientName="Doe^John", InstitutionName="General")  # fmt: skip
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    store_file(rest_archive, path)
    out = dicom(rest_client.post(f"/instances/{resource_ids('P6', '1.6', '1.6.1', '1.6.1.1').instance}/anonymize"))
    assert str(out.PatientName).startswith("Anonymized") and out.PatientID != "P6" and "InstitutionName" not in out
    assert out.file_meta.TransferSyntaxUID == syntax and out.SOPInstanceUID != "1.6.1.1"


def test_a_stored_file_the_edit_cannot_write_is_a_400(rest_client: TestClient, rest_archive: Archive,
                                                      tmp_path: Path) -> None:  # fmt: skip
    """Found in review: a UID tag stored with a numeric VR made both engines raise (HTTP 500)."""
    path = make_instance(tmp_path / "fd.dcm", patient_id="P7", study_uid="1.7", series_uid="1.7.1", sop_uid="1.7.1.1")
    ds = pydicom.dcmread(path)
    ds.add_new(0x00200052, "FD", 1.5)  # FrameOfReferenceUID, which the profile remaps, as a double
    ds.save_as(path, enforce_file_format=True)
    store_file(rest_archive, path)
    instance = resource_ids("P7", "1.7", "1.7.1", "1.7.1.1").instance
    for body in ({}, {"Keep": ["StudyDate"]}):  # the fast path and the general engine
        r = rest_client.post(f"/instances/{instance}/anonymize", json=body)
        assert r.status_code == 400 and instance in r.json()["Details"] and "1.5" not in r.text, r.text
