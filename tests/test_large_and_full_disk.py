"""Resource limits: a ~500 MB instance is received with bounded memory; a full disk is a clean 0xA700."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import pydicom
from conftest import dataset_bytes, dcmtk, make_instance, run

MB = 1024 * 1024


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_500_mb_multiframe_instance_is_received_with_bounded_memory(node_factory, tmp_path) -> None:
    big = make_instance(tmp_path / "big.dcm", rows=512, frames=1000)  # 512*512*2 bytes * 1000 = 500 MiB
    assert big.stat().st_size > 500 * MB
    node = node_factory(DicomReceiverProcesses=1).start()
    assert node.proc is not None
    before = peak_rss_mb(node.proc.pid)
    r = run([dcmtk("storescu"), "-aec", node.aet, "-R", "127.0.0.1", str(node.port), str(big)], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    peak = peak_rss_mb(node.proc.pid)
    sop = pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID
    stored = node.file_of(sop)
    assert stored.stat().st_size >= big.stat().st_size - 1024
    assert dataset_bytes(stored) == dataset_bytes(big)
    ev = node.events("stored")[-1]
    print(f"500 MB instance: node peak RSS {peak:.0f} MB (idle {before:.0f} MB), handler {ev['ms']} ms")
    assert peak < before + 150, f"peak RSS {peak:.0f} MB for a 500 MB instance (idle {before:.0f} MB)"


def _limit_file_size() -> None:
    """In the node process: files may not grow past 3 MB (writes then fail with EFBIG, like a full disk)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 * MB, 3 * MB))


def test_storage_write_failure_answers_a700_and_keeps_going(node_factory, tmp_path) -> None:
    too_big = make_instance(tmp_path / "big.dcm", rows=512, frames=8)  # 4 MiB
    small = make_instance(tmp_path / "small.dcm")
    node = node_factory(DicomReceiverProcesses=1).start(preexec_fn=_limit_file_size)
    cmd = [dcmtk("storescu"), "-v", "--no-halt", "-aec", node.aet, "-R", "127.0.0.1", str(node.port)]
    r = run([*cmd, str(too_big), str(small)])
    out = r.stdout + r.stderr
    assert "Received Store Response (Refused: OutOfResources)" in out, out
    assert "Received Store Response (Success)" in out
    failed = node.events("store failed")
    assert [e["status"] for e in failed] == ["0xA700"] and failed[0]["reason"] == "disk"
    assert node.query('SELECT sop_uid FROM "instance"') == [(pydicom.dcmread(small).SOPInstanceUID,)]
    assert not node.spool_files()
