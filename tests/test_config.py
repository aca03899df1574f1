"""Configuration: Orthanc-style JSON with comments, strict validation, overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from node import config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_default_file_is_exactly_the_embedded_defaults() -> None:
    assert config.load_file(ROOT / "conf" / "node.json") == config.DEFAULTS


def test_comments_are_allowed_and_strings_keep_slashes(tmp_path: Path) -> None:
    f = write(tmp_path / "c.json", '// head\n{ /* block\n */ "Name": "a//b /* not */", // tail\n "DicomPort": 104 }')
    cfg = config.build(f, environ={})
    assert cfg["Name"] == "a//b /* not */" and cfg["DicomPort"] == 104


def test_unknown_key_is_an_error_naming_key_file_and_suggestion(tmp_path: Path) -> None:
    f = write(tmp_path / "c.json", '{"OverwriteInstance": true}')
    with pytest.raises(config.ConfigError) as err:
        config.build(f, environ={})
    assert "c.json" in str(err.value) and "'OverwriteInstance'" in str(err.value)
    assert "did you mean 'OverwriteInstances'" in str(err.value)


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    f = write(tmp_path / "c.json", '{"DicomPort": "4242"}')
    with pytest.raises(config.ConfigError, match="'DicomPort' must be int"):
        config.build(f, environ={})


def test_orthanc_keys_we_do_not_support_start_with_a_warning(tmp_path: Path) -> None:
    orthanc = {"Name": "MyOrthanc", "DicomAet": "ORTHANC", "SslEnabled": False, "LuaScripts": [],
               "StorageDirectory": "OrthancStorage", "IndexDirectory": "OrthancStorage", "PostgreSQL": {}}  # fmt: skip
    cfg = config.build(write(tmp_path / "orthanc.json", json.dumps(orthanc)), environ={})
    assert cfg["DicomAet"] == "ORTHANC"
    assert any("SslEnabled" in w for w in cfg.warnings) and any("PostgreSQL" in w for w in cfg.warnings)
    assert cfg.storage_dir == tmp_path / "OrthancStorage"  # relative to the config file, as in Orthanc


def test_orthancs_postgresql_plugin_section_selects_the_same_index(tmp_path: Path) -> None:
    """An Orthanc configuration that keeps its index in PostgreSQL (the plugin's section) starts dicom-node on a
    PostgreSQL index; our own ``Database`` wins when both are there; a disabled section is only a warning."""
    section = {"EnableIndex": True, "EnableStorage": True, "Host": "db.example.org", "Port": 5433,
               "Database": "pacs", "Username": "orthanc", "Password": "p@ss/word", "Lock": False}  # fmt: skip
    cfg = config.build(write(tmp_path / "o.json", json.dumps({"PostgreSQL": section})), environ={})
    assert cfg.database_url == "postgresql://orthanc:p%40ss%2Fword@db.example.org:5433/pacs" and cfg.shared
    assert any("EnableStorage" in w for w in cfg.warnings)
    uri = {"PostgreSQL": {"EnableIndex": True, "ConnectionUri": "postgresql://u@h/d"}}
    assert config.build(write(tmp_path / "u.json", json.dumps(uri)), environ={}).database_url == "postgresql://u@h/d"
    both = {"PostgreSQL": section, "Database": "sqlite:///x/index.db"}
    assert config.build(write(tmp_path / "b.json", json.dumps(both)), environ={}).database_url == "sqlite:///x/index.db"
    off = config.build(write(tmp_path / "f.json", json.dumps({"PostgreSQL": {"EnableIndex": False}})), environ={})
    assert off.database_url.startswith("sqlite:///") and not off.shared


def test_spool_prefixes_of_nodes_sharing_a_storage_never_overlap(tmp_path: Path) -> None:
    """A node recovers the spool folders that start with its prefix: no node's prefix may start another's."""
    ids = ["X@pacs", "X@pacs.lan", "X@pacs_lan", "X@pacs%2Elan", "n1", "n10", "a/b..c", "é" * 50, "é" * 51]
    prefixes = [config.build(None, {"Database": "postgresql://u@h/d", "NodeId": i}, environ={}).spool_prefix
                for i in ids]  # fmt: skip
    assert len(set(prefixes)) == len(ids)
    for a in prefixes:
        assert a.count(".") == 1 and a.endswith(".")
        assert not [b for b in prefixes if b != a and b.startswith(a)], a
    sqlite = config.build(None, {"NodeId": "n1", "IndexDirectory": str(tmp_path)}, environ={})
    assert sqlite.spool_prefix == "" and sqlite.spool_slot("0") == "0"  # one node owns an SQLite storage


def test_environment_and_flags_override_the_file(tmp_path: Path) -> None:
    f = write(tmp_path / "c.json", '{"DicomPort": 104, "DicomAet": "A"}')
    cfg = config.build(f, {"DicomAet": "FROMFLAG"}, environ={"DICOM_NODE_DICOM_PORT": "11112"})
    assert cfg["DicomPort"] == 11112 and cfg["DicomAet"] == "FROMFLAG"
    assert config.env_key("OverwriteInstances") == "DICOM_NODE_OVERWRITE_INSTANCES"
    assert config.flag_name("DicomModalities") == "--dicom-modalities"


def test_modalities_both_forms_and_errors(tmp_path: Path) -> None:
    mods = {"a": ["MOD_A", "127.0.0.1", 104], "b": {"AET": "MOD_B", "Host": "h", "Port": "105", "AllowStore": False}}
    cfg = config.build(write(tmp_path / "c.json", json.dumps({"DicomModalities": mods})), environ={})
    assert [(m.aet, m.port, m.allow_store) for m in cfg.modalities] == [("MOD_A", 104, True), ("MOD_B", 105, False)]
    bad = write(tmp_path / "d.json", json.dumps({"DicomModalities": {"x": {"AET": "X", "Host": "h"}}}))
    with pytest.raises(config.ConfigError, match=r"DicomModalities\['x'\] lacks Port"):
        config.build(bad, environ={})


def test_unusable_storage_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    f = write(tmp_path / "c.json", '{"StorageDirectory": "file/storage"}')
    with pytest.raises(config.ConfigError, match="StorageDirectory"):
        config.build(f, environ={})


def test_cli_exits_non_zero_with_the_message(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.json", '{"DicomPrt": 1}')
    r = subprocess.run([sys.executable, "-m", "node", "serve", "--config", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "bad.json" in r.stderr and "'DicomPrt'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "node", "serve", "--config", str(tmp_path / "none.json")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "none.json" in r.stderr


def test_a_remotely_reachable_rest_api_needs_users_unless_authentication_is_explicitly_off(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="RegisteredUsers' is empty"):
        config.build(None, {"RemoteAccessAllowed": True}, environ={})
    cfg = config.build(None, {"RemoteAccessAllowed": True, "RegisteredUsers": {"alice": "s3cret"}}, environ={})
    assert cfg["AuthenticationEnabled"] is True  # null means: on when remote access is allowed
    cfg = config.build(None, {"RemoteAccessAllowed": True, "AuthenticationEnabled": False}, environ={})
    assert any("without authentication" in w for w in cfg.warnings)
    assert config.build(None, {}, environ={})["AuthenticationEnabled"] is False
    with pytest.raises(config.ConfigError, match="true, false or null"):
        config.build(None, {"AuthenticationEnabled": "yes"}, environ={})
