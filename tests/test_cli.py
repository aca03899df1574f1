"""The dicom-node command line against a running node: echo, store (our SCU), stats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import SAMPLES


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_echo_store_and_stats(node_factory, tmp_path: Path) -> None:
    node = node_factory().start()
    r = cli("echo", node.target)
    assert r.returncode == 0 and "success" in r.stdout, r.stdout + r.stderr
    # compressed syntaxes are sent as they are: the association proposes exactly what the files are
    r = cli("store", str(SAMPLES / "TransferSyntaxes"), str(SAMPLES / "Knee"), "--to", node.target, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    sent = int(r.stdout.split()[1])
    assert sent >= 60 and "skipped" in r.stdout  # the .png/.raw files of the folder are skipped, not failed
    assert node.query('SELECT count(*) FROM "instance"') == [(sent,)]
    r = cli("stats", "--config", str(node.write_config()), "--json", cwd=node.workdir)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["CountInstances"] == sent and stats["CountPatients"] >= 2
    assert int(stats["TotalDiskSize"]) == sum(p.stat().st_size for p in node.stored_files())


def test_store_reports_failures_and_exits_non_zero(node_factory, tmp_path: Path) -> None:
    node = node_factory(DicomAlwaysAllowStore=False, DicomModalities={"a": ["ALLOWED", "127.0.0.1", 104]}).start()
    png = SAMPLES / "Formats" / "Brainix.png"
    dcm = SAMPLES / "Series" / "Lena-1.dcm"
    r = cli("store", str(png), str(dcm), "--to", node.target, "--aet", "STRANGER", "-q")
    assert r.returncode == 1
    assert f"FAILED {png}: not a DICOM file" in r.stdout
    assert f"FAILED {dcm}: status 0x0124" in r.stdout
    r = cli("echo", "NOBODY@127.0.0.1:1")
    assert r.returncode == 1 and "FAILED" in r.stdout
