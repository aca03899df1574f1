"""The C-FIND SCP driven by real clients: DCMTK findscu (both models, every level, every matching kind), pynetdicom
for C-CANCEL and role negotiation, Orthanc 1.10 querying the node over its REST API. Plus the pure parts
(identifier parsing, answer building, charset choice, access policy) without a network."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import SAMPLES, Node, dcmtk, dcmtk_env, free_port, make_instance, run
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from node.config import Modality
from node.dicom.levels import Level
from node.net.access import AccessPolicy
from node.net.find_query import (
    LATIN1,
    UTF8,
    MalformedQuery,
    Source,
    answer_charset,
    build_answer,
    parse_identifier,
    parse_level,
)

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
US_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
R = "1.2.826.0.1.3680043.9.7"
S1, S2, S3, S4, BULK = f"{R}.1", f"{R}.2", f"{R}.3", f"{R}.4", f"{R}.9"
S11, S12, S21, S31, S41 = f"{S1}.1", f"{S1}.2", f"{S2}.1", f"{S3}.1", f"{S4}.1"
I111, I112, I121, I211, I311, I411 = f"{S11}.1", f"{S11}.2", f"{S12}.1", f"{S21}.1", f"{S31}.1", f"{S41}.1"
N_BULK = 250
ENCODINGS = SAMPLES / "Encodings"
ALL_PATIENTS = {"PA1", "PB2", "PC3", "latin1", "utf8", "BULK"}


def dataset_files(folder: Path) -> list[Path]:
    """Three patients, four studies, five series, six instances (what the matching tests reason about)."""
    folder.mkdir(parents=True, exist_ok=True)
    pa1 = {"patient_id": "PA1", "PatientName": "Doe^John", "PatientBirthDate": "19700101", "PatientSex": "M"}
    study1 = {**pa1, "study_uid": S1, "StudyDate": "20200115", "AccessionNumber": "ACC1", "InstitutionName": "Hosp A",
              "StudyDescription": "CT chest", "PatientAge": "050Y"}  # fmt: skip
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT_STORAGE
    ref.ReferencedSOPInstanceUID = I112
    specs: list[dict[str, Any]] = [
        {**study1, "series_uid": S11, "sop_uid": I111, "SeriesNumber": 1, "InstanceNumber": 1, "SliceThickness": "1.5",
         "ReferencedImageSequence": Sequence([ref])},
        {**study1, "series_uid": S11, "sop_uid": I112, "SeriesNumber": 1, "InstanceNumber": 2, "SliceThickness": "2.5"},
        {**study1, "series_uid": S12, "sop_uid": I121, "Modality": "MR", "sop_class": MR_STORAGE},
        {**pa1, "study_uid": S2, "StudyDate": "20210310", "AccessionNumber": "ACC2", "InstitutionName": "Hosp B",
         "series_uid": S21, "sop_uid": I211, "Modality": "MR", "sop_class": MR_STORAGE},
        {"patient_id": "PB2", "PatientName": "DOE^JANE", "study_uid": S3, "StudyDate": "20201231",
         "AccessionNumber": "acc3", "series_uid": S31, "sop_uid": I311},
        {"patient_id": "PC3", "PatientName": "Smith^Anna", "study_uid": S4, "StudyDate": "20190601",
         "AccessionNumber": "ACC4", "series_uid": S41, "sop_uid": I411, "Modality": "US", "sop_class": US_STORAGE},
    ]  # fmt: skip
    return [make_instance(folder / f"{i}.dcm", **spec) for i, spec in enumerate(specs)]


def store(node: Node, files: list[Path], *extra: str) -> None:
    r = run([dcmtk("storescu"), *extra, "-aec", node.aet, "127.0.0.1", str(node.port), *map(str, files)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def start_node(workdir: Path, **config: Any) -> Node:
    workdir.mkdir(parents=True)
    return Node(workdir=workdir, port=free_port(), config={"DicomReceiverProcesses": 1, **config}).start()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node holding the dataset, the Latin-1 and UTF-8 samples and a 250-instance study; only declared
    modalities may query (Orthanc's default ``DicomAlwaysAllowFind: false``)."""
    base = tmp_path_factory.mktemp("qr")
    node = start_node(base / "node", DicomModalities={
        "viewer": {"AET": "VIEWER", "Host": "127.0.0.1", "Port": 104},
        "nofind": {"AET": "NOFIND", "Host": "127.0.0.1", "Port": 104, "AllowFind": False},
        "orthanc": {"AET": "ORTHANC", "Host": "127.0.0.1", "Port": 104},
    })  # fmt: skip
    try:
        (base / "bulk").mkdir()
        bulk = [make_instance(base / "bulk" / f"{i}.dcm", patient_id="BULK", study_uid=BULK, series_uid=f"{BULK}.1",
                              sop_uid=f"{BULK}.1.{i}", InstanceNumber=i + 1, PatientAge="033Y")
                for i in range(N_BULK)]  # fmt: skip
        store(node, dataset_files(base / "data") + bulk)
        store(node, [ENCODINGS / "Lena-latin1.dcm", ENCODINGS / "Lena-utf8.dcm"], "-xy")  # JPEG baseline as is
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """Orthanc's test-suite limits, case-sensitive names, and anyone may query."""
    base = tmp_path_factory.mktemp("qr-limits")
    node = start_node(base / "node", LimitFindResults=2, LimitFindInstances=3, CaseSensitivePN=True,
                      DicomAlwaysAllowFind=True)  # fmt: skip
    try:
        store(node, dataset_files(base / "data"))
        yield node
    finally:
        node.stop()


@dataclass
class Found:
    answers: list[Dataset]
    status: int
    comment: str
    output: str

    def values(self, keyword: str) -> set[str]:
        return {str(a.get(keyword)) for a in self.answers}


def findscu(node: Node, *keys: str | bytes, model: str = "-S", aet: str = "VIEWER", extra: tuple[str, ...] = ()
            ) -> Found:  # fmt: skip
    """DCMTK findscu; the answers as written by ``-X``, the final DIMSE status and its ErrorComment."""
    with tempfile.TemporaryDirectory() as out:
        cmd: list[str | bytes] = [dcmtk("findscu"), "-d", model, "-aet", aet, "-aec", node.aet, "-X", "-od", out,
                                  *extra]  # fmt: skip
        for key in keys:
            cmd += ["-k", key]
        cmd += ["127.0.0.1", str(node.port)]
        r = subprocess.run(cmd, capture_output=True, env=dcmtk_env(), timeout=120)
        output = (r.stdout + r.stderr).decode("utf-8", "replace")
        answers = [pydicom.dcmread(p) for p in sorted(Path(out).glob("rsp*.dcm"))]
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", output)
    assert statuses, output[-3000:]
    comment = re.findall(r"\(0000,0902\) LO \[(.*?)\s*\]", output)
    return Found(answers, int(statuses[-1], 16), comment[-1] if comment else "", output)


def ok(found: Found) -> Found:
    assert found.status == 0x0000, found.output[-3000:]
    return found


# -- every level, both information models ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "level", "keys", "key", "expected"),
    [
        ("-P", "PATIENT", ["PatientID"], "PatientID", ALL_PATIENTS),
        ("-S", "PATIENT", ["PatientID"], "PatientID", ALL_PATIENTS),  # Orthanc accepts it in Study Root too
        ("-S", "STUDY", ["PatientID=P*", "StudyInstanceUID"], "StudyInstanceUID", {S1, S2, S3, S4}),
        ("-P", "STUDY", ["PatientID=PA1", "StudyInstanceUID"], "StudyInstanceUID", {S1, S2}),
        ("-S", "SERIES", [f"StudyInstanceUID={S1}", "SeriesInstanceUID"], "SeriesInstanceUID", {S11, S12}),
        ("-P", "SERIES", ["PatientID=PA1", f"StudyInstanceUID={S1}", "SeriesInstanceUID"], "SeriesInstanceUID",
         {S11, S12}),
        ("-S", "IMAGE", [f"StudyInstanceUID={S1}", f"SeriesInstanceUID={S11}", "SOPInstanceUID"], "SOPInstanceUID",
         {I111, I112}),
        ("-P", "IMAGE", ["PatientID=PA1", f"StudyInstanceUID={S1}", f"SeriesInstanceUID={S11}", "SOPInstanceUID"],
         "SOPInstanceUID", {I111, I112}),
    ],
)  # fmt: skip
def test_every_level_in_both_models(archive: Node, model: str, level: str, keys: list[str], key: str,
                                    expected: set[str]) -> None:  # fmt: skip
    found = ok(findscu(archive, f"QueryRetrieveLevel={level}", *keys, model=model))
    assert found.values(key) == expected and len(found.answers) == len(expected)
    assert {a.QueryRetrieveLevel for a in found.answers} == {level}
    assert {a.RetrieveAETitle for a in found.answers} == {archive.aet}


# -- matching ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "keys", "key", "expected"),
    [
        ("PATIENT", ["PatientName", "PatientID"], "PatientID", ALL_PATIENTS),  # universal
        ("PATIENT", ["PatientID=PB2"], "PatientID", {"PB2"}),  # single value
        ("PATIENT", ["PatientName=doe*", "PatientID"], "PatientID", {"PA1", "PB2"}),  # * and PN case
        ("PATIENT", ["PatientID=P?2"], "PatientID", {"PB2"}),  # ?
        ("PATIENT", ["PatientName=doe^jane", "PatientID"], "PatientID", {"PB2"}),  # PN case-insensitive
        ("STUDY", ["StudyDate=20200101-20201231", "StudyInstanceUID"], "StudyInstanceUID", {S1, S3}),
        ("STUDY", ["StudyDate=20201231-", "StudyInstanceUID"], "StudyInstanceUID", {S2, S3}),
        ("STUDY", ["StudyDate=-20191231", "StudyInstanceUID"], "StudyInstanceUID", {S4}),
        ("STUDY", ["StudyDate=20210310", "StudyInstanceUID"], "StudyInstanceUID", {S2}),
        ("STUDY", [f"StudyInstanceUID={S1}\\{S4}"], "StudyInstanceUID", {S1, S4}),  # list of UIDs
        ("STUDY", ["AccessionNumber=ACC3", "StudyInstanceUID"], "StudyInstanceUID", set()),  # LO: case-sensitive
        ("STUDY", ["AccessionNumber=acc3", "StudyInstanceUID"], "StudyInstanceUID", {S3}),
        ("STUDY", ["ModalitiesInStudy=MR", "StudyInstanceUID"], "StudyInstanceUID", {S1, S2}),
        ("STUDY", ["ModalitiesInStudy=US\\MR", "StudyInstanceUID"], "StudyInstanceUID", {S1, S2, S4}),
        ("STUDY", ["Modality=US", "StudyInstanceUID"], "StudyInstanceUID", {S4}),  # a series key at study level
        ("SERIES", ["PatientName=Smith*", "SeriesInstanceUID"], "SeriesInstanceUID", {S41}),  # an upper key
        ("IMAGE", [f"StudyInstanceUID={S1}", "SliceThickness=2.5", "SOPInstanceUID"], "SOPInstanceUID", {I112}),
        ("STUDY", ["PatientAge=050Y", "StudyInstanceUID"], "StudyInstanceUID", {S1}),  # read from the files
    ],
)  # fmt: skip
def test_matching_kinds(archive: Node, level: str, keys: list[str], key: str, expected: set[str]) -> None:
    found = ok(findscu(archive, f"QueryRetrieveLevel={level}", *keys))
    assert found.values(key) == expected


def test_case_sensitive_pn_when_configured(limited: Node) -> None:
    assert ok(findscu(limited, "QueryRetrieveLevel=PATIENT", "PatientName=doe^jane")).answers == []
    found = ok(findscu(limited, "QueryRetrieveLevel=PATIENT", "PatientName=DOE^JANE", "PatientID"))
    assert found.values("PatientID") == {"PB2"}


# -- what an answer holds ---------------------------------------------------------------------------------------


def tags_of(ds: Dataset) -> set[str]:
    return {ds[t].keyword for t in ds.keys()}


def test_return_keys_from_the_index_the_files_and_computed(archive: Node) -> None:
    base = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}
    keys = [
        "PatientName",
        "InstitutionName",
        "StudyDescription",
        "PatientAge",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "AdditionalPatientHistory",
        "Modality",
    ]
    [study] = ok(findscu(archive, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={S1}", *keys)).answers
    assert tags_of(study) == {*keys, "StudyInstanceUID", *base}  # exactly what was asked
    assert str(study.PatientName) == "Doe^John" and study.InstitutionName == "Hosp A"  # index
    assert study.StudyDescription == "CT chest" and study.PatientAge == "050Y"  # index, file
    assert study.NumberOfStudyRelatedSeries == 2 and study.NumberOfStudyRelatedInstances == 3
    assert list(study.ModalitiesInStudy) == ["CT", "MR"]
    assert list(study.SOPClassesInStudy) == sorted([CT_STORAGE, MR_STORAGE])
    assert study.AdditionalPatientHistory == "" and study.Modality == ""  # absent; a series key has no study value

    keys = [
        "PatientBirthDate",
        "PatientSex",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ]
    [patient] = ok(findscu(archive, "QueryRetrieveLevel=PATIENT", "PatientID=PA1", *keys, model="-P")).answers
    assert tags_of(patient) == {*keys, "PatientID", *base}
    assert (patient.PatientBirthDate, patient.PatientSex) == ("19700101", "M")
    assert (patient.NumberOfPatientRelatedStudies, patient.NumberOfPatientRelatedSeries,
            patient.NumberOfPatientRelatedInstances) == (2, 3, 4)  # fmt: skip

    [series] = ok(findscu(archive, "QueryRetrieveLevel=SERIES", f"SeriesInstanceUID={S11}", "SeriesNumber",
                          "NumberOfSeriesRelatedInstances", "Modality", "PatientName")).answers  # fmt: skip
    assert (series.SeriesNumber, series.NumberOfSeriesRelatedInstances, series.Modality) == (1, 2, "CT")
    assert str(series.PatientName) == "Doe^John"

    [image] = ok(
        findscu(
            archive,
            "QueryRetrieveLevel=IMAGE",
            f"SOPInstanceUID={I111}",
            "InstanceNumber",
            "SOPClassUID",
            "SliceThickness",
            "ReferencedImageSequence",
            "NumberOfFrames",
        )
    ).answers
    assert (image.InstanceNumber, image.SOPClassUID, image.SliceThickness) == (1, CT_STORAGE, 1.5)
    assert image.NumberOfFrames is None or image.NumberOfFrames == ""
    [item] = image.ReferencedImageSequence  # a sequence return key, copied from the file
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (CT_STORAGE, I112)


# -- character sets -----------------------------------------------------------------------------------------------


def sample_name(name: str) -> str:
    return str(pydicom.dcmread(ENCODINGS / name, stop_before_pixels=True).PatientName)


def test_latin1_and_utf8_names(archive: Node) -> None:
    latin1, utf8 = sample_name("Lena-latin1.dcm"), sample_name("Lena-utf8.dcm")
    assert latin1 == "Test-éüäöò" and utf8.startswith("Test-éüäöòД")
    # A Latin-1 query, answered in Latin-1 when the answer fits it, in UTF-8 otherwise.
    found = ok(findscu(archive, "QueryRetrieveLevel=PATIENT", "SpecificCharacterSet=ISO_IR 100", "PatientName",
                       "PatientID=latin1"))  # fmt: skip
    [a] = found.answers
    assert (a.SpecificCharacterSet, str(a.PatientName)) == (LATIN1, latin1)
    [a] = ok(findscu(archive, "QueryRetrieveLevel=PATIENT", "SpecificCharacterSet=ISO_IR 100", "PatientName",
                     "PatientID=utf8")).answers  # fmt: skip
    assert (a.SpecificCharacterSet, str(a.PatientName)) == (UTF8, utf8)
    # No character set in the query: UTF-8.
    [a] = ok(findscu(archive, "QueryRetrieveLevel=PATIENT", "PatientName", "PatientID=latin1")).answers
    assert (a.SpecificCharacterSet, str(a.PatientName)) == (UTF8, latin1)
    # Names matched in the query's own encoding, case-insensitively beyond ASCII.
    found = ok(findscu(archive, "QueryRetrieveLevel=PATIENT", "SpecificCharacterSet=ISO_IR 100",
                       "PatientName=test-ÉÜ*".encode("latin-1"), "PatientID"))  # fmt: skip
    assert found.values("PatientID") == {"latin1", "utf8"}
    found = ok(findscu(archive, "QueryRetrieveLevel=PATIENT", "SpecificCharacterSet=ISO_IR 192",
                       "PatientName=Test-éüäöòД*".encode(), "PatientID"))  # fmt: skip
    assert found.values("PatientID") == {"utf8"}
    assert str(found.answers[0].PatientName) == utf8


# -- limits, refusals, errors, cancel ------------------------------------------------------------------------------


def test_limits_end_with_matching_terminated_as_orthanc(limited: Node) -> None:
    found = findscu(limited, "QueryRetrieveLevel=PATIENT", "PatientID", aet="STRANGER")  # DicomAlwaysAllowFind
    assert (len(found.answers), found.status) == (2, 0xFE00)
    assert len(ok(findscu(limited, "QueryRetrieveLevel=STUDY", "PatientID=PA1")).answers) == 2  # exactly the limit
    found = findscu(limited, "QueryRetrieveLevel=IMAGE", "SOPInstanceUID")
    assert (len(found.answers), found.status) == (3, 0xFE00)
    assert len(ok(findscu(limited, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={S1}")).answers) == 3


def test_access_per_modality_always_allow_and_rest_modalities(archive: Node) -> None:
    for aet in ("NOFIND", "STRANGER", "LATE"):
        found = findscu(archive, "QueryRetrieveLevel=PATIENT", "PatientID", aet=aet)
        assert (found.answers, found.status) == ([], 0x0124), found.output[-2000:]
        assert "not allowed to query" in found.comment
    http = archive.rest()
    r = http.put("/modalities/late", json={"AET": "LATE", "Host": "127.0.0.1", "Port": 104, "AllowFind": True})
    assert r.status_code == 200, r.text
    time.sleep(1.2)  # receivers re-read the index's modalities at most once a second
    assert ok(findscu(archive, "QueryRetrieveLevel=PATIENT", "PatientID=PB2", aet="LATE")).values("PatientID") == {
        "PB2"
    }
    assert http.delete("/modalities/late").status_code == 200
    refused = [e for e in archive.events("find refused") if e.get("peer_aet") == "NOFIND"]
    assert refused and refused[0]["reason"] == "calling AE title is not allowed to query"


@pytest.mark.parametrize(
    ("keys", "comment"),
    [
        (["PatientID"], "QueryRetrieveLevel (0008,0052) is missing"),
        (["QueryRetrieveLevel=WORLD", "PatientID"], "unknown QueryRetrieveLevel 'WORLD'"),
        (["QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.*"], "wildcards are not allowed on tag StudyInstan"),
        (["QueryRetrieveLevel=STUDY", "StudyDate=2020-2021-2022"], "tag StudyDate: '2020-2021-2022' is not a DA range"),
    ],
)
def test_malformed_identifiers_fail_with_a_comment(archive: Node, keys: list[str], comment: str) -> None:
    found = findscu(archive, *keys)
    assert (found.answers, found.status) == ([], 0xC000)
    assert found.comment.startswith(comment[:64]), found.comment


def test_cancel_from_pynetdicom_stops_the_answers(archive: Node) -> None:
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title=archive.aet)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = BULK
    query.SOPInstanceUID = ""
    query.PatientAge = ""  # read from each file: answers come slower than the cancel
    statuses = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind, msg_id=7):
            statuses.append(status.Status)
            if len(statuses) == 1:
                assert identifier.PatientAge == "033Y"
                assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
    finally:
        assoc.release()
    assert statuses[-1] == 0xFE00
    pending = statuses[:-1]
    assert set(pending) == {0xFF00} and 1 <= len(pending) < N_BULK
    [event] = [e for e in archive.events("find") if e["outcome"] == "cancelled"]
    assert event["answers"] == len(pending)


def test_cancel_from_findscu(archive: Node) -> None:
    found = findscu(archive, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={BULK}", "PatientAge", "SOPInstanceUID",
                    extra=("--cancel", "1"))  # fmt: skip
    assert found.status == 0xFE00 and 1 <= len(found.answers) < N_BULK


def test_get_role_selection_is_accepted_for_storage(archive: Node) -> None:
    """A C-GET SCU proposes the storage SCP role; a plain sender proposes nothing and keeps the default roles."""
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title=archive.aet,
                         ext_neg=[build_role(CTImageStorage, scp_role=True)])  # fmt: skip
    try:
        [cx] = assoc.accepted_contexts
        assert (cx.as_scp, cx.as_scu) == (True, False)  # we may send C-STOREs on it
    finally:
        assoc.release()


# -- Orthanc 1.10 as the querying peer ----------------------------------------------------------------------------

ORTHANC = Path(os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc"))


def test_orthanc_queries_and_retrieves_from_the_node(archive: Node, tmp_path: Path) -> None:
    http_port, dicom_port = free_port(), free_port()
    cfg = {"Name": "qr-test", "StorageDirectory": str(tmp_path / "st"), "IndexDirectory": str(tmp_path / "ix"),
           "Plugins": [], "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC",
           "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "SaveJobs": False,
           "DicomModalities": {"node": [archive.aet, "127.0.0.1", archive.port]}}  # fmt: skip
    (tmp_path / "orthanc.json").write_text(json.dumps(cfg))
    log = open(tmp_path / "orthanc.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(ORTHANC), str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            env=dcmtk_env())  # fmt: skip
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                if http.get("/system").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "orthanc.log").read_text()
            time.sleep(0.2)
        r = http.post(
            "/modalities/node/query",
            json={
                "Level": "Study",
                "Query": {
                    "PatientID": "PA1",
                    "StudyDescription": "",
                    "ModalitiesInStudy": "",
                    "NumberOfStudyRelatedInstances": "",
                },
            },
        )
        assert r.status_code == 200, r.text
        answers = http.get(f"{r.json()['Path']}/answers", params={"expand": "", "simplify": ""}).json()
        by_uid = {a["StudyInstanceUID"]: a for a in answers}
        assert set(by_uid) == {S1, S2}
        assert by_uid[S1]["StudyDescription"] == "CT chest" and by_uid[S1]["ModalitiesInStudy"] == "CT\\MR"
        assert by_uid[S1]["NumberOfStudyRelatedInstances"] == "3" and by_uid[S2]["ModalitiesInStudy"] == "MR"
        r = http.post("/modalities/node/query", json={"Level": "Patient", "Query": {"PatientName": "doe*"}})
        answers = http.get(f"{r.json()['Path']}/answers", params={"expand": "", "simplify": ""}).json()
        assert sorted(a["PatientName"] for a in answers) == ["DOE^JANE", "Doe^John"]
        # and Orthanc retrieves a study from the node (C-MOVE to itself), the node learning its port over REST
        put = httpx.put(f"http://127.0.0.1:{archive.http_port}/modalities/orthanc",
                        json={"AET": "ORTHANC", "Host": "127.0.0.1", "Port": dicom_port})  # fmt: skip
        assert put.status_code == 200, put.text
        time.sleep(1.5)  # receivers re-read REST-added modalities at most once a second
        r = http.post("/modalities/node/move", json={"Level": "Study", "Resources": [{"StudyInstanceUID": S1}],
                                                      "TargetAet": "ORTHANC", "Synchronous": True})  # fmt: skip
        assert r.status_code == 200, r.text
        studies = http.get("/studies", params={"expand": ""}).json()
        assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == [S1]
        assert len(http.get(f"/studies/{studies[0]['ID']}/instances").json()) == 3
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        shutil.rmtree(tmp_path / "st", ignore_errors=True)


# -- the pure parts ------------------------------------------------------------------------------------------------


def identifier(**tags: Any) -> Dataset:
    ds = Dataset()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def test_identifier_is_split_into_index_file_and_computed_keys() -> None:
    assert parse_level("image ") == (Level.INSTANCE, "image")  # any case, as Orthanc
    q = parse_identifier(identifier(QueryRetrieveLevel="STUDY ", PatientName="doe*", ModalitiesInStudy="CT\\MR",
                                    PatientAge="050Y", NumberOfStudyRelatedSeries="3", Modality="",
                                    StudyDate="20200101-"))  # fmt: skip
    assert (q.level, q.level_text) == (Level.STUDY, "STUDY")
    assert sorted(c.keyword for c in q.index_constraints) == ["Modality", "PatientName", "StudyDate"]
    assert [c.keyword for c in q.file_constraints] == ["PatientAge"]
    sources = {k.keyword: k.source for k in q.keys}
    assert sources == {"PatientName": Source.INDEX, "ModalitiesInStudy": Source.COMPUTED, "PatientAge": Source.FILE,
                       "NumberOfStudyRelatedSeries": Source.COMPUTED, "Modality": Source.EMPTY,
                       "StudyDate": Source.INDEX}  # fmt: skip
    [name] = [c for c in q.index_constraints if c.keyword == "PatientName"]
    assert not name.case_sensitive  # CaseSensitivePN false: PN only
    assert parse_identifier(identifier(QueryRetrieveLevel="IMAGE", PatientName="X"), case_sensitive_pn=True
                            ).index_constraints[0].case_sensitive  # fmt: skip
    with pytest.raises(MalformedQuery, match="missing"):
        parse_identifier(identifier(PatientName="X"))


def test_answer_holds_exactly_the_keys_and_picks_its_charset() -> None:
    q = parse_identifier(identifier(QueryRetrieveLevel="PATIENT", SpecificCharacterSet="ISO_IR 100",
                                    PatientName="", PatientID="P1", NumberOfPatientRelatedStudies="",
                                    OtherPatientIDs="", PatientAge=""))  # fmt: skip
    header = identifier(PatientAge="040Y")
    a = build_answer(q, index_tags={"PatientName": "Gauß^Jörg", "PatientID": "P1", "Modality": "CT"},
                     computed={"NumberOfPatientRelatedStudies": "4"}, header=header, retrieve_aet="NODE")  # fmt: skip
    assert set(a.dir()) == {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "PatientName",
                            "PatientID", "NumberOfPatientRelatedStudies", "OtherPatientIDs", "PatientAge"}  # fmt: skip
    assert (a.SpecificCharacterSet, a.PatientAge, a.NumberOfPatientRelatedStudies, a.OtherPatientIDs) == (
        LATIN1,
        "040Y",
        4,
        "",
    )
    assert answer_charset(("ISO_IR 100",), identifier(PatientName="Иван")) == UTF8
    assert answer_charset(("",), identifier(PatientName="Jörg")) == UTF8
    assert answer_charset(("ISO_IR 144",), identifier(PatientName="Jörg")) == UTF8


def test_policy_find_move_get_and_live_modalities() -> None:
    known = [Modality("v", "VIEWER", "h", 104, allow_move=False)]
    p = AccessPolicy(modalities=(), always_allow_echo=False, always_allow_store=False, check_host=False,
                     strict_aet=False, source=lambda: known, refresh=0)  # fmt: skip
    assert p.may_find("viewer", "x") and p.may_get("VIEWER", "x") and not p.may_move("VIEWER", "x")
    assert not p.may_find("OTHER", "x") and not p.may_associate("OTHER", "x") and p.may_associate("VIEWER", "x")
    known.append(Modality("o", "OTHER", "h", 104, allow_echo=False, allow_store=False, allow_find=False,
                          allow_get=False, allow_move=True))  # fmt: skip
    assert p.may_associate("OTHER", "x") and p.may_move("OTHER", "x") and not p.may_find("OTHER", "x")
    always = AccessPolicy(modalities=(), always_allow_echo=False, always_allow_store=False, check_host=False,
                          strict_aet=False, always_allow_find=True)  # fmt: skip
    assert always.may_find("ANY", "x") and always.may_associate("ANY", "x") and not always.may_get("ANY", "x")

    def broken() -> list[Modality]:
        raise RuntimeError("database is locked")

    fallback = AccessPolicy(modalities=(Modality("v", "VIEWER", "h", 104),), always_allow_echo=False,
                            always_allow_store=False, check_host=False, strict_aet=False, source=broken)  # fmt: skip
    assert fallback.may_find("VIEWER", "x")  # the configured list while the index cannot be read


@dataclass
class _Peer:
    ae_title: str = "VIEWER"
    address: str = "127.0.0.1"
    port: int = 11112


@dataclass
class _Assoc:
    requestor: _Peer


@dataclass
class _Event:
    """What the handler reads of pynetdicom's ``Event``."""

    identifier: Dataset
    assoc: _Assoc
    is_cancelled: bool = False


def test_a_failing_index_answers_out_of_resources_not_a_crash(tmp_path: Path) -> None:
    from node import config
    from node.archive.store import open_archive
    from node.net.find_scp import handle_find
    from node.net.scp import StoreSCP

    archive = open_archive(f"sqlite:///{tmp_path}/index.db", tmp_path / "storage")
    cfg = config.build(None, {"StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path),
                              "DicomAlwaysAllowFind": True}, environ={})  # fmt: skip
    scp = StoreSCP(archive=archive, policy=AccessPolicy.from_config(cfg), cfg=cfg)
    query = identifier(QueryRetrieveLevel="PATIENT", PatientID="")
    event = _Event(query, _Assoc(_Peer()))
    assert list(handle_find(scp, event)) == []  # an empty index: no pending answer, then pynetdicom's Success
    archive.db.connect(reuse_if_open=True)
    archive.db.execute_sql('DROP TABLE "instance"')
    archive.db.execute_sql('DROP TABLE "series"')
    archive.db.execute_sql('DROP TABLE "study"')
    archive.db.execute_sql('DROP TABLE "patient"')
    [(status, rsp)] = list(handle_find(scp, event))
    assert rsp is None and status.Status == 0xA700 and "index" in status.ErrorComment
    archive.close()
