"""The archive on a real SQLite file and a real folder: store, duplicates, overwrite, failures, recovery."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pydicom
import pytest
from conftest import make_instance

from node.archive.models import Change, Garbage, Instance, Patient, Series, Study
from node.archive.query import statistics
from node.archive.store import Archive, Origin, open_archive, recover, store
from node.dicom.maintags import read_index_tags


def spool_copy(archive: Archive, src: Path):
    spool = archive.storage.new_spool()
    spool.write(src.read_bytes())
    return spool


def put(archive: Archive, src: Path):
    spool = spool_copy(archive, src)
    return store(archive, spool, read_index_tags(spool.name), Origin("DicomProtocol", "MOD", "NODE", "127.0.0.1"))


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return open_archive(f"sqlite:///{tmp_path}/index.db", tmp_path / "storage")


def files_in(archive: Archive) -> set[Path]:
    return {p for p in archive.storage.root.rglob("*") if p.is_file() and ".tmp" not in p.parts}


def test_store_indexes_all_levels_and_logs_changes(archive: Archive, tmp_path: Path) -> None:
    study, series = "1.2.3.4", "1.2.3.4.5"
    a = put(archive, make_instance(tmp_path / "a.dcm", study_uid=study, series_uid=series, StudyDate="20240101"))
    b = put(archive, make_instance(tmp_path / "b.dcm", study_uid=study, series_uid=series, InstanceNumber=2))
    assert a.status == b.status == "Success"
    with archive.db.connection_context():
        assert (Patient.select().count(), Study.select().count(), Series.select().count()) == (1, 1, 1)
        assert Instance.select().count() == 2
        assert Study.get().study_date == "20240101"
        inst = Instance.get(Instance.public_id == a.ids.instance)
        assert (inst.remote_aet, inst.called_aet, inst.origin) == ("MOD", "NODE", "DicomProtocol")
        assert inst.file_size == a.path.stat().st_size and len(inst.file_sha256) == 64
        kinds = [c.change_type for c in Change.select().order_by(Change.seq)]
    assert kinds == ["NewPatient", "NewStudy", "NewSeries", "NewInstance", "NewInstance"]
    assert files_in(archive) == {a.path, b.path}
    assert a.path.read_bytes() == (tmp_path / "a.dcm").read_bytes()
    st = statistics(archive)
    assert (st.patients, st.studies, st.series, st.instances) == (1, 1, 1, 2)


def test_duplicate_keeps_the_first_copy_when_overwrite_is_off(archive: Archive, tmp_path: Path) -> None:
    first = make_instance(tmp_path / "1.dcm", sop_uid="1.9.1", study_uid="1.9", series_uid="1.9.0",
                          StudyDescription="FIRST")  # fmt: skip
    ds = pydicom.dcmread(first)
    ds.StudyDescription = "SECOND"
    ds.save_as(tmp_path / "2.dcm")
    r1 = put(archive, first)
    r2 = put(archive, tmp_path / "2.dcm")
    assert (r1.status, r2.status) == ("Success", "AlreadyStored")
    assert r2.path == r1.path and pydicom.dcmread(r1.path).StudyDescription == "FIRST"
    assert files_in(archive) == {r1.path}
    assert not list(archive.storage.tmp.iterdir())


def test_duplicate_replaces_atomically_when_overwrite_is_on(archive: Archive, tmp_path: Path) -> None:
    archive.overwrite = True
    first = make_instance(tmp_path / "1.dcm", sop_uid="1.9.1", study_uid="1.9", series_uid="1.9.0",
                          StudyDescription="FIRST")  # fmt: skip
    ds = pydicom.dcmread(first)
    ds.StudyDescription = "SECOND"
    ds.save_as(tmp_path / "2.dcm")
    r1 = put(archive, first)
    r2 = put(archive, tmp_path / "2.dcm")
    assert (r1.status, r2.status) == ("Success", "Success")
    assert r2.ids == r1.ids and r2.path != r1.path
    assert files_in(archive) == {r2.path}  # the old file is gone, no orphan
    assert pydicom.dcmread(r2.path).StudyDescription == "SECOND"
    with archive.db.connection_context():
        assert Instance.select().count() == 1 and Garbage.select().count() == 0


def test_database_failure_leaves_no_row_and_no_file(archive: Archive, tmp_path: Path) -> None:
    good = put(archive, make_instance(tmp_path / "g.dcm"))
    con = sqlite3.connect(archive.storage.root.parent / "index.db")
    con.execute('ALTER TABLE "change" RENAME TO "change_gone"')  # the INSERT into change will fail mid-transaction
    con.commit()
    con.close()
    with pytest.raises(Exception, match="change"):
        put(archive, make_instance(tmp_path / "x.dcm", patient_id="OTHER"))
    with archive.db.connection_context():
        assert Instance.select().count() == 1 and Patient.select().count() == 1
    assert files_in(archive) == {good.path}
    assert not list(archive.storage.tmp.iterdir())


def test_write_error_while_spooling_is_kept_for_the_handler(archive: Archive, tmp_path: Path) -> None:
    spool = archive.storage.new_spool()
    spool.file.close()  # any write now fails with an OSError-like ValueError? no: use a read-only fd instead
    spool.file = open(os.devnull, "rb", buffering=0)  # noqa: SIM115 - writes fail with EBADF
    spool.write(b"x" * 10)
    spool.write(b"y")  # ignored after the first error
    assert isinstance(spool.error, OSError) and spool.size == 0
    with pytest.raises(OSError):
        archive.storage.make_durable(spool)


def test_recovery_publishes_indexed_spools_and_drops_the_rest(archive: Archive, tmp_path: Path) -> None:
    done = put(archive, make_instance(tmp_path / "a.dcm"))
    uuid = done.path.name
    os.rename(done.path, archive.storage.spool_path(uuid))  # crash between index commit and publish
    orphan = spool_copy(archive, make_instance(tmp_path / "b.dcm"))  # crash before the index commit
    orphan.close()
    (archive.storage.tmp / "tmpabc.dcm").write_bytes(b"partial")  # anything else in .tmp
    finished, dropped, garbage = recover(archive)
    assert (finished, dropped, garbage) == (1, 2, 0)
    assert done.path.exists() and not list(archive.storage.tmp.iterdir())


def test_storage_paths_never_come_from_dicom_values(archive: Archive) -> None:
    with pytest.raises(ValueError):
        archive.storage.path("../../etc/passwd")
    p = archive.storage.path("0123abcd-0000-4000-8000-000000000000")
    assert p.parent.parent == archive.storage.root
