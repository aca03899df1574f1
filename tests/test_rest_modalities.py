"""``/modalities`` and ``/queries`` against real peers: DCMTK ``storescp`` (C-STORE, C-ECHO), ``dcmqrscp`` (C-FIND,
C-MOVE) and a running node (DCMTK ``storescu`` fills it; its REST API sends, queries and retrieves)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import dcmtk, dcmtk_env, free_port, make_instance, run
from fastapi.testclient import TestClient
from test_gateway import StoreSCP, wait_for
from test_scp import storescu

from node import config
from node.archive.store import Archive
from node.dicom.ids import resource_ids
from node.rest.app import create_app


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "received", aet="STORESCP").start()
    yield scp
    scp.stop()


def job_done(http: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = http.get(f"/jobs/{job_id}").json()
        if job["State"] in ("Success", "Failure"):
            return job  # type: ignore[no-any-return]
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not end")


def study_files(folder: Path, patient: str, study: str, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [make_instance(folder / f"{i}.dcm", patient_id=patient, study_uid=study, series_uid=f"{study}.1",
                          sop_uid=f"{study}.1.{i}", InstanceNumber=i + 1) for i in range(n)]  # fmt: skip


# -- definitions ------------------------------------------------------------------------------------------------


def test_put_get_delete_with_validation_and_persistence(rest_client: TestClient, rest_archive: Archive,
                                                          tmp_path: Path) -> None:  # fmt: skip
    assert rest_client.get("/modalities").json() == []
    r = rest_client.put("/modalities/pacs", json={"AET": "PACS", "Host": "10.0.0.7", "Port": 104,
                                                    "AllowStore": False, "Manufacturer": "GE"})  # fmt: skip
    assert r.status_code == 200 and r.text == ""
    assert rest_client.get("/modalities").json() == ["pacs"]
    conf = rest_client.get("/modalities/pacs/configuration").json()
    assert conf["AET"] == "PACS" and conf["Port"] == 104 and conf["AllowStore"] is False and conf["AllowEcho"] is True
    assert conf["Manufacturer"] == "GE" and conf["AllowFindWorklist"] is True and conf["UseDicomTls"] is False
    assert rest_client.get("/modalities", params={"expand": ""}).json() == {"pacs": conf}
    assert "store" in rest_client.get("/modalities/pacs").json()
    rest_client.put("/modalities/old", json=["OLD", "10.0.0.8", "11112"])  # Orthanc's array form, port as text
    assert rest_client.get("/modalities/old/configuration").json()["Port"] == 11112

    ok = {"AET": "X", "Host": "h", "Port": 1}
    for body, field_name in (({"AET": "X", "Host": "h"}, "'Port'"), ({**ok, "Port": 70000}, "'Port'"),
                             ({**ok, "AET": "A" * 17}, "'AET'"), ({"AET": "X", "Port": 1}, "'Host'"),
                             ({**ok, "AllowEcho": "yes"}, "'AllowEcho'"), ({**ok, "AllowStroe": True}, "'AllowStore'"),
                             ({**ok, "Manufacturer": "Acme"}, "'Manufacturer'")):  # fmt: skip
        r = rest_client.put("/modalities/bad", json=body)
        assert r.status_code == 400 and field_name in r.json()["Details"], (body, r.json())
    assert rest_client.put("/modalities/@x", json={"AET": "X", "Host": "h", "Port": 1}).status_code == 400
    assert rest_client.put("/modalities/" + "n" * 65, json={"AET": "X", "Host": "h", "Port": 1}).status_code == 400
    assert rest_client.put("/modalities/bad", content=b"{").status_code == 400
    assert rest_client.get("/modalities").json() == ["old", "pacs"]

    # a new app on the same index (a restart, or another process) sees them
    cfg = config.build(None, {"StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path)},
                       environ={})  # fmt: skip
    again = TestClient(create_app(cfg, rest_archive))
    assert again.get("/modalities/pacs/configuration").json() == conf
    assert again.delete("/modalities/pacs").status_code == 200
    assert rest_client.get("/modalities").json() == ["old"]
    r = rest_client.get("/modalities/pacs")
    assert r.status_code == 404 and "pacs" in r.json()["Details"]
    assert rest_client.delete("/modalities/pacs").status_code == 404


def test_configured_modalities_are_listed_overridden_and_guarded(rest_archive: Archive, tmp_path: Path) -> None:
    cfg = config.build(None, {"StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path),
                              "DicomModalities": {"dest": ["DEST", "127.0.0.1", 104], "other": {
                                  "AET": "OTHER", "Host": "h", "Port": 105, "AllowMove": False}},
                              "Routes": [{"Name": "fwd", "Forward": ["dest"]}]}, environ={})  # fmt: skip
    http = TestClient(create_app(cfg, rest_archive))
    assert http.get("/modalities").json() == ["dest", "other"]
    assert http.get("/modalities/other/configuration").json()["AllowMove"] is False
    r = http.delete("/modalities/dest")
    assert r.status_code == 400 and "fwd" in r.json()["Details"]  # a route forwards to it
    r = http.delete("/modalities/other")
    assert r.status_code == 400 and "configuration file" in r.json()["Details"]
    http.put("/modalities/other", json={"AET": "OTHER2", "Host": "h", "Port": 106})  # overrides the file's
    assert http.get("/modalities/other/configuration").json()["AET"] == "OTHER2"
    assert http.delete("/modalities/other").status_code == 200  # the override goes; the file's is back
    assert http.get("/modalities/other/configuration").json()["AET"] == "OTHER"


# -- C-ECHO -------------------------------------------------------------------------------------------------


def test_echo_succeeds_against_storescp_and_names_the_failure_otherwise(rest_client: TestClient,
                                                                         dest: StoreSCP) -> None:  # fmt: skip
    rest_client.put("/modalities/scp", json={"AET": dest.aet, "Host": "127.0.0.1", "Port": dest.port})
    r = rest_client.post("/modalities/scp/echo")
    assert r.status_code == 200 and r.json() == {}
    assert rest_client.post("/modalities/scp/echo", json={"Timeout": 5}).json() == {}
    closed = free_port()
    rest_client.put("/modalities/down", json={"AET": "DOWN", "Host": "127.0.0.1", "Port": closed})
    r = rest_client.post("/modalities/down/echo", json={"Timeout": 3})
    body = r.json()
    assert r.status_code == 500 and body["OrthancStatus"] == 9 and body["Uri"] == "/modalities/down/echo"
    assert "'down'" in body["Details"] and f"127.0.0.1:{closed}" in body["Details"]
    assert "cannot connect" in body["Details"]
    assert rest_client.post("/modalities/nope/echo").status_code == 404


# -- C-STORE ------------------------------------------------------------------------------------------------


def test_store_round_trip_storescu_node_storescp(node_factory: Any, dest: StoreSCP, tmp_path: Path) -> None:
    node = node_factory().start()
    originals = study_files(tmp_path / "in", "ST1", "1.2.826.0.1.9", 3)
    assert storescu(node, originals).returncode == 0
    http = node.rest()
    ids = resource_ids("ST1", "1.2.826.0.1.9", "1.2.826.0.1.9.1", "1.2.826.0.1.9.1.0")
    assert http.put("/modalities/x", json={"AET": dest.aet, "Host": "127.0.0.1", "Port": dest.port}).status_code == 200

    r = http.post("/modalities/x/store", content=ids.study)  # Orthanc's bare-ID body, synchronous by default
    assert r.status_code == 200, r.text
    assert r.json() == {"Description": "REST API", "FailedInstancesCount": 0, "InstancesCount": 3,
                        "LocalAet": "DICOMNODE", "ParentResources": [ids.study], "RemoteAet": "STORESCP"}  # fmt: skip
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in originals}
    received = dest.datasets()
    assert len(received) == 3 and all(ds == by_uid[str(ds.SOPInstanceUID)] for ds in received)
    sent = [e for e in node.events("sent") if e.get("destination") == "x"]
    assert {e["instance"] for e in sent} == {i["ID"] for i in http.get(f"/studies/{ids.study}/instances").json()}
    assert all(e["study"] == ids.study and e["job"] and e["sop_instance_uid"] in by_uid for e in sent)

    for f in dest.files():
        f.unlink()
    r = http.post("/modalities/x/store", json={"Resources": [ids.series, ids.instance], "Asynchronous": True,
                                               "LocalAet": "OTHERAET"})  # fmt: skip
    job = r.json()
    assert r.status_code == 200 and job["Path"] == f"/jobs/{job['ID']}"
    done = job_done(http, job["ID"])
    assert done["State"] == "Success" and done["Type"] == "DicomModalityStore" and done["Progress"] == 100
    assert done["Content"]["InstancesCount"] == 3 and done["Content"]["LocalAet"] == "OTHERAET"
    wait_for(lambda: len(dest.files()) == 3, 10, "the asynchronous store")
    assert sorted(str(d.SOPInstanceUID) for d in dest.datasets()) == sorted(by_uid)


def test_store_refuses_unknown_ids_before_sending_and_fails_on_a_down_destination(
    node_factory: Any, dest: StoreSCP, tmp_path: Path
) -> None:
    node = node_factory().start()
    assert storescu(node, study_files(tmp_path / "in", "ST2", "1.2.826.0.1.8", 2)).returncode == 0
    http = node.rest()
    study = resource_ids("ST2", "1.2.826.0.1.8", "", "").study
    http.put("/modalities/x", json={"AET": dest.aet, "Host": "127.0.0.1", "Port": dest.port})
    unknown = "0" * 8 + "-00000000" * 4
    r = http.post("/modalities/x/store", json=[study, unknown])
    assert r.status_code == 404 and unknown in r.json()["Details"]
    assert http.post("/modalities/x/store", json=["not-an-id"]).status_code == 400
    assert http.post("/modalities/x/store", json={"Resources": [study], "StorageCommitment": True}).status_code == 400
    assert http.post("/modalities/nope/store", json=[study]).status_code == 404
    time.sleep(0.3)
    assert dest.files() == [] and node.events("sent") == []

    closed = free_port()
    http.put("/modalities/down", json={"AET": "DOWN", "Host": "127.0.0.1", "Port": closed})
    r = http.post("/modalities/down/store", json={"Resources": [study], "Timeout": 3})
    body = r.json()
    assert r.status_code == 500 and body["OrthancStatus"] == 9
    assert body["OrthancError"] == "Error in the network protocol"
    assert "'down'" in body["Details"] and f"127.0.0.1:{closed}" in body["Details"]
    r = http.post("/modalities/down/store", json={"Resources": [study], "Asynchronous": True})
    job = job_done(http, r.json()["ID"])
    assert job["State"] == "Failure" and job["ErrorCode"] == 9 and "'down'" in job["ErrorDetails"]
    assert len([e for e in node.events("failed") if e.get("destination") == "down"]) == 4


# -- C-FIND / C-MOVE against DCMTK dcmqrscp --------------------------------------------------------------------


@dataclass
class QRSCP:
    """DCMTK's dcmqrscp: a real query/retrieve SCP whose archive is filled with storescu."""

    folder: Path
    move_targets: dict[str, int]
    port: int = field(default_factory=free_port)
    aet: str = "QRSCP"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> QRSCP:
        (self.folder / "db").mkdir(parents=True)
        targets = enumerate(self.move_targets.items())
        hosts = "\n".join(f"t{i} = ({aet}, 127.0.0.1, {port})" for i, (aet, port) in targets)
        cfg = self.folder / "dcmqrscp.cfg"
        cfg.write_text(f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
                       f"HostTable BEGIN\n{hosts}\nHostTable END\n\nVendorTable BEGIN\nVendorTable END\n\n"
                       f"AETable BEGIN\n{self.aet} {self.folder / 'db'} RW (200, 1024mb) ANY\n"
                       f"AETable END\n")  # fmt: skip
        # one process per association (its default): DCMTK 3.6.7's --single-process crashes after a C-STORE
        self.proc = subprocess.Popen([dcmtk("dcmqrscp"), "-c", str(cfg), "-dhl", str(self.port)], env=dcmtk_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)  # fmt: skip
        time.sleep(0.5)
        return self

    def load(self, files: list[Path]) -> None:
        r = run([dcmtk("storescu"), "-aec", self.aet, "127.0.0.1", str(self.port), *map(str, files)])
        assert r.returncode == 0, r.stderr

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # with the children serving associations
            self.proc.wait(10)


def test_query_answers_and_retrieve_from_dcmqrscp_into_the_node(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory()
    qrscp = QRSCP(tmp_path / "qr", {node.aet: node.port}).start()
    try:
        node.start()
        studies = {uid: study_files(tmp_path / uid, "QR7", uid, 2) for uid in ("1.2.826.0.1.71", "1.2.826.0.1.72",
                                                                              "1.2.826.0.1.73")}  # fmt: skip
        qrscp.load([p for files in studies.values() for p in files])
        http = node.rest()
        http.put("/modalities/qr", json={"AET": qrscp.aet, "Host": "127.0.0.1", "Port": qrscp.port})
        assert http.post("/modalities/qr/echo", json={"CheckFind": True}).json() == {}

        find = {"Level": "Study", "Query": {"PatientID": "QR7", "StudyDescription": "*"}}
        r = http.post("/modalities/qr/query", json=find)
        assert r.status_code == 200, r.text
        query = r.json()
        assert query["Path"] == f"/queries/{query['ID']}" and query["ID"] in http.get("/queries").json()
        base = query["Path"]
        assert http.get(f"{base}/answers").json() == ["0", "1", "2"]
        full = http.get(f"{base}/answers", params={"expand": ""}).json()
        assert {a["0020,000d"]["Value"] for a in full} == set(studies)
        assert full[0]["0020,000d"]["Name"] == "StudyInstanceUID"
        content = http.get(f"{base}/answers/1/content", params={"simplify": ""}).json()
        assert content["PatientID"] == "QR7" and content["StudyInstanceUID"] in studies
        assert http.get(f"{base}/level").text == "Study" and http.get(f"{base}/modality").text == "qr"
        assert http.get(f"{base}/query", params={"short": ""}).json()["0010,0020"] == "QR7"
        assert http.get(f"{base}/answers/3/content").status_code == 400

        # retrieve one answer (body: the target AE title as plain text), synchronously
        first = content["StudyInstanceUID"]
        r = http.post(f"{base}/answers/1/retrieve", content=node.aet)
        assert r.status_code == 200, r.text
        moved = r.json()
        assert moved["TargetAet"] == node.aet and moved["RemoteAet"] == "QRSCP" and moved["Query"] == [
            {"0008,0052": "STUDY", "0020,000d": first}]  # fmt: skip
        ids = {uid: resource_ids("QR7", uid, "", "").study for uid in studies}
        assert http.get("/studies").json() == [ids[first]]
        assert len(http.get(f"/studies/{ids[first]}/instances").json()) == 2

        # every answer, as a job
        job = http.post(f"{base}/retrieve", json={"TargetAet": node.aet, "Asynchronous": True}).json()
        assert job_done(http, job["ID"])["State"] == "Success"
        assert sorted(http.get("/studies").json()) == sorted(ids.values())

        r = http.post(f"{base}/retrieve", json={"TargetAet": "NOBODY"})
        assert r.status_code == 500 and "0xA801" in r.json()["Details"] and "NOBODY" in r.json()["Details"]
        assert http.delete(base).status_code == 200
        assert http.get(base).status_code == 404 and query["ID"] not in http.get("/queries").json()
    finally:
        qrscp.stop()


def test_move_by_identifiers_and_series_query(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory()
    qrscp = QRSCP(tmp_path / "qr", {node.aet: node.port}).start()
    try:
        node.start()
        files = study_files(tmp_path / "s", "QR8", "1.2.826.0.1.81", 3)
        qrscp.load(files)
        http = node.rest()
        http.put("/modalities/qr", json={"AET": qrscp.aet, "Host": "127.0.0.1", "Port": qrscp.port})
        query = http.post("/modalities/qr/query", json={"Level": "Series", "Query": {
            "StudyInstanceUID": "1.2.826.0.1.81", "Modality": ""}}).json()  # fmt: skip
        [series] = http.get(f"{query['Path']}/answers", params={"expand": "", "simplify": ""}).json()
        assert series["SeriesInstanceUID"] == "1.2.826.0.1.81.1" and series["Modality"] == "CT"
        r = http.post("/modalities/qr/move", json={"Level": "Series", "TargetAet": node.aet, "Resources": [
            {"StudyInstanceUID": "1.2.826.0.1.81", "SeriesInstanceUID": "1.2.826.0.1.81.1"}]})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["Query"][0]["0020,000e"] == "1.2.826.0.1.81.1"
        assert len(http.get("/instances").json()) == 3
        for f in files:
            ds = pydicom.dcmread(f)
            assert pydicom.dcmread(node.file_of(str(ds.SOPInstanceUID))) == ds
        r = http.post("/modalities/qr/move", json={"Level": "Study", "Resources": [{"NoSuchTag": "1"}]})
        assert r.status_code == 400 and "NoSuchTag" in r.json()["Details"]
        r = http.post("/modalities/qr/query", json={"Level": "Galaxy"})
        assert r.status_code == 400 and "Level" in r.json()["Details"]
    finally:
        qrscp.stop()
