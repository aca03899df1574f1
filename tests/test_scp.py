"""The C-STORE/C-ECHO SCP driven by real DICOM peers (DCMTK echoscu/storescu/storescp, pynetdicom)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import (
    SAMPLES,
    Node,
    dataset_bytes,
    dcmtk,
    dcmtk_env,
    dicom_samples,
    free_port,
    make_instance,
    run,
    storescu_profile,
)
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

from node.dicom.ids import resource_ids


def storescu(node: Node, files: list[Path], *extra: str, aet: str = "STORESCU", called: str | None = None,
             profile: list[str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cmd = [dcmtk("storescu"), "-v", "-aet", aet, "-aec", called or node.aet, *(profile or ["-R"]), *extra,
           "127.0.0.1", str(node.port), *map(str, files)]  # fmt: skip
    return run(cmd)


def successes(output: str) -> list[str]:
    """Files storescu reports as stored with status Success (in order)."""
    done, current = [], None
    for line in output.splitlines():
        m = re.match(r"I: Sending file: (.*)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            done.append(current)
    return done


def test_echo_with_dcmtk(node_factory) -> None:
    node = node_factory().start()
    r = run([dcmtk("echoscu"), "-aec", node.aet, "127.0.0.1", str(node.port)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert node.events("association opened")


def test_all_samples_stored_once_and_byte_identical_to_what_storescp_receives(node_factory, tmp_path) -> None:
    files = dicom_samples()
    profile = storescu_profile(files, tmp_path / "profile.cfg")
    node = node_factory().start()
    r = storescu(node, files, profile=profile)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # A bit-preserving DCMTK storescp receives the same association: what it writes is what was sent.
    ref_dir, port = tmp_path / "storescp", free_port()
    ref_dir.mkdir()
    scp_profile = storescu_profile(files, tmp_path / "scp.cfg", acceptor=True)
    scp = subprocess.Popen([dcmtk("storescp"), "+B", *scp_profile, "-od", str(ref_dir), str(port)], env=dcmtk_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)
        r2 = run([dcmtk("storescu"), *profile, "127.0.0.1", str(port), *map(str, files)])
        assert r2.returncode == 0, r2.stderr[-2000:]
    finally:
        scp.terminate()
        scp.wait()
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in ref_dir.iterdir()}
    rows = node.query('SELECT sop_uid, file_uuid, file_sha256, file_size FROM "instance"')
    assert len(rows) == len(files) == len(received)
    assert len(node.stored_files()) == len(files)
    for sop_uid, uuid, sha, size in rows:
        stored = node.storage / uuid[:2] / uuid
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha and stored.stat().st_size == size
        assert dataset_bytes(stored) == dataset_bytes(received[sop_uid]), sop_uid
    # edge case 54: the Knee study's Orthanc IDs
    knee = pydicom.dcmread(SAMPLES / "Knee" / "T1" / "IM-0001-0001.dcm", stop_before_pixels=True)
    ids = resource_ids("887", knee.StudyInstanceUID, knee.SeriesInstanceUID, knee.SOPInstanceUID)
    assert node.query('SELECT public_id FROM "patient" WHERE patient_id = ?', "887") == [
        ("ca29faea-b6a0e17f-067743a1-8b778011-a48b2a17",)
    ]
    assert node.query('SELECT public_id FROM "series" WHERE series_uid = ?', knee.SeriesInstanceUID) == [
        ("6de73705-c4e65c1b-9d9ea1b5-cabcd8e7-f15e4285",)
    ]
    assert node.query('SELECT public_id FROM "instance" WHERE sop_uid = ?', knee.SOPInstanceUID) == [(ids.instance,)]
    assert len(node.events("stored")) == len(files)


@pytest.mark.parametrize("overwrite", [False, True])
def test_duplicates_follow_overwrite_instances(node_factory, tmp_path, overwrite) -> None:
    first = make_instance(tmp_path / "first.dcm", sop_uid="1.2.826.0.1.1", study_uid="1.2.826.0.1",
                          series_uid="1.2.826.0.1.0", StudyDescription="FIRST")  # fmt: skip
    ds = pydicom.dcmread(first)
    ds.StudyDescription = "SECOND"
    second = tmp_path / "second.dcm"
    ds.save_as(second)
    node = node_factory(OverwriteInstances=overwrite).start()
    for f in (first, second):
        r = storescu(node, [f])
        assert r.returncode == 0 and successes(r.stdout + r.stderr) == [str(f)], r.stdout
    assert node.query('SELECT count(*) FROM "instance"') == [(1,)]
    stored = node.file_of("1.2.826.0.1.1")
    assert pydicom.dcmread(stored).StudyDescription == ("SECOND" if overwrite else "FIRST")
    assert node.stored_files() == {stored}
    statuses = [e["status"] for e in node.events("stored")]
    assert statuses == (["Success", "Success"] if overwrite else ["Success", "AlreadyStored"])


DEFLATED = "1.2.840.10008.1.2.1.99"


def _raw_with_meta(
    path: Path, dataset: bytes, sop_uid: str = "1.2.826.0.1.99", ts: str = ExplicitVRLittleEndian
) -> Path:
    """A Part-10 file whose file meta is valid and whose dataset bytes are whatever we want to send."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    path.write_bytes(data[:meta_end])  # keep only preamble + file meta
    with open(path, "ab") as fh:
        fh.write(dataset)
    return path


def test_bad_input_gets_failure_statuses_and_the_association_stays_usable(node_factory, tmp_path) -> None:
    good = make_instance(tmp_path / "good.dcm", rows=64)
    truncated = tmp_path / "truncated.dcm"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) - 3000])
    noise = _raw_with_meta(tmp_path / "noise.dcm", bytes((i * 7919) % 251 for i in range(20000)))
    invalid_rows = SAMPLES / "DummyCTInvalidRows.dcm"
    # the meta says Deflated, the body is not a zlib stream
    deflated_noise = _raw_with_meta(tmp_path / "deflated.dcm", bytes(range(256)) * 10, "1.2.826.0.1.98", DEFLATED)
    node = node_factory().start()
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, like a buggy modality would
    try:
        ae = AE(ae_title="BADSENDER")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", DEFLATED)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.4.70")
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
        assert assoc.is_established
        sent = (truncated, noise, deflated_noise, invalid_rows, good)
        statuses = [assoc.send_c_store(p).Status for p in sent]
        assert assoc.is_established
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert statuses == [0xC000, 0xC000, 0xC000, 0x0000, 0x0000], [hex(s) for s in statuses]
    # (an odd but readable dataset, DummyCTInvalidRows, is kept: no image is lost)
    assert node.query('SELECT count(*) FROM "instance"') == [(2,)]
    reasons = {e["reason"] for e in node.events("store failed")}
    assert reasons == {"malformed"}
    assert not node.spool_files()


def test_kill_9_during_a_200_instance_run_loses_nothing_acknowledged(node_factory, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = [make_instance(src / f"{i:03d}.dcm", study_uid=study, series_uid=series, InstanceNumber=i,
                           rows=128) for i in range(200)]  # fmt: skip
    node = node_factory().start()
    log = open(tmp_path / "storescu.log", "w")  # noqa: SIM115
    cmd = [dcmtk("storescu"), "-v", "-aec", node.aet, "-R", "127.0.0.1", str(node.port), *map(str, files)]
    sender = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(), text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(node.events("stored")) < 60:
        time.sleep(0.02)
    node.kill9()
    sender.wait(timeout=60)
    log.close()
    acknowledged = successes((tmp_path / "storescu.log").read_text())
    assert 50 <= len(acknowledged) < 200, len(acknowledged)
    node.start()  # restart: crash recovery runs before the port opens
    rows = node.query('SELECT sop_uid, file_uuid FROM "instance"')
    indexed = {sop: uuid for sop, uuid in rows}
    for path in acknowledged:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert sop in indexed, f"{path} was acknowledged but is not in the index"
        assert dataset_bytes(node.file_of(sop)) == dataset_bytes(Path(path))
    on_disk = node.stored_files()
    assert on_disk == {node.storage / u[:2] / u for u in indexed.values()}  # no orphan file, no row without file
    assert not node.spool_files()


def test_four_concurrent_storescu_into_one_study(node_factory, tmp_path) -> None:
    node = node_factory().start()
    study = pydicom.uid.generate_uid()
    chunks = []
    for k in range(4):  # same patient and study from every sender: the parent rows are created concurrently
        d = tmp_path / f"c{k}"
        d.mkdir()
        series = pydicom.uid.generate_uid()
        chunks.append([make_instance(d / f"{i}.dcm", study_uid=study, series_uid=series, rows=64) for i in range(40)])
    cmd = [dcmtk("storescu"), "-aec", node.aet, "-R", "127.0.0.1", str(node.port)]
    procs = [subprocess.Popen(cmd + list(map(str, c)), env=dcmtk_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in chunks]  # fmt: skip
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    assert node.query('SELECT count(*) FROM "instance"') == [(160,)]
    assert node.query('SELECT count(*) FROM "patient"') == [(1,)]
    assert node.query('SELECT count(*) FROM "study"') == [(1,)]
    assert node.query('SELECT count(*) FROM "series"') == [(4,)]
    assert len(node.stored_files()) == 160


def test_unknown_calling_ae_is_refused_when_configured(node_factory, tmp_path) -> None:
    f = make_instance(tmp_path / "a.dcm")
    node = node_factory(DicomAlwaysAllowStore=False, DicomModalities={"ct": ["GOOD_CT", "127.0.0.1", 104]}).start()
    r = storescu(node, [f], aet="INTRUDER")
    assert successes(r.stdout + r.stderr) == [] and r.returncode != 0, r.stdout
    assert "0x0124" in node.log() or "refused" in node.log()
    assert node.query('SELECT count(*) FROM "instance"') == [(0,)]
    r = storescu(node, [f], aet="GOOD_CT")
    assert successes(r.stdout + r.stderr) == [str(f)], r.stdout


def test_association_rejected_when_no_service_is_allowed(node_factory, tmp_path) -> None:
    node = node_factory(DicomAlwaysAllowStore=False, DicomAlwaysAllowEcho=False,
                        DicomModalities={"ct": ["GOOD_CT", "127.0.0.1", 104]}).start()  # fmt: skip
    r = run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", node.aet, "127.0.0.1", str(node.port)])
    assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr), r.stdout + r.stderr
    r = run([dcmtk("echoscu"), "-aet", "GOOD_CT", "-aec", node.aet, "127.0.0.1", str(node.port)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_called_aet_is_checked_when_configured(node_factory) -> None:
    node = node_factory(DicomCheckCalledAet=True).start()
    r = run([dcmtk("echoscu"), "-aec", "SOMEONE_ELSE", "127.0.0.1", str(node.port)])
    assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr)
    r = run([dcmtk("echoscu"), "-aec", node.aet, "127.0.0.1", str(node.port)])
    assert r.returncode == 0


# our own SCU's network thread complains when we abort under its feet: that is the point of the test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_association_aborted_mid_transfer_leaves_no_partial_file(node_factory, tmp_path) -> None:
    import threading

    big = make_instance(tmp_path / "big.dcm", rows=512, frames=200)  # 100 MiB: still arriving when we abort
    node = node_factory(DicomReceiverProcesses=1).start()
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="ABORTER")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
        assert assoc.is_established
        sender = threading.Thread(target=lambda: assoc.send_c_store(big), daemon=True)
        sender.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not node.spool_files():
            time.sleep(0.01)
        assert node.spool_files(), "the transfer never started"
        assoc.abort()
        sender.join(timeout=20)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and node.spool_files():
        time.sleep(0.05)
    assert not node.spool_files()
    assert node.query('SELECT count(*) FROM "instance"') == [(0,)]
    closed = node.events("association closed")
    assert closed and closed[-1]["how"] == "aborted" and closed[-1]["partial_discarded"] == 1


def test_the_pynetdicom_spool_hook_is_where_we_expect_it(tmp_path: Path) -> None:
    """Pin the pynetdicom behaviour ``node.net.scp._SpoolRegistry`` relies on (fails loudly on an upgrade)."""
    import inspect

    import pynetdicom.dimse_messages as dm

    source = inspect.getsource(dm.DIMSEMessage.decode_msg)
    assert "NamedTemporaryFile(" in source and "STORE_RECV_CHUNKED_DATASET" in source
    assert "self._data_set_file.write(data[1:])" in source
    from node.archive.storage import FileStorage
    from node.net.scp import SPOOLS

    SPOOLS.install(FileStorage(tmp_path))
    assert dm.NamedTemporaryFile == SPOOLS._new


def test_the_pynetdicom_waits_we_replace_are_where_we_expect_them() -> None:
    """Pin what ``node.net.fastpath`` relies on: the DUL asks ``_process_recv_primitive`` first each loop,
    sleeps ``_run_loop_delay`` when idle, and the reactor polls ``get_msg(block=False)``."""
    import inspect

    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider

    dul_loop = inspect.getsource(DULServiceProvider.run_reactor)
    assert "self._process_recv_primitive()" in dul_loop and "time.sleep(self._run_loop_delay)" in dul_loop
    assert "self.dimse.get_msg(block=False)" in inspect.getsource(Association._run_reactor)
    assert "self.to_provider_queue.put(primitive)" in inspect.getsource(DULServiceProvider.send_pdu)


def _listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (each receiver process binds its own, with SO_REUSEPORT)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:] + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    return sum(1 for r in rows if r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A")


def test_a_dead_receiver_is_restarted_and_the_node_keeps_storing(node_factory, tmp_path) -> None:
    import os
    import signal

    node = node_factory(DicomReceiverProcesses=2).start()
    assert node.proc is not None
    deadline = time.monotonic() + 20  # start() returns once one receiver listens; wait for both
    while time.monotonic() < deadline and _listeners(node.port) < 2:
        time.sleep(0.05)
    children = Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children").read_text().split()
    assert len(children) == 4  # two receivers, the routing worker (stable series/studies), the REST API
    os.kill(int(children[0]), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "receiver process died" not in node.log():
        time.sleep(0.05)
    assert "receiver process died; restarting" in node.log()
    deadline = time.monotonic() + 20  # the restarted receiver binds its own SO_REUSEPORT socket
    while time.monotonic() < deadline and _listeners(node.port) < 2:
        time.sleep(0.05)
    assert _listeners(node.port) == 2
    files = [make_instance(tmp_path / f"{i}.dcm") for i in range(8)]
    for f in files:  # several associations: the kernel spreads them over both receivers
        r = storescu(node, [f])
        assert successes(r.stdout + r.stderr) == [str(f)], r.stdout + r.stderr
    assert node.query('SELECT count(*) FROM "instance"') == [(8,)]


def test_a_second_node_on_the_same_storage_is_refused(node_factory) -> None:
    first = node_factory().start()
    r = run([sys.executable, "-m", "node", "serve", "--config", str(first.write_config()),
             "--dicom-port", str(free_port())], timeout=60, cwd=first.workdir)  # fmt: skip
    assert r.returncode == 2 and "in use by another running dicom-node" in r.stderr, r.stderr


def test_a_clean_stop_is_not_reported_as_crashes(node_factory) -> None:
    """SIGTERM stops receivers and routing workers quietly (pynetdicom's shutdown used to raise in each)."""
    node = node_factory(DicomReceiverProcesses=2).start()
    r = run([dcmtk("echoscu"), "-aec", node.aet, "127.0.0.1", str(node.port)])
    assert r.returncode == 0
    node.stop()
    assert node.proc is not None and node.proc.returncode == 0
    assert "crashed" not in node.log() and "died" not in node.log()
    assert "dicom-node stopped" in node.log()
