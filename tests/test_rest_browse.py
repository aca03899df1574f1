"""The REST API's first routes (system, statistics, tools, browsing, file download) on a real SQLite archive."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from conftest import make_instance, store_file
from fastapi.testclient import TestClient

from node import config
from node.archive.store import Archive
from node.dicom.ids import resource_ids
from node.rest.app import create_app


def test_system_statistics_and_tools(rest_client: TestClient) -> None:
    system = rest_client.get("/system").json()
    assert system["DicomAet"] == "RESTNODE" and system["ApiVersion"] >= 18 and system["Name"] == "dicom-node"
    assert rest_client.get("/statistics").json()["CountInstances"] == 0
    assert len(rest_client.get("/tools/now").json()) == 15
    assert rest_client.get("/tools/generate-uid", params={"level": "study"}).json().startswith("1.2.826.0.1.3680043")
    assert len(rest_client.get("/tools/generate-uid", params={"level": "patient"}).json()) == 36
    r = rest_client.get("/tools/generate-uid", params={"level": "frame"})
    assert r.status_code == 400 and "level must be one of" in r.json()["Details"]


def test_browse_every_level_in_orthancs_shapes(rest_client: TestClient, rest_archive: Archive, tmp_path: Path) -> None:
    paths = [make_instance(tmp_path / f"{i}.dcm", patient_id="P7", study_uid="1.2.3", series_uid="1.2.3.4",
                           sop_uid=f"1.2.3.4.{i}", InstanceNumber=i + 1, StudyDescription="HEAD")
             for i in range(2)]  # fmt: skip
    for p in paths:
        store_file(rest_archive, p)
    ids = resource_ids("P7", "1.2.3", "1.2.3.4", "1.2.3.4.0")
    assert rest_client.get("/patients").json() == [ids.patient]
    assert rest_client.get("/studies").json() == [ids.study]
    assert len(rest_client.get("/instances").json()) == 2
    assert len(rest_client.get("/instances", params={"limit": 1}).json()) == 1
    assert len(rest_client.get("/instances", params={"since": 1}).json()) == 1
    patient = rest_client.get(f"/patients/{ids.patient}").json()
    assert patient["Type"] == "Patient" and patient["Studies"] == [ids.study]
    assert patient["MainDicomTags"]["PatientID"] == "P7"
    study = rest_client.get(f"/studies/{ids.study}").json()
    assert study["ParentPatient"] == ids.patient and study["Series"] == [ids.series]
    assert study["MainDicomTags"]["StudyDescription"] == "HEAD" and study["PatientMainDicomTags"]["PatientID"] == "P7"
    assert study["IsStable"] is False and len(study["LastUpdate"]) == 15
    series = rest_client.get(f"/series/{ids.series}").json()
    assert series["ParentStudy"] == ids.study and len(series["Instances"]) == 2 and series["Type"] == "Series"
    instance = rest_client.get(f"/instances/{ids.instance}").json()
    assert instance["ParentSeries"] == ids.series and instance["IndexInSeries"] == 1
    assert instance["MainDicomTags"]["SOPInstanceUID"] == "1.2.3.4.0"
    [expanded] = rest_client.get("/studies", params={"expand": ""}).json()
    assert expanded == study
    r = rest_client.get(f"/instances/{ids.instance}/file")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    assert r.content == paths[0].read_bytes()
    assert pydicom.dcmread(paths[0]).SOPInstanceUID == "1.2.3.4.0"


def test_errors_have_orthancs_shape_and_name_the_problem(rest_client: TestClient) -> None:
    r = rest_client.get("/studies/nope")
    assert r.status_code == 404
    body = r.json()
    assert body["HttpStatus"] == 404 and body["OrthancStatus"] == 17 and body["Uri"] == "/studies/nope"
    assert "nope" in body["Details"] and body["Method"] == "GET"
    assert rest_client.get("/instances/nope/file").status_code == 404
    r = rest_client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["OrthancError"] == "Unknown resource"
    r = rest_client.get("/instances", params={"limit": "many"})
    assert r.status_code == 400 and "limit" in r.json()["Details"]


def test_upload_stores_like_the_receiver_and_answers_orthancs_shape(rest_client: TestClient, tmp_path: Path) -> None:
    path = make_instance(tmp_path / "a.dcm", patient_id="P9", study_uid="1.9", series_uid="1.9.1", sop_uid="1.9.1.1")
    data = path.read_bytes()
    first = rest_client.post("/instances", content=data)
    assert first.status_code == 200, first.text
    ids = resource_ids("P9", "1.9", "1.9.1", "1.9.1.1")
    expected = {"ID": ids.instance, "ParentPatient": ids.patient, "ParentSeries": ids.series,
                "ParentStudy": ids.study, "Path": f"/instances/{ids.instance}", "Status": "Success"}  # fmt: skip
    assert first.json() == expected
    assert rest_client.post("/instances", content=data).json()["Status"] == "AlreadyStored"
    assert rest_client.get(f"/instances/{ids.instance}/file").content == data
    for bad, why in ((b"", "empty body"), (b"not dicom at all" * 20, "not a storable DICOM instance"),
                     (data[:-100], "truncated")):  # fmt: skip
        r = rest_client.post("/instances", content=bad)
        assert r.status_code == 400 and why in r.json()["Details"], r.text
    assert rest_client.get("/statistics").json()["CountInstances"] == 1


def test_authentication_when_enabled(rest_archive: Archive, tmp_path: Path) -> None:
    cfg = config.build(None, {"StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path),
                              "AuthenticationEnabled": True, "RegisteredUsers": {"alice": "s3cret"}})  # fmt: skip
    rest_client = TestClient(create_app(cfg, rest_archive))
    r = rest_client.get("/system")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert r.json()["HttpStatus"] == 401
    assert rest_client.get("/system", auth=("alice", "wrong")).status_code == 401
    assert rest_client.get("/system", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert rest_client.get("/system", auth=("alice", "s3cret")).status_code == 200


def test_the_served_node_answers_rest_on_loopback_only(node_factory) -> None:
    import json
    import urllib.request

    node = node_factory().start()
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/system", timeout=2) as r:
                system = json.load(r)
            break
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(node.log())
            time.sleep(0.1)
    assert system["DicomAet"] == node.aet and system["HttpPort"] == node.http_port
    listening = Path("/proc/net/tcp").read_text()
    assert f"0100007F:{node.http_port:04X}" in listening  # 127.0.0.1, not 0.0.0.0
    assert f"00000000:{node.http_port:04X}" not in listening


def test_children_parents_metadata_changes_and_delete(rest_client: TestClient, rest_archive: Archive,
                                                      tmp_path: Path) -> None:  # fmt: skip
    for i in range(3):
        store_file(rest_archive, make_instance(tmp_path / f"{i}.dcm", patient_id="P8", study_uid="1.8",
                                               series_uid=f"1.8.{i % 2}", sop_uid=f"1.8.{i % 2}.{i}"))  # fmt: skip
    ids = resource_ids("P8", "1.8", "1.8.0", "1.8.0.0")
    series = rest_client.get(f"/studies/{ids.study}/series").json()
    assert len(series) == 2 and all(s["Type"] == "Series" for s in series)
    assert len(rest_client.get(f"/patients/{ids.patient}/instances", params={"expand": "false"}).json()) == 3
    assert rest_client.get(f"/instances/{ids.instance}/study").json()["ID"] == ids.study
    assert rest_client.get(f"/series/{ids.series}/patient").json()["ID"] == ids.patient
    meta = rest_client.get(f"/instances/{ids.instance}/metadata", params={"expand": ""}).json()
    assert meta["Origin"] == "DicomProtocol" and meta["RemoteAET"] == "MOD" and meta["IndexInSeries"] == "1"
    assert rest_client.get(f"/instances/{ids.instance}/metadata/RemoteAET").text == "MOD"
    assert rest_client.get(f"/instances/{ids.instance}/metadata/Nope").status_code == 404
    changes = rest_client.get("/changes", params={"limit": 2}).json()
    assert [c["ChangeType"] for c in changes["Changes"]] == ["NewPatient", "NewStudy"] and not changes["Done"]
    rest = rest_client.get("/changes", params={"since": changes["Last"], "limit": 100}).json()
    assert rest["Done"] and rest["Changes"][-1]["ChangeType"] == "NewInstance"
    assert rest_client.get("/changes", params={"last": ""}).json()["Changes"] == [rest["Changes"][-1]]
    gone = rest_client.delete(f"/series/{ids.series}").json()
    assert gone["RemainingAncestor"] == {"ID": ids.study, "Path": f"/studies/{ids.study}", "Type": "Study"}
    assert rest_client.get(f"/series/{ids.series}").status_code == 404
    assert rest_client.get("/statistics").json()["CountInstances"] == 1
    assert rest_client.delete(f"/patients/{ids.patient}").json() == {"RemainingAncestor": None}
    assert rest_client.get("/patients").json() == []
    assert not [p for p in (tmp_path / "storage").glob("??/*")]  # the files went too
    assert rest_client.delete(f"/patients/{ids.patient}").status_code == 404


def test_lookup_finds_resources_by_identifier(rest_client: TestClient, rest_archive: Archive, tmp_path: Path) -> None:
    store_file(rest_archive, make_instance(tmp_path / "a.dcm", patient_id="P3", study_uid="1.3", series_uid="1.3.1",
                                           sop_uid="1.3.1.1", AccessionNumber="ACC3"))  # fmt: skip
    ids = resource_ids("P3", "1.3", "1.3.1", "1.3.1.1")
    assert rest_client.post("/tools/lookup", content=b"1.3").json() == [
        {"ID": ids.study, "Path": f"/studies/{ids.study}", "Type": "Study"}]  # fmt: skip
    assert rest_client.post("/tools/lookup", content=b"ACC3").json()[0]["ID"] == ids.study
    assert rest_client.post("/tools/lookup", content=b"P3").json()[0]["Type"] == "Patient"
    assert rest_client.post("/tools/lookup", content=b"1.3.1.1").json()[0]["ID"] == ids.instance
    assert rest_client.post("/tools/lookup", content=b"9.9").json() == []
    assert rest_client.post("/tools/lookup", content=b"").status_code == 400
