"""Who may talk to the node: calling AE titles and hosts against DicomModalities (Orthanc's rules)."""

from __future__ import annotations

from pathlib import Path

from conftest import dcmtk, make_instance, run

from node.config import Modality
from node.net.access import AccessPolicy


def policy(**kw: object) -> AccessPolicy:
    base = dict(modalities=(Modality("ct", "CT_ONE", "127.0.0.1", 104),), always_allow_echo=False,
                always_allow_store=False, check_host=False, strict_aet=False)  # fmt: skip
    base.update(kw)
    return AccessPolicy(**base)  # type: ignore[arg-type]


def test_aet_comparison_is_case_insensitive_unless_strict() -> None:
    assert policy().may_store("ct_one", "10.0.0.9")
    assert not policy(strict_aet=True).may_store("ct_one", "10.0.0.9")
    assert policy(strict_aet=True).may_store("CT_ONE", "10.0.0.9")


def test_modality_host_is_checked_when_configured() -> None:
    assert policy(check_host=True).may_store("CT_ONE", "127.0.0.1")
    assert not policy(check_host=True).may_store("CT_ONE", "192.0.2.7")


def test_per_modality_permissions_and_always_allow_flags() -> None:
    p = policy(modalities=(Modality("ct", "CT_ONE", "h", 104, allow_store=False),))
    assert p.may_echo("CT_ONE", "x") and not p.may_store("CT_ONE", "x")
    assert not p.may_associate("STRANGER", "x")
    assert policy(always_allow_echo=True).may_associate("STRANGER", "x")


def test_storescu_from_the_wrong_host_is_refused(node_factory, tmp_path: Path) -> None:
    f = make_instance(tmp_path / "a.dcm")
    node = node_factory(DicomAlwaysAllowStore=False, DicomCheckModalityHost=True,
                        DicomModalities={"ct": ["CT_ONE", "192.0.2.7", 104]}).start()  # fmt: skip
    cmd = [dcmtk("storescu"), "-aet", "CT_ONE", "-aec", node.aet, "-R", "127.0.0.1", str(node.port), str(f)]
    r = run(cmd)
    assert "Refused" in r.stdout + r.stderr or r.returncode != 0, r.stdout + r.stderr
    assert node.query('SELECT count(*) FROM "instance"') == [(0,)]
    node.stop()
    node.config["DicomModalities"] = {"ct": ["CT_ONE", "127.0.0.1", 104]}
    node.start()
    r = run(cmd)
    assert r.returncode == 0 and node.query('SELECT count(*) FROM "instance"') == [(1,)], r.stderr
