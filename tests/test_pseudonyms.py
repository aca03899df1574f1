"""The persistent pseudonym/UID map of routing (issue 4, part 2): consistent across requests, processes and
restarts, separate per project."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pydicom
import pytest
from conftest import SAMPLES, new_database_url, sql_rows

from node.archive.db import open_index
from node.archive.models import SCHEMA_VERSION, Metadata, Outbox, Property, Pseudonym, Study
from node.archive.pseudonyms import DatabaseUidMap
from node.dicom import fileio
from node.dicom.apply import apply
from node.dicom.levels import Level
from node.dicom.request import parse_anonymize

_URLS: dict[Path, str] = {}


def url(tmp_path: Path) -> str:
    """The test's index (the same one on every call: tests reopen it)."""
    if tmp_path not in _URLS:
        _URLS[tmp_path] = new_database_url(tmp_path)
    return _URLS[tmp_path]


def test_one_original_one_pseudonym_per_project_across_reopen(tmp_path: Path) -> None:
    db = open_index(url(tmp_path))
    a, b, other = DatabaseUidMap(db, "research"), DatabaseUidMap(db, "research"), DatabaseUidMap(db, "other")
    study = a.map(Level.STUDY, "1.2.3 ")
    assert b.map(Level.STUDY, "1.2.3") == study
    assert a.map(Level.INSTANCE, "1.2.3") == study  # one namespace for all UIDs
    assert other.map(Level.STUDY, "1.2.3") != study
    patient = a.map(Level.PATIENT, "887")
    assert len(patient) == 36 and b.map(Level.PATIENT, "887") == patient
    assert a.map(Level.STUDY, "") != a.map(Level.SERIES, "")  # empty values stay per level
    db.close()
    again = open_index(url(tmp_path))
    assert DatabaseUidMap(again, "research").map(Level.STUDY, "1.2.3") == study
    a2 = DatabaseUidMap(again, "research")
    a2.register(Level.STUDY, "1.2.3", "9.9.9")
    assert DatabaseUidMap(again, "research").map(Level.STUDY, "1.2.3") == "9.9.9"


def _map_all(args: tuple[str, list[str]]) -> list[str]:
    db_url, originals = args
    db = open_index(db_url)
    uid_map = DatabaseUidMap(db, "p")
    out = [uid_map.map(Level.INSTANCE, o) for o in originals]
    uid_map.flush()
    return out


def test_processes_racing_on_the_same_originals_agree(tmp_path: Path) -> None:
    open_index(url(tmp_path)).close()
    originals = [f"1.2.840.{i}" for i in range(150)]
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_map_all, [(url(tmp_path), originals), (url(tmp_path), originals[::-1]),
                                      (url(tmp_path), originals)])  # fmt: skip
    assert results[0] == results[1][::-1] == results[2]
    assert len(set(results[0])) == 150
    db = open_index(url(tmp_path))
    with db.connection_context():
        assert Pseudonym.select().count() == 150


def test_instances_anonymized_one_request_at_a_time_stay_one_study(tmp_path: Path) -> None:
    """Edge case 70 inverted for routing: a new map object per instance, one table behind them."""
    db = open_index(url(tmp_path))
    mod = parse_anonymize({})
    out = []
    for path in sorted((SAMPLES / "Knee").rglob("*.dcm")):
        loaded = fileio.load(str(path))
        apply(loaded.ds, mod, DatabaseUidMap(db, "knee-project"), patient_name_counter=1)
        out.append(loaded.ds)
    assert len({d.StudyInstanceUID for d in out}) == 1 and len({d.SeriesInstanceUID for d in out}) == 2
    assert len({d.PatientID for d in out}) == 1
    assert len({d.SOPInstanceUID for d in out}) == len(out)
    originals = {pydicom.dcmread(p).StudyInstanceUID for p in (SAMPLES / "Knee").rglob("*.dcm")}
    assert not originals & {d.StudyInstanceUID for d in out}


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_index_is_migrated(tmp_path: Path, version: int) -> None:
    """A version-1/2 index (no Pseudonym/Outbox, no stability columns) opens as the current schema; the
    series and studies already there count as stable (a new StableStudy rule does not resend the archive)."""
    db = open_index(url(tmp_path))
    from node.archive.db import release_connections

    release_connections(db)
    sql = [
        "INSERT INTO patient (public_id, patient_id, patient_name, main_tags, last_update) "
        "VALUES ('p', 'P', '', '{}', '2020-01-01')",
        "INSERT INTO study (public_id, patient_id, study_uid, study_date, accession_number, main_tags, "
        "last_update, stable_pending) VALUES ('s', 1, '1.2', '', '', '{}', '2020-01-01', TRUE)",
        "DROP TABLE outbox",
        *(["DROP TABLE pseudonym"] if version == 1 else []),
    ]
    for table in ("series", "study"):
        sql += [f"DROP INDEX {table}_stable_pending", f"ALTER TABLE {table} DROP COLUMN stable_pending",
                f"ALTER TABLE {table} DROP COLUMN stable_seen"]  # fmt: skip
    sql.append(f"UPDATE property SET value = '{version}' WHERE key = 'SchemaVersion'")
    for statement in sql:  # the same SQL on SQLite and PostgreSQL: the migration is checked on both
        sql_rows(url(tmp_path), statement)
    db = open_index(url(tmp_path))
    with db.connection_context():
        assert Property.get(Property.key == "SchemaVersion").value == str(SCHEMA_VERSION) == "5"
        assert Pseudonym.select().count() == 0
        assert Outbox.select().count() == 0
        assert Metadata.select().count() == 0  # schema 4's table
        study = Study.get(Study.public_id == "s")
        assert study.stable_pending is False and study.stable_seen is None
    db.close()
    db = open_index(url(tmp_path))  # and opens again as it is
    db.close()


def _name_numbers(args: tuple[str, list[str]]) -> list[int]:
    db_url, patients = args
    uid_map = DatabaseUidMap(open_index(db_url), "p")
    return [uid_map.patient_name_number(p) for p in patients]


def test_anonymized_n_is_drawn_once_per_patient_even_by_racing_processes(tmp_path: Path) -> None:
    """The N of Anonymized<N> comes from the index-wide counter, once per patient and project."""
    open_index(url(tmp_path)).close()
    patients = [f"P{i}" for i in range(20)]
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_name_numbers, [(url(tmp_path), patients), (url(tmp_path), patients[::-1]),
                                           (url(tmp_path), patients)])  # fmt: skip
    assert results[0] == results[1][::-1] == results[2]
    assert sorted(results[0]) == list(range(1, 21))  # no number wasted


def test_name_counters_of_two_processes_never_hand_out_the_same_number(tmp_path: Path) -> None:
    from node.archive.pseudonyms import NameCounter

    db = open_index(url(tmp_path))
    a, b = NameCounter(db, block=4), NameCounter(db, block=4)
    taken = [a.take(), b.take(), a.take(), b.take()] + [a.take() for _ in range(5)]
    assert len(set(taken)) == len(taken) and taken[:3] == [1, 5, 2]
    assert NameCounter(db, block=4).take() == 13  # a restart skips what was reserved: unique, not dense
