"""Series/study/patient ``/modify`` and ``/anonymize``, bulk routes and ``/jobs`` (spec §4.2, §4.3; edge cases
1, 17-34), on a real SQLite archive with files read back tag by tag."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import make_instance, store_file
from fastapi.testclient import TestClient

from node import config
from node.archive.store import Archive, open_archive
from node.dicom.ids import resource_ids
from node.rest.app import create_app


@pytest.fixture
def study(rest_archive: Archive, tmp_path: Path) -> dict[str, Any]:
    """Patient P9, study 1.9 with 2 series of 2 instances."""
    for s in (1, 2):
        for i in (1, 2):
            store_file(rest_archive, make_instance(
                tmp_path / f"s{s}i{i}.dcm", patient_id="P9", study_uid="1.9", series_uid=f"1.9.{s}",
                sop_uid=f"1.9.{s}.{i}", PatientName="Doe^John", StudyDescription="KNEE", SeriesDescription=f"S{s}",
                InstitutionName="General", StationName="CT1", InstanceNumber=i, PatientBirthDate="19700101",
                PatientSex="M"))  # fmt: skip
    ids = resource_ids("P9", "1.9", "1.9.1", "1.9.1.1")
    return {"patient": ids.patient, "study": ids.study, "series": ids.series, "instance": ids.instance,
            "series2": resource_ids("P9", "1.9", "1.9.2", "x").series}  # fmt: skip


def read(client: TestClient, instance_id: str) -> pydicom.Dataset:
    import io

    r = client.get(f"/instances/{instance_id}/file")
    assert r.status_code == 200
    return pydicom.dcmread(io.BytesIO(r.content))


def instances_of(client: TestClient, level: str, public_id: str) -> list[pydicom.Dataset]:
    ids = [i["ID"] for i in client.get(f"/{level}/{public_id}/instances").json()]
    return [read(client, i) for i in ids]


def ok(r: Any) -> Any:
    assert r.status_code == 200, r.text
    return r.json()


def test_study_anonymize_makes_a_new_patient_and_keeps_the_source(rest_client: TestClient, study: dict) -> None:
    out = ok(rest_client.post(f"/studies/{study['study']}/anonymize", json={}))  # edge case 1
    assert out["Type"] == "Study" and out["Path"] == f"/studies/{out['ID']}" and out["InstancesCount"] == 4
    assert out["IsAnonymization"] is True and out["ParentResources"] == [study["study"]]
    assert out["FailedInstancesCount"] == 0 and out["Description"] == "REST API"
    assert len(out["PatientID"]) == 44 and out["PatientID"] != study["patient"]  # an Orthanc ID (case 60)
    new = instances_of(rest_client, "studies", out["ID"])
    assert len(new) == 4
    assert len({d.PatientID for d in new}) == 1 and len(new[0].PatientID) == 36
    assert {str(d.PatientName) for d in new} == {"Anonymized1"}
    assert {d.StudyInstanceUID for d in new} != {"1.9"} and len({d.StudyInstanceUID for d in new}) == 1
    assert len({d.SeriesInstanceUID for d in new}) == 2 and len({d.SOPInstanceUID for d in new}) == 4
    assert all(d.PatientIdentityRemoved == "YES" and "InstitutionName" not in d for d in new)
    assert all(d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for d in new)
    assert len(ok(rest_client.get("/studies"))) == 2  # KeepSource defaults to true
    # AnonymizedFrom at every level whose ID changed
    assert rest_client.get(f"/studies/{out['ID']}/metadata/AnonymizedFrom").text == study["study"]
    assert rest_client.get(f"/patients/{out['PatientID']}/metadata/AnonymizedFrom").text == study["patient"]
    inst = ok(rest_client.get(f"/studies/{out['ID']}/instances"))[0]["ID"]
    origin = rest_client.get(f"/instances/{inst}/metadata/AnonymizedFrom").text
    assert origin in ok(rest_client.get("/instances")) and origin != inst
    assert ok(rest_client.get(f"/instances/{inst}/metadata?expand"))["Origin"] == "RestApi"
    # a second anonymization is another patient, another name
    again = ok(rest_client.post(f"/studies/{study['study']}/anonymize", json={}))
    assert again["ID"] != out["ID"] and str(read(rest_client, ok(rest_client.get(
        f"/studies/{again['ID']}/instances"))[0]["ID"]).PatientName) == "Anonymized2"  # fmt: skip


def test_series_modify_stays_in_the_study_and_records_modified_from(rest_client: TestClient, study: dict) -> None:
    out = ok(rest_client.post(f"/series/{study['series']}/modify", json={"Replace": {"SeriesDate": "19990101"}}))
    assert out["Type"] == "Series" and out["ID"] != study["series"] and out["InstancesCount"] == 2
    new = ok(rest_client.get(f"/series/{out['ID']}"))
    assert new["ParentStudy"] == study["study"]  # edge case 17
    assert rest_client.get(f"/series/{out['ID']}/metadata/ModifiedFrom").text == study["series"]  # case 18
    assert "ModifiedFrom" not in ok(rest_client.get(f"/studies/{study['study']}/metadata"))  # same study ID
    for ds in instances_of(rest_client, "series", out["ID"]):
        assert ds.SeriesDate == "19990101" and ds.StudyInstanceUID == "1.9" and ds.SeriesInstanceUID != "1.9.1"
        assert ds.SOPInstanceUID not in ("1.9.1.1", "1.9.1.2")


def test_study_modify_keeps_the_series_structure(rest_client: TestClient, study: dict) -> None:
    out = ok(rest_client.post(f"/studies/{study['study']}/modify", json={"Replace": {"StationName": "TEST"}}))
    new = ok(rest_client.get(f"/studies/{out['ID']}"))
    assert len(new["Series"]) == 2  # edge case 19
    sources = {rest_client.get(f"/series/{s}/metadata/ModifiedFrom").text for s in new["Series"]}
    assert sources == {study["series"], study["series2"]}
    datasets = instances_of(rest_client, "studies", out["ID"])
    assert {d.StationName for d in datasets} == {"TEST"} and {d.PatientID for d in datasets} == {"P9"}
    assert "1.9" not in {d.StudyInstanceUID for d in datasets}
    # the study is attached to the same patient (PatientID untouched)
    assert new["ParentPatient"] == study["patient"]


def test_keep_source_false_removes_the_source_after_success(rest_client: TestClient, study: dict) -> None:
    ok(rest_client.post(f"/studies/{study['study']}/modify", json={"Replace": {"StationName": "X"},
                                                                   "KeepSource": False}))  # fmt: skip
    assert len(ok(rest_client.get("/studies"))) == 1  # edge case 21
    assert study["study"] not in ok(rest_client.get("/studies"))
    out = ok(rest_client.post(f"/studies/{ok(rest_client.get('/studies'))[0]}/anonymize", json={"KeepSource": False}))
    assert ok(rest_client.get("/studies")) == [out["ID"]]  # edge case 22
    assert ok(rest_client.get("/statistics"))["CountInstances"] == 4


def test_bulk_modify_level_rules(rest_client: TestClient, study: dict) -> None:
    out = ok(rest_client.post("/tools/bulk-modify", json={"Resources": [study["study"]], "Replace": {}}))
    types = [r["Type"] for r in out["Resources"]]
    assert types == ["Instance"] * 4 + ["Series"] * 2 + ["Study", "Patient"]  # type order, sorted inside
    assert [r["ID"] for r in out["Resources"] if r["Type"] == "Study"] == [study["study"]]  # edge case 23
    assert out["ParentResources"] == [study["study"]] and out["IsAnonymization"] is False
    assert ok(rest_client.get("/statistics"))["CountInstances"] == 8
    out = ok(rest_client.post("/tools/bulk-modify", json={"Level": "Study", "Resources": [study["study"]],
                                                         "Replace": {}}))  # fmt: skip
    new_study = [r["ID"] for r in out["Resources"] if r["Type"] == "Study"]
    assert new_study != [study["study"]]  # edge case 24
    ok(rest_client.delete(f"/studies/{new_study[0]}"))
    assert study["study"] in ok(rest_client.get("/studies"))


def test_bulk_anonymize_two_patients_in_one_job(rest_client: TestClient, rest_archive: Archive, study: dict,
                                                tmp_path: Path) -> None:  # fmt: skip
    store_file(rest_archive, make_instance(tmp_path / "b.dcm", patient_id="Q1", study_uid="2.1", series_uid="2.1.1",
                                           sop_uid="2.1.1.1"))  # fmt: skip
    other = resource_ids("Q1", "2.1", "2.1.1", "2.1.1.1")
    out = ok(rest_client.post("/tools/bulk-anonymize", json={"Resources": [study["instance"], other.instance]}))
    by_type = {t: [r["ID"] for r in out["Resources"] if r["Type"] == t] for t in ("Instance", "Study", "Patient")}
    assert len(by_type["Instance"]) == 2 and len(by_type["Study"]) == 2 and len(by_type["Patient"]) == 2  # case 26
    for level, ids in (("instances", by_type["Instance"]), ("studies", by_type["Study"])):
        for i in ids:
            assert rest_client.get(f"/{level}/{i}/metadata/AnonymizedFrom").status_code == 200
    r = rest_client.post("/tools/bulk-anonymize", json={"Resources": ["nope"]})
    assert r.status_code == 404
    r = rest_client.post("/tools/bulk-anonymize", json={})
    assert r.status_code == 400 and "Resources" in r.json()["Details"]


def test_uid_changes_need_force(rest_client: TestClient, study: dict) -> None:
    r = rest_client.post(f"/studies/{study['study']}/modify", json={"Replace": {"StudyInstanceUID": "1.2"}})
    assert r.status_code == 400  # edge case 27
    r = rest_client.post(f"/series/{study['series']}/modify", json={"Replace": {"SeriesInstanceUID": "1.2"}})
    assert r.status_code == 400
    out = ok(rest_client.post(f"/studies/{study['study']}/modify", json={"Replace": {"PatientID": "NEW"},
                                                                        "Force": True}))  # case 28  # fmt: skip
    assert {d.PatientID for d in instances_of(rest_client, "studies", out["ID"])} == {"NEW"}
    assert ok(rest_client.get("/statistics"))["CountInstances"] == 8  # nothing stored by the refused ones


def test_in_place_modification_sanity_checks(rest_client: TestClient, study: dict) -> None:
    keep = {"Keep": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"], "Force": True,
            "Replace": {"StudyDescription": "TOTO"}}  # fmt: skip
    r = rest_client.post(f"/studies/{study['study']}/modify", json={**keep, "KeepSource": False})
    assert r.status_code == 400 and "KeepSource" in r.json()["Details"]  # edge case 30
    r = rest_client.post(f"/studies/{study['study']}/modify", json={**keep, "KeepSource": True})
    assert r.status_code == 400 and "OverwriteInstances" in r.json()["Details"]  # edge case 31
    assert ok(rest_client.get("/statistics"))["CountInstances"] == 4


def test_in_place_modification_with_overwrite(tmp_path: Path, db_url: str) -> None:
    cfg = config.build(None, {"StorageDirectory": str(tmp_path / "st"), "IndexDirectory": str(tmp_path),
                              "OverwriteInstances": True, "Database": db_url}, environ={})  # fmt: skip
    archive = open_archive(db_url, tmp_path / "st", overwrite=True)
    client = TestClient(create_app(cfg, archive))
    for i in (1, 2):
        path = make_instance(tmp_path / f"{i}.dcm", patient_id="887", study_uid="3.1", series_uid="3.1.1",
                             sop_uid=f"3.1.1.{i}", StudyDescription="KNEE")  # fmt: skip
        store_file(archive, path)
    sid = resource_ids("887", "3.1", "x", "x").study
    out = ok(client.post(f"/studies/{sid}/modify", json={"Replace": {"StudyInstanceUID": "3.1",
                         "StudyDescription": "TOTO"}, "Force": True, "KeepSource": True}))  # fmt: skip
    assert out["ID"] == sid  # edge case 29
    assert ok(client.get(f"/studies/{sid}"))["MainDicomTags"]["StudyDescription"] == "TOTO"
    keep = {"Keep": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"], "Force": True,
            "Replace": {"StudyDescription": "IN PLACE"}, "KeepSource": True}  # fmt: skip
    out = ok(client.post(f"/studies/{sid}/modify", json=keep))
    assert out["ID"] == sid
    datasets = instances_of(client, "studies", sid)
    assert {d.StudyDescription for d in datasets} == {"IN PLACE"} and len(datasets) == 4
    assert "ModifiedFrom" not in ok(client.get(f"/studies/{sid}/metadata"))  # same ID: not "from itself"
    assert ok(client.get("/statistics"))["CountInstances"] == 4


def test_moving_a_study_to_a_patient_with_other_studies(rest_client: TestClient, rest_archive: Archive,
                                                         study: dict, tmp_path: Path) -> None:  # fmt: skip
    for uid in ("4.1", "4.2"):
        store_file(rest_archive, make_instance(tmp_path / f"{uid}.dcm", patient_id="TGT", study_uid=uid,
                                               PatientName="Target^Pat", PatientBirthDate="19800101",
                                               PatientSex="F"))  # fmt: skip
    url = f"/studies/{study['study']}/modify"
    r = rest_client.post(url, json={"Replace": {"PatientID": "TGT"}, "Force": True})
    assert r.status_code == 400 and "Failing tag" in r.json()["Details"]  # edge case 33
    r = rest_client.post(
        url,
        json={
            "Replace": {
                "PatientID": "TGT",
                "PatientName": "Target^Pat",
                "PatientBirthDate": "19800101",
                "PatientSex": "M",
            },
            "Force": True,
        },
    )
    assert r.status_code == 400 and "PatientSex" in r.json()["Details"]
    r = rest_client.post(url, json={"Replace": {"PatientID": "TGT", "PatientName": "Target^Pat",
                                                "PatientBirthDate": "19800101", "PatientSex": "F",
                                                "OtherPatientIDs": "X"}, "Force": True})  # fmt: skip
    assert r.status_code == 400 and "OtherPatientIDs" in r.json()["Details"]
    out = ok(rest_client.post(url, json={"Replace": {"PatientID": "TGT", "PatientName": "Target^Pat",
                                                     "PatientBirthDate": "19800101", "PatientSex": "F"},
                                         "Force": True}))  # fmt: skip
    assert out["PatientID"] == resource_ids("TGT", "x", "x", "x").patient
    assert len(ok(rest_client.get(f"/patients/{out['PatientID']}"))["Studies"]) == 3


def test_patient_rename_keeping_study_uids(rest_client: TestClient, study: dict) -> None:
    out = ok(rest_client.post(f"/patients/{study['patient']}/modify", json={
        "Replace": {"PatientName": "TOTO"}, "Keep": ["StudyInstanceUID", "SeriesInstanceUID"], "Force": True,
        "KeepSource": False}))  # edge case 34  # fmt: skip
    datasets = instances_of(rest_client, "patients", out["ID"])
    assert {str(d.PatientName) for d in datasets} == {"TOTO"} and {d.StudyInstanceUID for d in datasets} == {"1.9"}
    assert len(ok(rest_client.get("/studies"))) == 1 and ok(rest_client.get("/statistics"))["CountInstances"] == 4


def test_asynchronous_job_and_the_jobs_routes(rest_client: TestClient, study: dict) -> None:
    r = ok(rest_client.post(f"/studies/{study['study']}/anonymize", json={"Asynchronous": True}))
    assert set(r) == {"ID", "Path"} and r["Path"] == f"/jobs/{r['ID']}"
    deadline = time.monotonic() + 60
    while (job := ok(rest_client.get(r["Path"])))["State"] not in ("Success", "Failure"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["State"] == "Success" and job["Progress"] == 100 and job["Type"] == "ResourceModification"
    assert job["Content"]["InstancesCount"] == 4 and job["ErrorCode"] == 0
    assert r["ID"] in ok(rest_client.get("/jobs"))
    assert ok(rest_client.get("/jobs?expand"))[-1]["ID"] == r["ID"]
    assert rest_client.get("/jobs/nope").status_code == 404
    assert rest_client.post(f"/jobs/{r['ID']}/cancel").status_code == 400  # already ended
    assert rest_client.post(f"/jobs/{r['ID']}/resubmit").status_code == 400  # not failed


def test_a_failing_job_leaves_nothing_half_done(rest_client: TestClient, rest_archive: Archive, study: dict) -> None:
    from node.archive.models import Instance

    with rest_archive.db.connection_context():
        row = Instance.get(Instance.public_id == resource_ids("P9", "1.9", "1.9.2", "1.9.2.2").instance)
    rest_archive.storage.locate(row.file_uuid).write_bytes(b"not dicom any more")
    r = rest_client.post(f"/studies/{study['study']}/modify", json={"Replace": {"StationName": "Y"},
                                                                   "KeepSource": False})  # fmt: skip
    assert r.status_code == 500 and "cannot read" in r.json()["Details"], r.text
    assert ok(rest_client.get("/studies")) == [study["study"]]  # nothing new, the source kept
    assert ok(rest_client.get("/statistics"))["CountInstances"] == 4
    # asynchronously: the job fails with the error, and can be resubmitted
    job_id = ok(rest_client.post(f"/studies/{study['study']}/modify", json={"Replace": {"StationName": "Y"},
                                                                           "Asynchronous": True}))["ID"]  # fmt: skip
    deadline = time.monotonic() + 60
    while (job := ok(rest_client.get(f"/jobs/{job_id}")))["State"] not in ("Success", "Failure"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job["State"] == "Failure" and job["ErrorCode"] == 2018 and "cannot read" in job["ErrorDetails"]
    assert ok(rest_client.get("/statistics"))["CountInstances"] == 4
    assert ok(rest_client.post(f"/jobs/{job_id}/resubmit")) == {}
    assert _wait_job(rest_client, job_id)["State"] == "Failure"  # the file is still broken
    assert ok(rest_client.get("/statistics"))["CountInstances"] == 4


def test_bad_bodies_are_refused_before_anything_runs(rest_client: TestClient, study: dict) -> None:
    url = f"/studies/{study['study']}/modify"
    assert rest_client.post(url, content=b"[1").status_code == 400
    assert rest_client.post(url, json=[1]).status_code == 400
    r = rest_client.post(url, json={"KeepSource": "no"})
    assert r.status_code == 400 and "KeepSource" in r.json()["Details"]
    r = rest_client.post(url, json={"Remove": ["PatientID"], "Force": True})
    assert r.status_code == 400
    r = rest_client.post(url, json={"Asynchronous": "yes"})
    assert r.status_code == 400 and "Asynchronous" in r.json()["Details"]
    assert rest_client.post("/studies/nope/modify", json={}).status_code == 404
    assert ok(rest_client.get("/statistics"))["CountInstances"] == 4
    assert ok(rest_client.get("/jobs")) == []


def _wait_job(client: TestClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while (job := ok(client.get(f"/jobs/{job_id}")))["State"] not in ("Success", "Failure"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_split_series_to_a_new_study(rest_client: TestClient, study: dict) -> None:
    r = ok(rest_client.post(f"/studies/{study['study']}/split", json={
        "Series": [study["series2"]], "Replace": {"PatientName": "Hello"}, "Remove": ["ReferringPhysicianName"],
        "KeepSource": False, "Asynchronous": True}))  # edge case 49  # fmt: skip
    job = _wait_job(rest_client, r["ID"])
    assert job["State"] == "Success" and job["Type"] == "SplitStudy"
    target = job["Content"]["TargetStudy"]
    assert sorted(ok(rest_client.get("/studies"))) == sorted([study["study"], target])
    moved = instances_of(rest_client, "studies", target)
    assert len(moved) == 2 and {d.StudyInstanceUID for d in moved} == {job["Content"]["TargetStudyUID"]}
    assert {str(d.PatientName) for d in moved} == {"Hello"} and all("ReferringPhysicianName" not in d for d in moved)
    assert {d.SOPInstanceUID for d in moved}.isdisjoint({"1.9.2.1", "1.9.2.2"})  # fresh SOP UIDs
    assert len({d.SeriesInstanceUID for d in moved}) == 1 and moved[0].SeriesInstanceUID != "1.9.2"
    assert ok(rest_client.get(f"/studies/{study['study']}"))["Series"] == [study["series"]]  # moved away


def test_split_instances_and_bad_requests(rest_client: TestClient, study: dict) -> None:
    url = f"/studies/{study['study']}/split"
    for body in ({}, {"Series": [], "Instances": []}):
        r = rest_client.post(url, json=body)
        assert r.status_code == 400 and "Both the Series and the Instances" in r.json()["Details"]  # case 50
    assert rest_client.post(url, json={"Series": ["nope"]}).status_code == 404
    assert rest_client.post(url, json={"Instances": ["nope"]}).status_code == 404
    r = rest_client.post(url, json={"Series": [study["series"]], "Replace": {"SeriesDescription": "x"}})
    assert r.status_code == 400 and "SeriesDescription" in r.json()["Details"]
    r = rest_client.post(url, json={"Series": [study["series"]], "Replace": {"PatientName": 3}})
    assert r.status_code == 400
    assert rest_client.post("/studies/nope/split", json={"Series": ["x"]}).status_code == 404
    out = ok(rest_client.post(url, json={"Instances": [study["instance"]]}))  # edge case 51
    assert out["InstancesCount"] == 1 and out["TargetStudy"] != study["study"]
    assert study["instance"] not in ok(rest_client.get("/instances"))  # KeepSource defaults to false
    (moved,) = instances_of(rest_client, "studies", out["TargetStudy"])
    assert moved.InstanceNumber == 1 and moved.PatientID == "P9"


def test_merge_into_a_study(rest_client: TestClient, rest_archive: Archive, study: dict, tmp_path: Path) -> None:
    store_file(rest_archive, make_instance(tmp_path / "knee.dcm", patient_id="K1", study_uid="5.1", series_uid="5.1.1",
                                           sop_uid="5.1.1.1", PatientName="Knee^Pat", StudyDescription="OTHER",
                                           AccessionNumber="ACC5"))  # fmt: skip
    knee = resource_ids("K1", "5.1", "5.1.1", "5.1.1.1")
    r = ok(rest_client.post(f"/studies/{study['study']}/merge", json={"Resources": [knee.study], "KeepSource": True,
                                                                     "Synchronous": False}))  # case 53  # fmt: skip
    job = _wait_job(rest_client, r["ID"])
    assert job["State"] == "Success" and job["Content"]["TargetStudy"] == study["study"]
    datasets = instances_of(rest_client, "studies", study["study"])
    assert len(datasets) == 5 and {d.PatientID for d in datasets} == {"P9"}
    merged = [d for d in datasets if d.SeriesInstanceUID not in ("1.9.1", "1.9.2")]
    assert len(merged) == 1 and merged[0].StudyDescription == "KNEE" and str(merged[0].PatientName) == "Doe^John"
    assert "AccessionNumber" not in merged[0]  # the target has none: removed
    assert merged[0].SOPInstanceUID != "5.1.1.1"
    assert knee.study in ok(rest_client.get("/studies"))  # KeepSource true
    out = ok(rest_client.post(f"/studies/{study['study']}/merge", json={"Resources": [knee.instance]}))  # case 52
    assert out["TargetStudy"] == study["study"] and knee.instance not in ok(rest_client.get("/instances"))
    assert len(ok(rest_client.get("/patients"))) == 1 and len(ok(rest_client.get("/studies"))) == 1
    for bad in ([study["study"]], [study["series"]], [study["patient"]], ["nope"]):
        assert rest_client.post(f"/studies/{study['study']}/merge", json={"Resources": bad}).status_code == 404
    assert rest_client.post(f"/studies/{study['study']}/merge", json={}).status_code == 400


def test_cancel_stops_a_running_job_and_resubmit_runs_it_again() -> None:
    import threading

    from node.rest.jobs import JobContext, JobEngine

    started, runs = threading.Event(), []

    def work(ctx: JobContext) -> dict[str, Any]:
        runs.append(1)
        started.set()
        for i in range(2000):
            ctx.check()
            ctx.progress(i, 2000)
            time.sleep(0.005)
        return {"Done": True}

    engine = JobEngine(1)
    job = engine.submit("Test", work)
    assert started.wait(10)
    engine.cancel(job.id)
    assert job.done_event.wait(10)
    described = job.describe()
    assert described["State"] == "Failure" and described["ErrorCode"] == 37 and 0 <= described["Progress"] < 100
    engine.resubmit(job.id)
    started.clear()
    assert started.wait(10) and len(runs) == 2
    engine.cancel(job.id)
    assert job.done_event.wait(10)
    engine.shutdown()


def test_routing_deliveries_of_a_job_are_queued_only_when_it_succeeds(tmp_path: Path, db_url: str) -> None:
    from node.archive.models import Instance, Outbox

    cfg = config.build(None, {"StorageDirectory": str(tmp_path / "st"), "IndexDirectory": str(tmp_path),
                              "DicomModalities": {"dest": ["DEST", "127.0.0.1", 1]},
                              "Routes": [{"Name": "all", "Forward": ["dest"]}], "Database": db_url},
                       environ={})  # fmt: skip
    archive = open_archive(db_url, tmp_path / "st")
    client = TestClient(create_app(cfg, archive))
    for i in (1, 2, 3):
        store_file(archive, make_instance(tmp_path / f"{i}.dcm", patient_id="R1", study_uid="6.1",
                                          series_uid="6.1.1", sop_uid=f"6.1.1.{i}"))  # fmt: skip
    sid = resource_ids("R1", "6.1", "x", "x").study
    with archive.db.connection_context():
        bad = Instance.get(Instance.public_id == resource_ids("R1", "6.1", "6.1.1", "6.1.1.3").instance)
    good = archive.storage.locate(bad.file_uuid).read_bytes()
    archive.storage.locate(bad.file_uuid).write_bytes(b"broken")
    assert client.post(f"/studies/{sid}/modify", json={"Replace": {"StationName": "Z"}}).status_code == 500
    with archive.db.connection_context():
        assert Outbox.select().count() == 0  # store_file queues nothing (no routes there); the failed job neither
    archive.storage.locate(bad.file_uuid).write_bytes(good)
    out = ok(client.post(f"/studies/{sid}/modify", json={"Replace": {"StationName": "Z"}}))
    new = {i["ID"] for i in ok(client.get(f"/studies/{out['ID']}/instances"))}
    with archive.db.connection_context():
        assert {r.instance for r in Outbox.select()} == new and {r.destination for r in Outbox.select()} == {"dest"}


def test_in_place_checks_at_series_level_and_split_refuses_sequences(rest_client: TestClient, study: dict) -> None:
    r = rest_client.post(
        f"/series/{study['series']}/modify",
        json={"Keep": ["SeriesInstanceUID", "SOPInstanceUID"], "Force": True, "Replace": {"SeriesDescription": "X"}},
    )
    assert r.status_code == 400 and "OverwriteInstances" in r.json()["Details"]  # would store nothing  # fmt: skip
    r = rest_client.post(
        f"/studies/{study['study']}/split",
        json={"Series": [study["series"]], "Replace": {"ReferencedStudySequence": "x"}},
    )
    assert r.status_code == 400 and "ReferencedStudySequence" in r.json()["Details"]
    assert ok(rest_client.get("/statistics"))["CountInstances"] == 4
