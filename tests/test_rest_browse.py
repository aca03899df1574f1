"""The REST API's first routes (system, statistics, tools, browsing, file download) on a real SQLite archive."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from conftest import make_instance
from fastapi.testclient import TestClient

from node import config
from node.archive.store import Archive, Origin, open_archive, store
from node.dicom.ids import resource_ids
from node.dicom.maintags import read_index_tags
from node.rest.app import create_app


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return open_archive(f"sqlite:///{tmp_path}/index.db", tmp_path / "storage")


@pytest.fixture
def client(archive: Archive, tmp_path: Path) -> TestClient:
    cfg = config.build(None, {"StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path),
                              "DicomAet": "RESTNODE"})  # fmt: skip
    return TestClient(create_app(cfg, archive))


def put(archive: Archive, path: Path) -> None:
    spool = archive.storage.new_spool()
    spool.write(path.read_bytes())
    archive.db.connect(reuse_if_open=True)
    store(archive, spool, read_index_tags(spool.name), Origin("DicomProtocol", "MOD", "NODE", "127.0.0.1"))


def test_system_statistics_and_tools(client: TestClient) -> None:
    system = client.get("/system").json()
    assert system["DicomAet"] == "RESTNODE" and system["ApiVersion"] >= 18 and system["Name"] == "dicom-node"
    assert client.get("/statistics").json()["CountInstances"] == 0
    assert len(client.get("/tools/now").json()) == 15
    assert client.get("/tools/generate-uid", params={"level": "study"}).json().startswith("1.2.826.0.1.3680043")
    assert len(client.get("/tools/generate-uid", params={"level": "patient"}).json()) == 36
    r = client.get("/tools/generate-uid", params={"level": "frame"})
    assert r.status_code == 400 and "level must be one of" in r.json()["Details"]


def test_browse_every_level_in_orthancs_shapes(client: TestClient, archive: Archive, tmp_path: Path) -> None:
    paths = [make_instance(tmp_path / f"{i}.dcm", patient_id="P7", study_uid="1.2.3", series_uid="1.2.3.4",
                           sop_uid=f"1.2.3.4.{i}", InstanceNumber=i + 1, StudyDescription="HEAD")
             for i in range(2)]  # fmt: skip
    for p in paths:
        put(archive, p)
    ids = resource_ids("P7", "1.2.3", "1.2.3.4", "1.2.3.4.0")
    assert client.get("/patients").json() == [ids.patient]
    assert client.get("/studies").json() == [ids.study]
    assert len(client.get("/instances").json()) == 2
    assert len(client.get("/instances", params={"limit": 1}).json()) == 1
    assert len(client.get("/instances", params={"since": 1}).json()) == 1
    patient = client.get(f"/patients/{ids.patient}").json()
    assert patient["Type"] == "Patient" and patient["Studies"] == [ids.study]
    assert patient["MainDicomTags"]["PatientID"] == "P7"
    study = client.get(f"/studies/{ids.study}").json()
    assert study["ParentPatient"] == ids.patient and study["Series"] == [ids.series]
    assert study["MainDicomTags"]["StudyDescription"] == "HEAD" and study["PatientMainDicomTags"]["PatientID"] == "P7"
    assert study["IsStable"] is False and len(study["LastUpdate"]) == 15
    series = client.get(f"/series/{ids.series}").json()
    assert series["ParentStudy"] == ids.study and len(series["Instances"]) == 2 and series["Type"] == "Series"
    instance = client.get(f"/instances/{ids.instance}").json()
    assert instance["ParentSeries"] == ids.series and instance["IndexInSeries"] == 1
    assert instance["MainDicomTags"]["SOPInstanceUID"] == "1.2.3.4.0"
    [expanded] = client.get("/studies", params={"expand": ""}).json()
    assert expanded == study
    r = client.get(f"/instances/{ids.instance}/file")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    assert r.content == paths[0].read_bytes()
    assert pydicom.dcmread(paths[0]).SOPInstanceUID == "1.2.3.4.0"


def test_errors_have_orthancs_shape_and_name_the_problem(client: TestClient) -> None:
    r = client.get("/studies/nope")
    assert r.status_code == 404
    body = r.json()
    assert body["HttpStatus"] == 404 and body["OrthancStatus"] == 17 and body["Uri"] == "/studies/nope"
    assert "nope" in body["Details"] and body["Method"] == "GET"
    assert client.get("/instances/nope/file").status_code == 404
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["OrthancError"] == "Unknown resource"
    r = client.get("/instances", params={"limit": "many"})
    assert r.status_code == 400 and "limit" in r.json()["Details"]


def test_upload_stores_like_the_receiver_and_answers_orthancs_shape(client: TestClient, tmp_path: Path) -> None:
    path = make_instance(tmp_path / "a.dcm", patient_id="P9", study_uid="1.9", series_uid="1.9.1", sop_uid="1.9.1.1")
    data = path.read_bytes()
    first = client.post("/instances", content=data)
    assert first.status_code == 200, first.text
    ids = resource_ids("P9", "1.9", "1.9.1", "1.9.1.1")
    expected = {"ID": ids.instance, "ParentPatient": ids.patient, "ParentSeries": ids.series,
                "ParentStudy": ids.study, "Path": f"/instances/{ids.instance}", "Status": "Success"}  # fmt: skip
    assert first.json() == expected
    assert client.post("/instances", content=data).json()["Status"] == "AlreadyStored"
    assert client.get(f"/instances/{ids.instance}/file").content == data
    for bad, why in ((b"", "empty body"), (b"not dicom at all" * 20, "not a storable DICOM instance"),
                     (data[:-100], "truncated")):  # fmt: skip
        r = client.post("/instances", content=bad)
        assert r.status_code == 400 and why in r.json()["Details"], r.text
    assert client.get("/statistics").json()["CountInstances"] == 1


def test_authentication_when_enabled(archive: Archive, tmp_path: Path) -> None:
    cfg = config.build(None, {"StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path),
                              "AuthenticationEnabled": True, "RegisteredUsers": {"alice": "s3cret"}})  # fmt: skip
    client = TestClient(create_app(cfg, archive))
    r = client.get("/system")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert r.json()["HttpStatus"] == 401
    assert client.get("/system", auth=("alice", "wrong")).status_code == 401
    assert client.get("/system", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert client.get("/system", auth=("alice", "s3cret")).status_code == 200


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
