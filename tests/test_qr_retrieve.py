"""The C-MOVE and C-GET SCP of a running node (``python -m node serve``), driven by real clients.

DCMTK ``storescu`` fills the node with a synthetic patient (two studies), part of the Knee study (MR, JPEG 2000
lossy, read in place from ``../shared/samples``) and one instance whose JPEG 2000 pixel data no decoder can read.
Then: DCMTK ``movescu`` (Patient and Study Root, every level, by AccessionNumber, to an unknown AE) into a
bit-preserving DCMTK ``storescp``; DCMTK ``getscu`` into a folder, with and without JPEG 2000 accepted; and
pynetdicom's SCU for the exact statuses, the sub-operation counts, the Move Originator and the cancels, against
small pynetdicom storage SCPs whose answers each test sets.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import (
    SAMPLES,
    Node,
    dataset_bytes,
    dcmtk,
    dcmtk_env,
    free_port,
    make_dataset,
    make_instance,
    run,
    storescu_profile,
    wait_listening,
)
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
PATIENT = "QRPAT"
STUDY_A, STUDY_B = "1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.2"
SERIES_A1, SERIES_A2, SERIES_B1 = f"{STUDY_A}.1", f"{STUDY_A}.2", f"{STUDY_B}.1"
KNEE_STUDY = "2.16.840.1.113669.632.20.121711.10000160881"
BROKEN_PATIENT = "QRBROKEN"


# -- peers ------------------------------------------------------------------------------------------------------


@dataclass
class DcmtkStoreSCP:
    """DCMTK storescp writing each received instance exactly as received (``+B``) to its own file (``+uf``)."""

    port: int
    aet: str = "DEST"
    proc: subprocess.Popen[bytes] | None = None
    folder: Path | None = None

    def start(self, folder: Path) -> DcmtkStoreSCP:
        folder.mkdir(parents=True)
        self.folder = folder
        self.proc = subprocess.Popen([dcmtk("storescp"), "-aet", self.aet, "+xa", "+B", "+uf", "-od", str(folder),
                                      str(self.port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        wait_listening(self.port, "storescp")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def received(self) -> dict[str, Path]:
        assert self.folder is not None
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in self.folder.iterdir()}


@dataclass
class StubSCP:
    """A pynetdicom storage SCP that records what it receives; ``answer`` decides each status (default Success)."""

    aet: str
    syntaxes: tuple[str, ...] = ()  # empty: pynetdicom's default (uncompressed) plus every compressed one
    port: int = field(default_factory=free_port)
    answer: Callable[[Dataset], int] = lambda ds: 0x0000
    delay: float = 0.0
    received: list[tuple[Dataset, str, str, int | None]] = field(default_factory=list)
    server: Any = None

    def start(self) -> StubSCP:
        from pynetdicom import ALL_TRANSFER_SYNTAXES

        ae = AE(self.aet)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(self.syntaxes) or ALL_TRANSFER_SYNTAXES)

        def on_store(event: evt.Event) -> int:
            time.sleep(self.delay)
            ds = event.dataset
            ds.file_meta = event.file_meta
            rq = event.request
            self.received.append((ds, str(event.context.transfer_syntax),
                                  str(rq.MoveOriginatorApplicationEntityTitle or "").strip(),
                                  rq.MoveOriginatorMessageID))  # fmt: skip
            return self.answer(ds)

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def modality(self, **flags: bool) -> dict[str, Any]:
        return {"AET": self.aet, "Host": "127.0.0.1", "Port": self.port, **flags}

    def sop_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds, *_ in self.received]


# -- the node and its data (one for the module: every test only reads from it) ----------------------------------


@dataclass
class World:
    node: Node
    dest: DcmtkStoreSCP
    stubs: dict[str, StubSCP]
    files: dict[str, Path]  # SOPInstanceUID -> the file sent to the node
    studies: dict[str, list[str]]  # StudyInstanceUID -> SOPInstanceUIDs
    series: dict[str, list[str]]
    knee: list[str]
    broken: str


def _broken_instance(path: Path) -> Path:
    """A CT whose pixel data claims JPEG 2000 but is noise: stored as it is, no decoder can decompress it."""
    ds = make_dataset(patient_id=BROKEN_PATIENT, study_uid="1.2.826.0.1.3680043.99.9", sop_class=CT,
                      series_uid="1.2.826.0.1.3680043.99.9.1")  # fmt: skip
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([b"\x00\x01not a JPEG 2000 codestream" * 4])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("qr")
    src = tmp / "src"
    src.mkdir()
    studies: dict[str, list[str]] = {STUDY_A: [], STUDY_B: []}
    series: dict[str, list[str]] = {SERIES_A1: [], SERIES_A2: [], SERIES_B1: []}
    files: dict[str, Path] = {}
    layout = [(STUDY_A, SERIES_A1, "ACC-A", 2), (STUDY_A, SERIES_A2, "ACC-A", 2), (STUDY_B, SERIES_B1, "ACC-B", 1)]
    for study, ser, accession, n in layout:
        for i in range(n):
            sop = f"{ser}.{i + 1}"
            files[sop] = make_instance(src / f"{sop}.dcm", patient_id=PATIENT, study_uid=study, series_uid=ser,
                                       sop_uid=sop, AccessionNumber=accession, InstanceNumber=i + 1)  # fmt: skip
            studies[study].append(sop)
            series[ser].append(sop)
    knee_files = sorted((SAMPLES / "Knee" / "T1").iterdir())[:2] + sorted((SAMPLES / "Knee" / "T2").iterdir())[:1]
    knee = []
    for p in knee_files:
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        files[uid] = p
        knee.append(uid)
    broken = _broken_instance(src / "broken.dcm")
    broken_uid = str(pydicom.dcmread(broken, stop_before_pixels=True).SOPInstanceUID)
    files[broken_uid] = broken

    dest = DcmtkStoreSCP(free_port())
    stubs = {
        "recorder": StubSCP("RECORDER"),
        "plain": StubSCP("PLAIN", syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        "picky": StubSCP("PICKY", answer=lambda ds: 0xA700 if str(ds.SOPInstanceUID) == f"{SERIES_A2}.1" else 0),
        "refuser": StubSCP("REFUSER", answer=lambda ds: 0xC000),
        "slow": StubSCP("SLOW", delay=0.4),
    }
    scu = {"AllowEcho": True, "AllowStore": False, "AllowFind": True, "AllowMove": True, "AllowGet": True}
    modalities: dict[str, Any] = {
        "dest": [dest.aet, "127.0.0.1", dest.port],
        "down": ["DOWN", "127.0.0.1", free_port()],  # nothing listens there
        **{name: stub.modality() for name, stub in stubs.items()},
        "movescu": {"AET": "MOVESCU", "Host": "127.0.0.1", "Port": 104, **scu},
        "getscu": {"AET": "GETSCU", "Host": "127.0.0.1", "Port": 104, **scu},
        "pyscu": {"AET": "PYSCU", "Host": "127.0.0.1", "Port": 104, **scu},
        "nomove": {"AET": "NOMOVE", "Host": "127.0.0.1", "Port": 104, **scu, "AllowMove": False, "AllowGet": False},
    }
    workdir = tmp / "node"
    workdir.mkdir()
    node = Node(workdir=workdir, port=free_port(), config={
        "DicomModalities": modalities, "DicomAlwaysAllowMove": False, "DicomAlwaysAllowGet": False,
        "DicomReceiverProcesses": 2, "RoutingWorkers": 1})  # fmt: skip
    for stub in stubs.values():
        stub.start()
    try:
        node.start()
        paths = list(files.values())
        profile = storescu_profile(paths, tmp / "profile.cfg")
        r = run([dcmtk("storescu"), "-aec", node.aet, *profile, "127.0.0.1", str(node.port), *map(str, paths)])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert len(node.query('SELECT id FROM "instance"')) == len(files)
        yield World(node, dest, stubs, files, studies, series, knee, broken_uid)
    finally:
        node.stop()
        for stub in stubs.values():
            stub.stop()


@pytest.fixture
def dest(world: World, tmp_path: Path) -> Iterator[DcmtkStoreSCP]:
    world.dest.start(tmp_path / "received")
    yield world.dest
    world.dest.stop()


@pytest.fixture
def stubs(world: World) -> dict[str, StubSCP]:
    for stub in world.stubs.values():
        stub.received.clear()
    return world.stubs


# -- clients ----------------------------------------------------------------------------------------------------


def movescu(world: World, root: str, keys: dict[str, str], *, to: str = "DEST", aet: str = "MOVESCU") -> str:
    args = [f"{k}={v}" for k, v in keys.items()]
    r = run([dcmtk("movescu"), "-v", root, "-aet", aet, "-aec", world.node.aet, "-aem", to,
             *[a for arg in args for a in ("-k", arg)], "127.0.0.1", str(world.node.port)])  # fmt: skip
    return r.stdout + r.stderr


def getscu(world: World, keys: dict[str, str], folder: Path, *extra: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    args = [f"{k}={v}" for k, v in keys.items()]
    r = run([dcmtk("getscu"), "-v", "-S", "+B", *extra, "-aet", "GETSCU", "-aec", world.node.aet, "-od", str(folder),
             *[a for arg in args for a in ("-k", arg)], "127.0.0.1", str(world.node.port)])  # fmt: skip
    return r.stdout + r.stderr


def final_move_status(output: str) -> str:
    m = re.search(r"Received Final Move Response \(([^)]*)\)", output)
    assert m, output[-3000:]
    return m.group(1)


def identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def pyscu(world: World, *, aet: str = "PYSCU", get_syntaxes: dict[str, list[str]] | None = None,
          on_store: Callable[[evt.Event], int] | None = None) -> Any:  # fmt: skip
    """A pynetdicom association to the node: Q/R MOVE and GET, plus storage contexts (SCP role) for C-GET."""
    ae = AE(aet)
    for model in (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
                  PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet):  # fmt: skip
        ae.add_requested_context(model)
    roles = []
    for sop_class, syntaxes in (get_syntaxes or {}).items():
        for ts in syntaxes:  # one context per syntax: the node may then pick the instance's own
            ae.add_requested_context(sop_class, ts)
        roles.append(build_role(sop_class, scp_role=True))
    handlers = [(evt.EVT_C_STORE, on_store or (lambda e: 0x0000))]
    assoc = ae.associate("127.0.0.1", world.node.port, ae_title=world.node.aet, ext_neg=roles,
                         evt_handlers=handlers)  # fmt: skip
    assert assoc.is_established
    return assoc


def responses(gen: Iterator[tuple[Dataset, Dataset | None]]) -> list[tuple[Dataset, Dataset | None]]:
    out = list(gen)
    assert out and all(status is not None and "Status" in status for status, _ in out), out
    return out


def counts(status: Dataset) -> tuple[int | None, int, int, int]:
    """(remaining, completed, failed, warning) of a C-MOVE/C-GET response."""
    return (status.get("NumberOfRemainingSuboperations"), status.get("NumberOfCompletedSuboperations", 0),
            status.get("NumberOfFailedSuboperations", 0), status.get("NumberOfWarningSuboperations", 0))  # fmt: skip


def failed_uids(ident: Dataset | None) -> list[str]:
    """The Failed SOP Instance UID List of a final response (one value or several)."""
    assert ident is not None and "FailedSOPInstanceUIDList" in ident
    value = ident.FailedSOPInstanceUIDList
    return sorted([value] if isinstance(value, str) else value)


def same_dataset(world: World, received: Path, sop_uid: str) -> None:
    """What the destination wrote is byte for byte the dataset the node stored."""
    assert dataset_bytes(received) == dataset_bytes(world.node.file_of(sop_uid)), sop_uid


def same_pixels(received: Dataset | Path, original: Path) -> None:
    got = received if isinstance(received, Dataset) else pydicom.dcmread(received)
    assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert np.array_equal(got.pixel_array, pydicom.dcmread(original).pixel_array)


# -- C-MOVE with DCMTK -----------------------------------------------------------------------------------------


def test_movescu_every_level_and_both_roots_byte_identical(world: World, dest: DcmtkStoreSCP) -> None:
    cases: list[tuple[str, dict[str, str], list[str]]] = [
        ("-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY_A}, world.studies[STUDY_A]),
        ("-S", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": STUDY_A, "SeriesInstanceUID": SERIES_A2},
         world.series[SERIES_A2]),
        ("-S", {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY_A, "SeriesInstanceUID": SERIES_A1,
                "SOPInstanceUID": "\\".join(world.series[SERIES_A1])}, world.series[SERIES_A1]),
        ("-P", {"QueryRetrieveLevel": "PATIENT", "PatientID": PATIENT},
         world.studies[STUDY_A] + world.studies[STUDY_B]),
        ("-P", {"QueryRetrieveLevel": "STUDY", "PatientID": "887", "StudyInstanceUID": KNEE_STUDY}, world.knee),
        ("-S", {"QueryRetrieveLevel": "STUDY", "AccessionNumber": "ACC-B"}, world.studies[STUDY_B]),
        ("-P", {"QueryRetrieveLevel": "IMAGE", "PatientID": "887", "StudyInstanceUID": KNEE_STUDY,
                "SeriesInstanceUID": str(pydicom.dcmread(world.files[world.knee[0]]).SeriesInstanceUID),
                "SOPInstanceUID": world.knee[0]}, world.knee[:1]),
    ]  # fmt: skip
    seen: set[Path] = set()
    for root, keys, expected in cases:
        out = movescu(world, root, keys)
        assert final_move_status(out) == "Success", out[-3000:]
        assert dest.folder is not None
        new = set(dest.folder.iterdir()) - seen  # storescp +uf: one new file per C-STORE, repeats included
        seen |= new
        got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in new}
        assert len(got) == len(new) and sorted(got) == sorted(expected), (keys, sorted(got))
        for uid, path in got.items():
            same_dataset(world, path, uid)
    # The JPEG 2000 Knee went as stored (storescp +xa accepts it): no decompression on the way.
    knee_file = dest.received()[world.knee[0]]
    assert pydicom.dcmread(knee_file, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000
    sent = [e for e in world.node.events("sent") if e.get("service") == "C-MOVE" and e["destination"] == "dest"]
    assert {e["sop_instance_uid"] for e in sent} == {uid for _, _, expected in cases for uid in expected}
    assert all(e["instance"] and e["study"] and e["status"] == "0x0000" for e in sent)


def test_movescu_to_unknown_destination_is_a801_and_no_match_is_an_empty_success(
    world: World, dest: DcmtkStoreSCP
) -> None:
    out = movescu(world, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY_A}, to="NOBODY")
    assert final_move_status(out) == "Refused: MoveDestinationUnknown"
    refused = [e for e in world.node.events("retrieve refused") if e.get("destination") == "NOBODY"]
    assert refused and refused[-1]["status"] == "0xA801"
    # known but down: pynetdicom cannot associate and answers 0xA801 too; our log says it was never connected
    out = movescu(world, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY_A}, to="DOWN")
    assert final_move_status(out) == "Refused: MoveDestinationUnknown"
    assert [e for e in world.node.events("retrieve done") if e["destination"] == "down"][-1]["connected"] is False
    out = movescu(world, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3.4.5.6.7.8.9"})
    assert final_move_status(out) == "Success"
    assert dest.received() == {}


def test_destination_added_over_rest_is_known_at_once(world: World, stubs: dict[str, StubSCP]) -> None:
    http = world.node.rest()
    recorder = stubs["recorder"]
    r = http.put("/modalities/late", json={"AET": "LATECOMER", "Host": "127.0.0.1", "Port": recorder.port})
    assert r.status_code == 200, r.text
    try:
        time.sleep(1.2)  # the receivers re-read the known modalities at most once a second
        out = movescu(world, "-S", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": STUDY_B,
                                    "SeriesInstanceUID": SERIES_B1}, to="latecomer")  # fmt: skip
        assert final_move_status(out) == "Success", out[-2000:]
        assert recorder.sop_uids() == world.series[SERIES_B1]
    finally:
        http.delete("/modalities/late")


# -- C-MOVE with pynetdicom: counts, originator, failures, cancel, refusals ------------------------------------


def test_pending_counts_and_move_originator(world: World, stubs: dict[str, StubSCP]) -> None:
    assoc = pyscu(world)
    try:
        out = responses(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=STUDY_A), "RECORDER",
                                          StudyRootQueryRetrieveInformationModelMove, msg_id=7))  # fmt: skip
    finally:
        assoc.release()
    n = len(world.studies[STUDY_A])
    *pending, (final, _) = out
    assert [s.Status for s, _ in pending] == [0xFF00] * n
    assert [counts(s) for s, _ in pending] == [(n - i - 1, i + 1, 0, 0) for i in range(n)]
    assert final.Status == 0x0000 and counts(final)[1:] == (n, 0, 0)
    recorder = stubs["recorder"]
    assert recorder.sop_uids() == world.studies[STUDY_A]  # series by series, in instance order
    assert {(orig, orig_id) for *_, orig, orig_id in recorder.received} == {("PYSCU", 7)}
    for ds, ts, *_ in recorder.received:
        assert ts == ExplicitVRLittleEndian
        assert ds == pydicom.dcmread(world.files[str(ds.SOPInstanceUID)])


def test_refusals_give_a_warning_or_failure_with_the_failed_instances(world: World, stubs: dict[str, StubSCP]) -> None:
    assoc = pyscu(world)
    try:
        out = responses(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=STUDY_A), "PICKY",
                                          StudyRootQueryRetrieveInformationModelMove))  # fmt: skip
        final, ident = out[-1]
        assert final.Status == 0xB000 and counts(final)[1:] == (3, 1, 0)
        assert failed_uids(ident) == [f"{SERIES_A2}.1"]
        assert len(stubs["picky"].received) == 4  # the move went on past the refusal

        out = responses(assoc.send_c_move(identifier("SERIES", StudyInstanceUID=STUDY_A, SeriesInstanceUID=SERIES_A1),
                                          "REFUSER", StudyRootQueryRetrieveInformationModelMove))  # fmt: skip
        final, ident = out[-1]
        assert final.Status == 0xA702 and counts(final)[1:] == (0, 2, 0)
        assert failed_uids(ident) == world.series[SERIES_A1]
    finally:
        assoc.release()
    failed = [e for e in world.node.events("failed") if e.get("service") == "C-MOVE"]
    assert {(e["destination"], e["sop_instance_uid"], e["status"]) for e in failed} >= {
        ("picky", f"{SERIES_A2}.1", "0xA700"),
        *(("refuser", uid, "0xC000") for uid in world.series[SERIES_A1]),
    }


def test_cancel_during_a_move(world: World, stubs: dict[str, StubSCP]) -> None:
    assoc = pyscu(world)
    n = len(world.studies[STUDY_A]) + len(world.studies[STUDY_B])
    try:
        out = []
        for status, ident in assoc.send_c_move(identifier("PATIENT", PatientID=PATIENT), "SLOW",
                                               PatientRootQueryRetrieveInformationModelMove, msg_id=3):  # fmt: skip
            out.append((status, ident))
            if len(out) == 1:
                assoc.send_c_cancel(3, query_model=PatientRootQueryRetrieveInformationModelMove)
        assert assoc.is_established
    finally:
        assoc.release()
    final = out[-1][0]
    assert final.Status == 0xFE00
    remaining, completed, failed, warning = counts(final)
    assert remaining is not None and remaining > 0 and completed >= 1 and failed == warning == 0
    assert completed + remaining == n
    assert len(stubs["slow"].received) == completed
    done = [e for e in world.node.events("retrieve done") if e["destination"] == "slow"]
    assert done[-1]["cancelled"] is True and done[-1]["completed"] == completed


def test_move_decompresses_for_a_destination_without_jpeg2000(world: World, stubs: dict[str, StubSCP]) -> None:
    assoc = pyscu(world)
    try:
        out = responses(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=KNEE_STUDY), "PLAIN",
                                          StudyRootQueryRetrieveInformationModelMove))  # fmt: skip
    finally:
        assoc.release()
    assert out[-1][0].Status == 0x0000
    plain = stubs["plain"]
    assert sorted(plain.sop_uids()) == sorted(world.knee)
    for ds, ts, *_ in plain.received:
        assert ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        same_pixels(ds, world.files[str(ds.SOPInstanceUID)])
    sent = [e for e in world.node.events("sent") if e.get("destination") == "plain"]
    assert {e["transfer_syntax"] for e in sent} == {ExplicitVRLittleEndian}


def test_identifier_errors_and_permissions(world: World, stubs: dict[str, StubSCP]) -> None:
    study_move, patient_move = StudyRootQueryRetrieveInformationModelMove, PatientRootQueryRetrieveInformationModelMove
    study_get = StudyRootQueryRetrieveInformationModelGet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that "*" is not valid in a UI
        wildcard = identifier("STUDY", StudyInstanceUID="1.2.826.0.1.3680043.99.*")
    assoc = pyscu(world)
    try:
        for ds, model, expected in [
            (identifier("PATIENT", PatientID=PATIENT), study_move, 0xA900),  # Study Root has no patient level
            (identifier("STUDY", PatientID=PATIENT), patient_move, 0xA900),  # no key of the level
            (identifier("GALAXY", StudyInstanceUID=STUDY_A), study_move, 0xA900),
            (identifier("STUDY", StudyInstanceUID="9.9.9"), study_move, 0x0000),  # nothing matches
            (wildcard, study_move, 0x0000),  # unique keys match exactly: no wildcard
        ]:
            [(final, _)] = responses(assoc.send_c_move(ds, "RECORDER", model))
            assert final.Status == expected, (ds, hex(final.Status))
        [(final, _)] = responses(assoc.send_c_get(identifier("SERIES", StudyInstanceUID=STUDY_A), study_get))
        assert final.Status == 0xA900 and "SeriesInstanceUID" in final.get("ErrorComment", "")
        # no level: deduced from the deepest key given (as Orthanc does for such SCUs)
        no_level = Dataset()
        no_level.StudyInstanceUID = STUDY_B
        no_level.SeriesInstanceUID = SERIES_B1
        out = responses(assoc.send_c_move(no_level, "RECORDER", study_move))
        assert out[-1][0].Status == 0x0000 and stubs["recorder"].sop_uids() == world.series[SERIES_B1]
    finally:
        assoc.release()

    refused = pyscu(world, aet="NOMOVE", get_syntaxes={CT: [ExplicitVRLittleEndian]})
    try:
        [(final, _)] = responses(refused.send_c_move(identifier("STUDY", StudyInstanceUID=STUDY_A), "RECORDER",
                                                     study_move))  # fmt: skip
        assert final.Status == 0x0124
        [(final, _)] = responses(refused.send_c_get(identifier("STUDY", StudyInstanceUID=STUDY_A), study_get))
        assert final.Status == 0x0124
    finally:
        refused.release()
    assert stubs["recorder"].sop_uids() == world.series[SERIES_B1]  # nothing more reached the destination
    reasons = {(e["service"], e["status"]) for e in world.node.events("retrieve refused") if e["peer_aet"] == "NOMOVE"}
    assert reasons == {("C-MOVE", "0x0124"), ("C-GET", "0x0124")}
    text = movescu(world, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY_A}, to="RECORDER",
                   aet="NOMOVE")  # fmt: skip
    assert final_move_status(text) == "Unknown Status: 0x124"  # (DCMTK names no general status for C-MOVE)


# -- C-GET ------------------------------------------------------------------------------------------------------


def test_getscu_into_a_folder_as_stored_or_decompressed(world: World, tmp_path: Path) -> None:
    study_a = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY_A}
    out = getscu(world, study_a, tmp_path / "a")
    assert "Number of Completed Suboperations : 4" in out and "Number of Failed Suboperations    : 0" in out, out
    got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in (tmp_path / "a").iterdir()}
    assert sorted(got) == sorted(world.studies[STUDY_A])
    for uid, path in got.items():
        same_dataset(world, path, uid)

    knee = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": KNEE_STUDY}
    out = getscu(world, knee, tmp_path / "j2k", "+xw")  # JPEG 2000 lossy accepted: sent as stored
    assert "Number of Completed Suboperations : 3" in out, out
    for p in (tmp_path / "j2k").iterdir():
        same_dataset(world, p, str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))

    out = getscu(world, knee, tmp_path / "plain")  # uncompressed only: decompressed for this peer
    assert "Number of Completed Suboperations : 3" in out, out
    received = list((tmp_path / "plain").iterdir())
    assert len(received) == 3
    for p in received:
        same_pixels(p, world.files[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)])


def test_get_counts_failures_and_only_uses_the_contexts_the_peer_accepted(world: World) -> None:
    received: list[tuple[str, str]] = []

    def on_store(event: evt.Event) -> int:
        received.append((str(event.request.AffectedSOPInstanceUID), str(event.context.transfer_syntax)))
        return 0x0000

    # MR in JPEG 2000 or uncompressed (the node picks the stored syntax), CT uncompressed only
    syntaxes = {MRImageStorage: [JPEG2000, ExplicitVRLittleEndian], CT: [ExplicitVRLittleEndian]}
    assoc = pyscu(world, get_syntaxes=syntaxes, on_store=on_store)
    try:
        out = responses(assoc.send_c_get(identifier("STUDY", StudyInstanceUID=KNEE_STUDY),
                                         StudyRootQueryRetrieveInformationModelGet, msg_id=1))  # fmt: skip
        assert out[-1][0].Status == 0x0000 and counts(out[-1][0])[1:] == (3, 0, 0)
        assert [counts(s) for s, _ in out[:-1]] == [(2, 1, 0, 0), (1, 2, 0, 0), (0, 3, 0, 0)]
        assert {ts for _, ts in received} == {JPEG2000}

        # the undecodable JPEG 2000 CT: the peer takes CT uncompressed only, no decoder can make it so
        received.clear()
        out = responses(assoc.send_c_get(identifier("PATIENT", PatientID=BROKEN_PATIENT),
                                         PatientRootQueryRetrieveInformationModelGet))  # fmt: skip
        final, ident = out[-1]
        assert final.Status == 0xA702 and counts(final)[1:] == (0, 1, 0)
        assert failed_uids(ident) == [world.broken]
        assert received == []

    finally:
        assoc.release()
    [failure] = [e for e in world.node.events("failed") if e.get("sop_instance_uid") == world.broken]
    assert failure["service"] == "C-GET" and "converting to" in failure["error"] and "failed" in failure["error"]

    mr_only = pyscu(world, get_syntaxes={MRImageStorage: [ExplicitVRLittleEndian]})
    try:
        out = responses(mr_only.send_c_get(identifier("STUDY", StudyInstanceUID=STUDY_B),
                                           StudyRootQueryRetrieveInformationModelGet))  # fmt: skip
        final, ident = out[-1]
        assert final.Status == 0xA702 and failed_uids(ident) == [f"{SERIES_B1}.1"]
    finally:
        mr_only.release()
    [no_context] = [e for e in world.node.events("failed") if e.get("sop_instance_uid") == f"{SERIES_B1}.1"]
    assert "accepts SOP class" in no_context["error"]


def test_cancel_during_a_get(world: World) -> None:
    def slow_store(event: evt.Event) -> int:
        time.sleep(0.3)
        return 0x0000

    assoc = pyscu(world, get_syntaxes={CT: [ExplicitVRLittleEndian]}, on_store=slow_store)
    cancelled = threading.Event()
    try:
        out = []
        for status, ident in assoc.send_c_get(identifier("PATIENT", PatientID=PATIENT),
                                              PatientRootQueryRetrieveInformationModelGet, msg_id=5):  # fmt: skip
            out.append((status, ident))
            if not cancelled.is_set():
                cancelled.set()
                assoc.send_c_cancel(5, query_model=PatientRootQueryRetrieveInformationModelGet)
    finally:
        assoc.release()
    final = out[-1][0]
    remaining, completed, failed, _ = counts(final)
    assert final.Status == 0xFE00 and remaining is not None and remaining > 0 and completed >= 1 and failed == 0
