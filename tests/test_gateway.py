"""The de-identify-and-forward gateway end to end, with real peers on loopback.

DCMTK ``storescu`` sends to the node; the node's rules anonymize and forward to DCMTK ``storescp`` (``+uf``: one
file per received C-STORE, so a duplicate shows up as a second file), to a second dicom-node, or to a small
pynetdicom SCP whose answers a test controls (refusals, uncompressed syntaxes only).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import SAMPLES, Node, dcmtk, dcmtk_env, free_port, make_instance, storescu_profile, wait_listening
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from test_scp import storescu, successes

ANON = {"Name": "anon", "Anonymize": {"DicomVersion": "2023b"}, "Forward": ["dest"], "Project": "research"}
DICOM_ROOT = "1.2.840.10008."  # SOP classes, transfer syntaxes: not identifying


def wait_for(cond: Callable[[], bool], timeout: float, what: str, node: Node | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}" + (f"\n{node.log()[-6000:]}" if node else ""))


@dataclass
class StoreSCP:
    """DCMTK storescp as the destination, writing every received instance to its own file."""

    folder: Path
    port: int = field(default_factory=free_port)
    aet: str = "DEST"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([dcmtk("storescp"), "-aet", self.aet, "+xa", "+uf", "-od", str(self.folder),
                                      str(self.port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        wait_listening(self.port, "storescp")  # (a fixed sleep here lost associations on a loaded machine)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def modality(self) -> list[Any]:
        return [self.aet, "127.0.0.1", self.port]

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file()) if self.folder.exists() else []

    def datasets(self) -> list[Dataset]:
        return [pydicom.dcmread(p) for p in self.files()]


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "received")
    yield scp
    scp.stop()


@dataclass
class StubSCP:
    """A pynetdicom storage SCP whose status and accepted transfer syntaxes the test sets."""

    status: int = 0x0000
    syntaxes: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    received: list[tuple[Dataset, str]] = field(default_factory=list)
    server: Any = None

    def start(self) -> StubSCP:
        ae = AE("STUB")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(self.syntaxes) or None)

        def on_store(event: evt.Event) -> int:
            if self.status == 0:
                self.received.append((event.dataset, str(event.context.transfer_syntax)))
            return self.status

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args, "--config", str(node.workdir / "node.json")],
                          capture_output=True, text=True, timeout=60, cwd=node.workdir)  # fmt: skip


def queue(node: Node) -> dict[str, Any]:
    r = cli(node, "queue", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def all_uids(ds: Dataset) -> Iterator[str]:
    """Every UI value at any depth (multi-valued ones value by value)."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from all_uids(item)
        elif elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
            yield from (str(v) for v in values)


def uid_pairs(original: Dataset, new: Dataset) -> Iterator[tuple[str, str]]:
    """(old, new) for every UI value found at the same place in both datasets, at any depth."""
    for elem in new:
        if elem.tag not in original:
            continue
        old = original[elem.tag]
        if elem.VR == "SQ" and old.VR == "SQ" and len(elem.value) == len(old.value):
            for a, b in zip(old.value, elem.value, strict=True):
                yield from uid_pairs(a, b)
        elif elem.VR == "UI" and old.VR == "UI":
            yield from zip(str(old.value).split("\\"), str(elem.value).split("\\"), strict=False)


def sample_study(*names: str) -> list[Path]:
    return [p for name in names for p in sorted((SAMPLES / name).rglob("*.dcm"))]


def test_each_study_arrives_as_one_consistent_new_study_without_phi(node_factory, dest, tmp_path) -> None:
    """Brainix and Knee through an anonymize-2023b + forward rule that runs per instance."""
    dest.start()
    node = node_factory(DicomModalities={"dest": dest.modality}, Routes=[ANON]).start()
    files = sample_study("Brainix", "Knee")
    r = storescu(node, files, profile=storescu_profile(files, tmp_path / "profile.cfg"))
    assert len(successes(r.stdout + r.stderr)) == len(files), r.stderr[-3000:]
    originals = [pydicom.dcmread(f) for f in files]
    unique = {o.SOPInstanceUID for o in originals}
    wait_for(lambda: len({d.SOPInstanceUID for d in dest.datasets()}) >= len(unique) and not queue(node)[
        "Destinations"][0]["Pending"], 120, "every instance at the destination", node)  # fmt: skip
    time.sleep(0.5)
    received = dest.datasets()
    assert len(received) == len(unique) == len({d.SOPInstanceUID for d in received})  # each once
    assert not node.events("retry")  # (pynetdicom's reactor used to eat a C-STORE-RSP now and then: scu.py)

    def shape(datasets: list[Dataset]) -> list[tuple[int, list[int]]]:
        """Per study: its instance count and the sizes of its series, sorted."""
        studies: dict[str, Counter[str]] = {}
        for d in datasets:
            studies.setdefault(d.StudyInstanceUID, Counter())[d.SeriesInstanceUID] += 1
        return sorted((sum(c.values()), sorted(c.values())) for c in studies.values())

    # One new study (and series) per original one, although the rule ran instance by instance.
    assert shape(received) == shape(originals)
    original_uids = {u for o in originals for u in all_uids(o) if not u.startswith(DICOM_ROOT)}
    for d in received:
        assert not set(all_uids(d)) & original_uids
    # Consistency: across all instances, each original UID (study, series, frame of reference, references…)
    # became exactly one new UID, and no two became the same one. Instances are paired by their pixels.
    by_pixels = {o.PixelData: o for o in originals}
    pixels_of: dict[str, set[bytes]] = {}
    for o in originals:
        pixels_of.setdefault(str(o.PatientID), set()).add(o.PixelData)
    forward, backward = {}, {}
    for d in received:
        for old, new in uid_pairs(by_pixels[d.PixelData], d):
            if not old.startswith(DICOM_ROOT):
                forward.setdefault(old, set()).add(new)
                backward.setdefault(new, set()).add(old)
    assert len(forward) > 100 and all(len(v) == 1 for v in forward.values())
    assert all(len(v) == 1 for v in backward.values())
    phi = set()
    for o in originals:
        for kw in ("PatientName", "PatientID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
                   "PatientBirthDate", "InstitutionName", "ReferringPhysicianName", "AccessionNumber"):  # fmt: skip
            value = str(o.get(kw, "") or "").strip()
            # Knee's PatientName is "KNEE", which is also its BodyPartExamined (kept by the profile: not PHI).
            if len(value) >= 4 and value != str(o.get("BodyPartExamined", "")):
                phi.add(value.encode())
    phi |= {u.encode() for u in original_uids}
    for path in dest.files():
        data = path.read_bytes()
        leaked = [v for v in phi if v in data]
        assert not leaked, f"{path.name} holds {leaked[:5]}"
    names = {str(o.PatientID): {str(d.PatientName) for d in received if d.PixelData in pixels_of[str(o.PatientID)]}
             for o in originals}  # fmt: skip
    assert all(len(n) == 1 for n in names.values())  # one pseudonym per patient, whichever worker ran
    assert sorted(n.pop() for n in names.values()) == ["Anonymized1", "Anonymized2"]
    [st] = queue(node)["Destinations"]
    assert (st["Destination"], st["Done"], st["Pending"], st["Dead"]) == ("dest", len(unique), 0, 0)
    sent = node.events("sent")
    assert len(sent) == len(unique) and {e["rule"] for e in sent} == {"anon"}  # one success per row
    assert len(node.events("queued")) == len(unique)


def test_a_destination_down_gets_everything_once_it_is_up(node_factory, dest) -> None:
    """Down when the study arrives, started 30 s later: all arrives, once; the backoff shows in the log."""
    node = node_factory(DicomModalities={"dest": dest.modality}, Routes=[ANON], RoutingRetryDelay=1,
                        RoutingRetryMaxDelay=8, RoutingMaxAttempts=50).start()  # fmt: skip
    files = sample_study("Brainix")
    r = storescu(node, files)
    assert len(successes(r.stdout + r.stderr)) == len(files)
    time.sleep(30)
    retries = node.events("retry")
    assert retries and all("no connection" in e["error"] for e in retries)
    delays = [e["retry_in_s"] for e in retries]
    assert max(delays) > 2 * min(delays)  # backing off, not hammering
    # Doubling from 1 s up to 8 s (at least half of each delay is fixed): at most 10 attempts in 30 s.
    assert max(e["attempt"] for e in retries) <= 10
    assert queue(node)["Destinations"][0]["Pending"] == len(files)
    dest.start()
    wait_for(lambda: len(dest.files()) >= len(files), 60, "the queue to drain", node)
    time.sleep(1)
    sops = Counter(d.SOPInstanceUID for d in dest.datasets())
    assert len(sops) == len(files) and set(sops.values()) == {1}
    assert Counter((e["instance"], e["rule"], e["destination"]) for e in node.events("sent")).most_common(1)[0][1] == 1
    assert {n for (n,) in node.query("SELECT attempts FROM outbox")} - {1} != set()


def test_refusals_end_dead_with_their_status_and_queue_retry_sends_them(node_factory, tmp_path) -> None:
    stub = StubSCP(status=0xA700).start()
    try:
        node = node_factory(DicomModalities={"dest": ["STUB", "127.0.0.1", stub.port]}, Routes=[ANON],
                            RoutingRetryDelay=1, RoutingRetryMaxDelay=1, RoutingMaxAttempts=2).start()  # fmt: skip
        files = [make_instance(tmp_path / f"{i}.dcm", study_uid="1.2.3.99") for i in range(5)]
        storescu(node, files)
        wait_for(lambda: len(node.events("dead")) == 5, 60, "five dead rows", node)
        rows = node.query("SELECT state, attempts, last_status, last_error FROM outbox")
        assert set(rows) == {("dead", 2, 0xA700, "status 0xA700")}
        assert {e["status"] for e in node.events("dead")} == {"0xA700"}
        out = cli(node, "queue")
        assert "dead: 5 rows to dest (anon): status 0xA700" in out.stdout
        stub.status = 0x0000
        r = cli(node, "queue", "retry", "--destination", "dest")
        assert r.stdout.startswith("5 rows due again")
        wait_for(lambda: {s for (s,) in node.query("SELECT state FROM outbox")} == {"done"}, 30, "the retried rows",
                 node)  # fmt: skip
        assert len(stub.received) == 5
        assert len({ds.StudyInstanceUID for ds, _ in stub.received}) == 1
    finally:
        stub.stop()


def test_kill_9_while_sending_loses_nothing(node_factory, dest, tmp_path) -> None:
    """200 instances queued and being sent when the node dies: after the restart all arrive; duplicates only
    for the rows that were in flight."""
    node = node_factory(DicomModalities={"dest": dest.modality}, Routes=[ANON], RoutingRetryDelay=1,
                        RoutingRetryMaxDelay=1, RoutingMaxAttempts=100, RoutingBatchSize=8).start()  # fmt: skip
    files = [make_instance(tmp_path / f"{i}.dcm", study_uid="1.2.3.200", series_uid="1.2.3.200.1", rows=64,
                           InstanceNumber=i) for i in range(200)]  # fmt: skip
    r = storescu(node, files)
    assert len(successes(r.stdout + r.stderr)) == 200
    dest.start()  # the queue starts draining now
    wait_for(lambda: len(dest.files()) >= 20, 60, "the first instances to arrive", node)
    node.kill9()
    in_flight = node.query("SELECT COUNT(*) FROM outbox WHERE state = 'claimed'")[0][0]
    done_before = node.query("SELECT COUNT(*) FROM outbox WHERE state = 'done'")[0][0]
    assert done_before < 200, "the kill came too late to test anything"
    node.start()
    wait_for(lambda: node.query("SELECT COUNT(*) FROM outbox WHERE state = 'done'")[0][0] == 200, 90,
             "every row delivered after the restart", node)  # fmt: skip
    time.sleep(0.5)
    sops = Counter(d.SOPInstanceUID for d in dest.datasets())
    duplicates = sum(sops.values()) - len(sops)
    print(f"kill -9: {done_before} delivered before, {in_flight} in flight, {duplicates} duplicates")
    assert len(sops) == 200
    assert duplicates <= in_flight
    assert len({d.StudyInstanceUID for d in dest.datasets()}) == 1  # the pseudonyms survived the restart


def test_a_stable_study_is_forwarded_once_and_complete(node_factory, dest) -> None:
    """Two bursts with a pause shorter than StableAge: one firing, every instance once, after the last one."""
    dest.start()
    rule = {**ANON, "Trigger": "StableStudy"}
    node = node_factory(DicomModalities={"dest": dest.modality}, Routes=[rule], StableAge=3).start()
    files = sample_study("Brainix")
    half = len(files) // 2
    storescu(node, files[:half])
    time.sleep(1.5)
    storescu(node, files[half:])
    last_stored = time.time()
    wait_for(lambda: len(dest.files()) >= len(files), 30, "the stable study", node)
    time.sleep(4)  # a second firing would have come by now
    assert len(dest.files()) == len(files)
    [fired] = [e for e in node.events("stable") if e["trigger"] == "StableStudy"]
    assert fired["instances"] == len(files) and fired["queued"] == len(files)
    first_sent = min(e["timestamp"] for e in node.events("sent"))
    assert time.mktime(time.strptime(first_sent[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone >= last_stored + 1
    assert len({d.StudyInstanceUID for d in dest.datasets()}) == 1


def test_a_second_dicom_node_as_destination(node_factory, tmp_path) -> None:
    second = node_factory(DicomAet="SECOND").start()
    gateway = node_factory(DicomModalities={"dest": [second.aet, "127.0.0.1", second.port]}, Routes=[ANON]).start()
    files = sample_study("Knee")
    storescu(gateway, files, profile=storescu_profile(files, tmp_path / "profile.cfg"))
    wait_for(lambda: second.query("SELECT COUNT(*) FROM instance")[0][0] == len(files), 60,
             "the instances in the second node", gateway)  # fmt: skip
    assert second.query("SELECT COUNT(*) FROM study")[0][0] == 1
    assert second.query("SELECT COUNT(*) FROM series")[0][0] == 2
    [(name,)] = second.query("SELECT patient_name FROM patient")
    assert name == "Anonymized1"
    assert {aet for (aet,) in second.query("SELECT remote_aet FROM instance")} == {"DICOMNODE"}
    originals = {pydicom.dcmread(f).StudyInstanceUID for f in files}
    assert not originals & {u for (u,) in second.query("SELECT study_uid FROM study")}


def test_filters_route_only_what_matches_and_every_matching_rule_acts(node_factory, dest, tmp_path) -> None:
    dest.start()
    routes = [
        {"Name": "mr", "Anonymize": {}, "Forward": ["dest"], "Filter": {"Tags": {"Modality": "MR"}}},
        {"Name": "heads", "Anonymize": {}, "Forward": ["dest"], "Project": "heads",
         "Filter": {"Tags": {"Modality": ["MR", "CT"], "StudyDescription": "*HEAD*"}, "CallingAet": "STORE*"}},
        {"Name": "elsewhere", "Forward": ["dest"], "Filter": {"CallingAet": "OTHER"}},
    ]  # fmt: skip
    node = node_factory(DicomModalities={"dest": dest.modality}, Routes=routes).start()
    mr = make_instance(tmp_path / "mr.dcm", Modality="MR", StudyDescription="MRI HEAD")
    ct = make_instance(tmp_path / "ct.dcm", Modality="CT", StudyDescription="CHEST")
    storescu(node, [mr, ct])
    wait_for(lambda: len(dest.files()) >= 2, 30, "the MR twice", node)
    time.sleep(1.5)
    received = dest.datasets()
    assert len(received) == 2 and {d.Modality for d in received} == {"MR"}
    assert len({d.StudyInstanceUID for d in received}) == 2  # two projects, two pseudonym maps
    assert node.query("SELECT COUNT(*) FROM instance")[0][0] == 2  # the CT is stored all the same
    assert sorted(r for (r,) in node.query("SELECT rule FROM outbox")) == ["heads", "mr"]


def test_a_destination_that_refuses_the_compressed_syntax_gets_it_decompressed(node_factory, tmp_path) -> None:
    stub = StubSCP(syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian)).start()
    try:
        node = node_factory(DicomModalities={"dest": ["STUB", "127.0.0.1", stub.port]},
                            Routes=[{"Name": "as-is", "Forward": ["dest"]}]).start()  # fmt: skip
        files = sample_study("Knee")[:3]
        storescu(node, files, profile=storescu_profile(files, tmp_path / "profile.cfg"))
        wait_for(lambda: len(stub.received) == 3, 60, "three decompressed instances", node)
        originals = {o.SOPInstanceUID: o for o in map(pydicom.dcmread, files)}
        for ds, syntax in stub.received:
            assert syntax == ExplicitVRLittleEndian
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = syntax
            assert np.array_equal(ds.pixel_array, originals[ds.SOPInstanceUID].pixel_array)  # lossless
        assert {e["transfer_syntax"] for e in node.events("sent")} == {ExplicitVRLittleEndian}
        wait_for(lambda: not list((node.storage / ".tmp").glob("w*/*")), 10, "no decompressed copy left", node)
    finally:
        stub.stop()


def test_a_rule_without_forward_replaces_the_source_by_its_anonymized_copy(node_factory, tmp_path) -> None:
    """Anonymize into our own archive and delete the original: the archive keeps no PHI, and what routing
    stores is not routed again."""
    rule = {"Name": "in-place", "Anonymize": {}, "DeleteSourceAfterSuccess": True}
    node = node_factory(Routes=[rule]).start()
    files = [make_instance(tmp_path / f"{i}.dcm", study_uid="1.2.3.77", PatientName="Doe^John") for i in range(3)]
    storescu(node, files)
    wait_for(lambda: node.query("SELECT COUNT(*) FROM outbox WHERE state = 'done'")[0][0] == 3, 30,
             "three local copies", node)  # fmt: skip
    wait_for(lambda: node.query("SELECT COUNT(*) FROM instance")[0][0] == 3, 10, "the sources deleted", node)
    time.sleep(1)
    assert node.query("SELECT COUNT(*) FROM instance")[0][0] == 3
    assert {n for (n,) in node.query("SELECT patient_name FROM patient")} == {"Anonymized1"}
    assert {o for (o,) in node.query("SELECT origin FROM instance")} == {"Routing"}
    assert node.query("SELECT COUNT(*) FROM outbox")[0][0] == 3
    for path in node.stored_files():
        assert b"Doe^John" not in path.read_bytes()


def test_two_nodes_sharing_a_pseudonym_key_agree_without_sharing_a_table(node_factory, tmp_path) -> None:
    key = tmp_path / "project.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    stubs = [StubSCP().start(), StubSCP().start()]
    try:
        rule = {**ANON, "PseudonymKeyFile": str(key)}
        nodes = [node_factory(DicomModalities={"dest": ["STUB", "127.0.0.1", s.port]}, Routes=[rule]).start()
                 for s in stubs]  # fmt: skip
        files = [make_instance(tmp_path / f"{i}.dcm", study_uid="1.2.3.55", patient_id="P55") for i in range(2)]
        for n in nodes:
            storescu(n, files)
        wait_for(lambda: all(len(s.received) == 2 for s in stubs), 30, "both destinations")
        results = [sorted((str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientID), str(ds.PatientName))
                          for ds, _ in s.received) for s in stubs]  # fmt: skip
        assert results[0] == results[1]
    finally:
        for s in stubs:
            s.stop()


def test_routes_are_validated_at_start_naming_the_rule(node_factory) -> None:
    node = node_factory(Routes=[{"Name": "bad", "Forward": ["nowhere"]}])
    node.start(wait=False)
    assert node.proc is not None and node.proc.wait(30) == 2
    assert "Routes[0] (bad).Forward: 'nowhere' is not in DicomModalities" in node.log()


def test_the_gateway_example_configuration_is_valid() -> None:
    from node import config

    cfg = config.build(Path(__file__).resolve().parents[1] / "conf" / "gateway.example.json")
    [route] = cfg.routes
    assert route.forward == ("dest",) and route.anonymize is not None and route.trigger == "Instance"


def test_a_source_is_deleted_only_after_every_rule_has_had_it(node_factory, tmp_path) -> None:
    """An instance rule that deletes its source must not take the instance away from a stable-study rule that
    has not fired yet; once both delivered, the source goes."""
    stubs = [StubSCP().start(), StubSCP().start()]
    try:
        routes = [{"Name": "now", "Forward": ["a"], "DeleteSourceAfterSuccess": True},
                  {"Name": "later", "Trigger": "StableStudy", "Forward": ["b"]}]  # fmt: skip
        node = node_factory(DicomModalities={"a": ["STUB", "127.0.0.1", stubs[0].port],
                                             "b": ["STUB", "127.0.0.1", stubs[1].port]},
                            Routes=routes, StableAge=2).start()  # fmt: skip
        files = [make_instance(tmp_path / f"{i}.dcm", study_uid="1.2.3.66") for i in range(2)]
        storescu(node, files)
        wait_for(lambda: len(stubs[0].received) == 2, 30, "the instance rule's deliveries", node)
        time.sleep(0.5)
        assert node.query("SELECT COUNT(*) FROM instance")[0][0] == 2  # kept for the stable rule
        wait_for(lambda: len(stubs[1].received) == 2, 30, "the stable rule's deliveries", node)
        wait_for(lambda: node.query("SELECT COUNT(*) FROM instance")[0][0] == 0, 30, "the sources deleted", node)
    finally:
        for s in stubs:
            s.stop()
