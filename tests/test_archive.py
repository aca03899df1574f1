"""The archive on a real SQLite file and a real folder: store, duplicates, overwrite, failures, recovery."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import make_instance, sql_rows

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
def archive(tmp_path: Path, db_url: str) -> Archive:
    return open_archive(db_url, tmp_path / "storage")


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


def store_two_copies(archive: Archive, tmp_path: Path):
    """Store an instance, then another copy of it (same UIDs) whose StudyDescription differs."""
    first = make_instance(tmp_path / "1.dcm", sop_uid="1.9.1", study_uid="1.9", series_uid="1.9.0",
                          StudyDescription="FIRST")  # fmt: skip
    ds = pydicom.dcmread(first)
    ds.StudyDescription = "SECOND"
    ds.save_as(tmp_path / "2.dcm")
    return put(archive, first), put(archive, tmp_path / "2.dcm")


def test_duplicate_keeps_the_first_copy_when_overwrite_is_off(archive: Archive, tmp_path: Path) -> None:
    r1, r2 = store_two_copies(archive, tmp_path)
    assert (r1.status, r2.status) == ("Success", "AlreadyStored")
    assert r2.path == r1.path and pydicom.dcmread(r1.path).StudyDescription == "FIRST"
    assert files_in(archive) == {r1.path}
    assert not list(archive.storage.tmp.iterdir())


def test_duplicate_replaces_atomically_when_overwrite_is_on(archive: Archive, tmp_path: Path) -> None:
    archive.overwrite = True
    r1, r2 = store_two_copies(archive, tmp_path)
    assert (r1.status, r2.status) == ("Success", "Success")
    assert r2.ids == r1.ids and r2.path != r1.path
    assert files_in(archive) == {r2.path}  # the old file is gone, no orphan
    assert pydicom.dcmread(r2.path).StudyDescription == "SECOND"
    with archive.db.connection_context():
        assert Instance.select().count() == 1 and Garbage.select().count() == 0


def test_database_failure_leaves_no_row_and_no_file(archive: Archive, tmp_path: Path, db_url: str) -> None:
    good = put(archive, make_instance(tmp_path / "g.dcm"))
    archive.db.close()  # PostgreSQL: the table's lock must not wait for our idle connection
    sql_rows(db_url, 'ALTER TABLE "change" RENAME TO "change_gone"')  # the INSERT into change fails mid-transaction
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


def test_a_stale_series_cache_never_attaches_an_instance_to_the_wrong_series(tmp_path: Path, db_url: str) -> None:
    url, storage = db_url, tmp_path / "storage"
    first = open_archive(url, storage)
    a = put(first, make_instance(tmp_path / "a.dcm", study_uid="1.5", series_uid="1.5.1"))
    sql_rows(url, 'DELETE FROM "patient"')  # cascades to study, series, instance (a later REST DELETE does this)
    make_instance(tmp_path / "c.dcm", study_uid="2.5", series_uid="2.5.1")
    other_process = (  # another receiver stores a new series, which may reuse the deleted rows' ids
        "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from test_archive import put;"
        f"from node.archive.store import open_archive; put(open_archive({url!r}, Path({str(storage)!r})),"
        f" Path({str(tmp_path / 'c.dcm')!r}))"
    )
    subprocess.run([sys.executable, "-c", other_process], check=True, cwd=Path(__file__).parents[1])
    c_sop = pydicom.dcmread(tmp_path / "c.dcm").SOPInstanceUID
    b = put(first, make_instance(tmp_path / "b.dcm", study_uid="1.5", series_uid="1.5.1"))
    assert b.ids.series == a.ids.series
    with first.db.connection_context():
        inst = Instance.get(Instance.public_id == b.ids.instance)
        assert inst.series.public_id == a.ids.series
        assert Instance.get(Instance.sop_uid == c_sop).series.series_uid == "2.5.1"
        assert Series.select().count() == 2


def test_recovery_deletes_files_of_replaced_instances_left_in_garbage(archive: Archive, tmp_path: Path) -> None:
    archive.overwrite = True
    src = make_instance(tmp_path / "a.dcm", sop_uid="1.7.1", study_uid="1.7", series_uid="1.7.0")
    first = put(archive, src)
    old = first.path.read_bytes()
    second = put(archive, src)
    first.path.write_bytes(old)  # as if the crash came between the commit and the unlink of the old file
    with archive.db.connection_context():
        Garbage.create(file_uuid=first.path.name)
    assert recover(archive) == (0, 0, 1)
    assert files_in(archive) == {second.path}


def test_a_failure_after_the_commit_keeps_the_instance(archive: Archive, tmp_path: Path) -> None:
    src = make_instance(tmp_path / "a.dcm")
    spool = spool_copy(archive, src)
    folder = archive.storage.path(spool.uuid).parent
    folder.rmdir()
    folder.write_text("not a folder")  # the rename into place fails (ENOTDIR) after the index commit
    result = store(archive, spool, read_index_tags(spool.name), Origin())
    assert result.status == "Success" and result.path == archive.storage.spool_path(spool.uuid)
    assert archive.storage.locate(spool.uuid).read_bytes() == src.read_bytes()  # readable meanwhile
    folder.unlink()
    folder.mkdir()
    assert recover(archive) == (1, 0, 0)  # published at the next start
    assert archive.storage.path(spool.uuid).read_bytes() == src.read_bytes()


def test_a_header_longer_than_the_read_buffer_is_parsed_from_the_file(tmp_path: Path) -> None:
    p = make_instance(tmp_path / "a.dcm")
    ds = pydicom.dcmread(p)
    block = ds.private_block(0x0009, "DICOM-NODE TEST", create=True)
    block.add_new(0x10, "OB", b"\x00" * (300 * 1024))  # before StudyInstanceUID (0020,000D)
    ds.save_as(p)
    tags = read_index_tags(str(p))
    assert tags.study_uid == ds.StudyInstanceUID and tags.patient_id == "PAT1"


def test_a_copy_whose_indexed_file_is_missing_replaces_it_instead_of_already_stored(
    archive: Archive, tmp_path: Path
) -> None:
    src = make_instance(tmp_path / "a.dcm")
    first = put(archive, src)
    first.path.unlink()  # lost behind our back (disk repair, an admin, an ambiguous commit…)
    again = put(archive, src)
    assert again.status == "Success" and again.path.read_bytes() == src.read_bytes()
    with archive.db.connection_context():
        assert Instance.select().count() == 1
        assert Instance.get().file_uuid == again.path.name


def test_threads_that_end_without_closing_hand_their_connection_back(archive: Archive, tmp_path: Path) -> None:
    """Each association thread keeps its connection open between C-STOREs and ends with the association; more
    threads than the pool holds, one after the other, must not exhaust it (PostgreSQL's pool)."""
    import threading

    from node.archive import db as dbmod

    def one(i: int) -> None:
        put(archive, make_instance(tmp_path / f"t{i}.dcm", sop_uid=f"1.2.3.4.{i}"))  # connects, never closes

    for i in range(dbmod.POOL_SIZE + 5):
        t = threading.Thread(target=one, args=(i,))
        t.start()
        t.join(30)
        assert not t.is_alive()
    archive.db.connect(reuse_if_open=True)
    with archive.db.connection_context():
        assert Instance.select().count() == dbmod.POOL_SIZE + 5
    in_use = getattr(archive.db, "_in_use", {})
    assert len(in_use) <= 2, f"{len(in_use)} pooled connections still counted in use"


def test_deleting_the_last_instance_of_a_series_never_takes_a_new_one_along(
    archive: Archive, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete finds the series empty and is about to remove it (ON DELETE CASCADE) while another receiver
    process stores a new instance into that series: the acknowledged instance must survive (PostgreSQL: the
    parents are locked before the emptiness check; SQLite: the write lock serialises the two)."""
    import threading

    from node.archive import store as store_mod

    old = put(archive, make_instance(tmp_path / "old.dcm", study_uid="1.7", series_uid="1.7.1", sop_uid="1.7.1.1"))
    paused, go = threading.Event(), threading.Event()
    real_delete = Series.delete_instance

    def slow_delete(self: Series, *args: object, **kwargs: object) -> object:
        paused.set()  # the series was found empty: the window a concurrent insert must not slip into
        go.wait(10)
        return real_delete(self, *args, **kwargs)

    monkeypatch.setattr(Series, "delete_instance", slow_delete)
    deleter = threading.Thread(target=lambda: store_mod.delete_instance(archive, old.ids.instance))
    deleter.start()
    assert paused.wait(10)
    new_file = make_instance(tmp_path / "new.dcm", study_uid="1.7", series_uid="1.7.1", sop_uid="1.7.1.2")
    other_process = (
        "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from test_archive import put;"
        f"from node.archive.store import open_archive; storage = Path({str(tmp_path / 'storage')!r});"
        f"r = put(open_archive({db_url!r}, storage), Path({str(new_file)!r})); print(r.status)"
    )
    receiver = subprocess.Popen([sys.executable, "-c", other_process], cwd=Path(__file__).parents[1],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(2.0)  # the receiver commits now unless the delete's locks hold it back
    go.set()
    deleter.join(30)
    out, _ = receiver.communicate(timeout=60)
    assert receiver.returncode == 0 and out.strip() == "Success", out
    rows = sql_rows(db_url, 'SELECT sop_uid FROM "instance"')
    assert rows == [("1.7.1.2",)], "the acknowledged instance was deleted with the emptied series"
