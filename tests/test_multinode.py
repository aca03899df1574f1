"""Several dicom-node processes on one PostgreSQL index and one storage folder (issue 7), with real peers.

Each node is a full ``dicom-node serve`` (receivers, routing workers) with its own ``NodeId`` and DICOM port;
DCMTK ``storescu`` senders hit all of them at once and DCMTK ``storescp`` is the forwarding destination (one file
per received C-STORE, so a duplicate delivery shows up as a second file). Only meaningful on PostgreSQL: the
SQLite pass of ``scripts/test.sh`` deselects these (``postgres_only``).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import Node, make_instance, new_database_url, storescu_profile
from test_gateway import ANON, DICOM_ROOT, StoreSCP, sample_study, uid_pairs, wait_for
from test_scp import storescu, successes

pytestmark = pytest.mark.postgres_only


def start_nodes(node_factory: Any, n: int, storage: Path, url: str, **config: Any) -> list[Node]:
    """``n`` nodes sharing ``storage`` and the index at ``url``; started together (one creates the schema)."""
    nodes = [
        node_factory(NodeId=f"n{i}", StorageDirectory=str(storage), Database=url, DicomReceiverProcesses=1,
                     RoutingWorkers=1, HttpServerEnabled=False, **config)
        for i in range(n)
    ]  # fmt: skip
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_ready()
    return nodes


def stored_files(storage: Path) -> list[Path]:
    return [p for p in storage.rglob("*") if p.is_file() and ".tmp" not in p.parts and not p.name.startswith(".")]


def spool_files(storage: Path) -> list[Path]:
    return [p for p in (storage / ".tmp").rglob("*") if p.is_file()]


def send_everywhere(nodes: list[Node], files: list[Path], senders_per_node: int, tmp_path: Path) -> list[int]:
    """Every sender sends every file; all senders run at once. Returns each sender's count of Success."""
    profile = storescu_profile(files, tmp_path / "profile.cfg")
    with cf.ThreadPoolExecutor(len(nodes) * senders_per_node) as pool:
        runs = [pool.submit(storescu, node, files, profile=profile) for node in nodes for _ in range(senders_per_node)]
        results = [r.result() for r in runs]
    return [len(successes(r.stdout + r.stderr)) for r in results]


def test_three_nodes_index_each_instance_once_and_forward_it_once(node_factory, tmp_path: Path) -> None:
    """Brainix and Knee from six senders at once to three nodes: one index row and one file per instance, one
    delivery per instance, and the pseudonyms agree whichever node anonymized an instance."""
    dest = StoreSCP(tmp_path / "received").start()
    try:
        url, storage = new_database_url(tmp_path), tmp_path / "shared-storage"
        nodes = start_nodes(node_factory, 3, storage, url, DicomModalities={"dest": dest.modality}, Routes=[ANON])
        files = sample_study("Brainix", "Knee")
        originals = [pydicom.dcmread(f) for f in files]
        unique = {o.SOPInstanceUID for o in originals}
        counts = send_everywhere(nodes, files, 2, tmp_path)
        assert counts == [len(files)] * 6, "every C-STORE answered Success (the copies that lost: AlreadyStored)"

        db = nodes[0]
        assert db.query('SELECT count(*), count(DISTINCT sop_uid) FROM "instance"') == [(len(unique), len(unique))]
        assert db.query('SELECT count(*) FROM "series"') == [(len({o.SeriesInstanceUID for o in originals}),)]
        assert db.query('SELECT count(*) FROM "study"') == [(2,)] and db.query('SELECT count(*) FROM "patient"') == [
            (2,)
        ]
        indexed = {u for (u,) in db.query('SELECT file_uuid FROM "instance"')}
        assert {p.name for p in stored_files(storage)} == indexed  # one file each, no orphan
        assert db.query('SELECT count(*) FROM "garbage"') == [(0,)]

        wait_for(lambda: db.query("SELECT count(*) FROM outbox WHERE state = 'done'") == [(len(unique),)], 180,
                 "every instance delivered", db)  # fmt: skip
        assert db.query("SELECT count(*) FROM outbox") == [(len(unique),)]  # queued once, by the node that stored it
        time.sleep(0.5)
        received = dest.datasets()
        assert len(received) == len(unique) == len({d.SOPInstanceUID for d in received})  # delivered once each
        workers = Counter(w.split("/")[0] for (w,) in db.query("SELECT claimed_by FROM outbox"))
        assert len(workers) >= 2, workers  # the queue was drained by several nodes

        # One new study per original one, and each original UID became one new UID wherever it was anonymized.
        assert len({d.StudyInstanceUID for d in received}) == 2
        by_pixels = {o.PixelData: o for o in originals}
        forward: dict[str, set[str]] = {}
        for d in received:
            for old, new in uid_pairs(by_pixels[d.PixelData], d):
                if not old.startswith(DICOM_ROOT):
                    forward.setdefault(old, set()).add(new)
        assert len(forward) > 100 and all(len(v) == 1 for v in forward.values())
        names = {(by_pixels[d.PixelData].PatientID, str(d.PatientName), d.PatientID) for d in received}
        assert len(names) == 2  # one pseudonym (and one Anonymized<N>) per patient across the nodes
        assert spool_files(storage) == []
    finally:
        dest.stop()


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_same_instances_at_the_same_moment_on_two_nodes(node_factory, tmp_path: Path, overwrite: bool) -> None:
    """Two versions of 30 instances race into two nodes: one index row and one file per instance, whichever
    copy won, replaced copies deleted (OverwriteInstances true), nothing left in the spool or the garbage."""
    url, storage = new_database_url(tmp_path), tmp_path / "shared-storage"
    nodes = start_nodes(node_factory, 2, storage, url, OverwriteInstances=overwrite)
    versions: list[list[Path]] = []
    for v in ("A", "B"):
        folder = tmp_path / v
        folder.mkdir()
        versions.append([make_instance(folder / f"{i}.dcm", patient_id="RACE", study_uid="1.2.7", series_uid="1.2.7.1",
                                       sop_uid=f"1.2.7.1.{i}", StudyDescription=v) for i in range(30)])  # fmt: skip
    with cf.ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(storescu, node, versions[k]) for node in nodes for k in (0, 1)]
        assert [len(successes(r.result().stdout + r.result().stderr)) for r in runs] == [30] * 4
    db = nodes[0]
    assert db.query('SELECT count(*), count(DISTINCT sop_uid) FROM "instance"') == [(30, 30)]
    assert db.query('SELECT count(*) FROM "series"') == [(1,)] and db.query('SELECT count(*) FROM "patient"') == [(1,)]
    indexed = {u for (u,) in db.query('SELECT file_uuid FROM "instance"')}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if {p.name for p in stored_files(storage)} == indexed and not spool_files(storage):
            break
        time.sleep(0.1)
    files = {p.name for p in stored_files(storage)}
    assert (files - indexed, indexed - files, spool_files(storage)) == (set(), set(), [])
    assert db.query('SELECT count(*) FROM "garbage"') == [(0,)]
    assert {pydicom.dcmread(p).StudyDescription for p in stored_files(storage)} <= {"A", "B"}


def test_a_node_killed_while_forwarding_leaves_its_rows_to_the_others(node_factory, tmp_path: Path) -> None:
    """kill -9 of a node holding claimed outbox rows: the other nodes deliver them once the lease runs out,
    and everything arrives (a duplicate only for what was in flight)."""
    dest = StoreSCP(tmp_path / "received").start()
    try:
        url, storage = new_database_url(tmp_path), tmp_path / "shared-storage"
        nodes = start_nodes(node_factory, 3, storage, url, DicomModalities={"dest": dest.modality}, Routes=[ANON],
                            RoutingLeaseTimeout=4, RoutingBatchSize=4, RoutingRetryDelay=1,
                            RoutingRetryMaxDelay=1)  # fmt: skip
        files = [make_instance(tmp_path / f"{i}.dcm", patient_id="KILL", study_uid="1.2.9", series_uid="1.2.9.1",
                               rows=256, InstanceNumber=i) for i in range(160)]  # fmt: skip
        victim, db = nodes[0], nodes[1]
        with cf.ThreadPoolExecutor(1) as pool:
            sending = pool.submit(storescu, victim, files)
            held: list[tuple[int, ...]] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not held:  # kill as soon as the victim holds a claim
                held = db.query("SELECT id FROM outbox WHERE state = 'claimed' AND claimed_by LIKE 'n0/%'")
            assert held, "the victim never claimed a row"
            victim.kill9()
            r = sending.result()
        stored = len(successes(r.stdout + r.stderr))
        assert stored >= 1
        # What was acknowledged is in the index and queued; the rows the victim held come back after the lease.
        wait_for(lambda: db.query("SELECT count(*) FROM outbox WHERE state <> 'done'") == [(0,)], 120,
                 "the victim's rows delivered by the others", db)  # fmt: skip
        rows = dict(db.query("SELECT id, claimed_by FROM outbox"))
        assert len(rows) >= stored
        for (row_id,) in held:
            assert not rows[row_id].startswith("n0/"), "a row the victim held was finished by another node"
        time.sleep(0.5)
        received = Counter(d.SOPInstanceUID for d in dest.datasets())
        indexed = db.query('SELECT count(*) FROM "instance"')[0][0]
        assert len(received) == indexed >= stored  # everything acknowledged arrived
        duplicates = sum(n - 1 for n in received.values())
        assert duplicates <= len(held), received  # at most what the victim had in flight
        assert len({d.StudyInstanceUID for d in dest.datasets()}) == 1
    finally:
        dest.stop()


def test_a_stable_study_fires_once_across_nodes(node_factory, tmp_path: Path) -> None:
    """Every node's scheduler watches the same index: a study whose instances came through both nodes is
    declared stable once (one StableStudy change, one delivery per instance)."""
    dest = StoreSCP(tmp_path / "received").start()
    try:
        url, storage = new_database_url(tmp_path), tmp_path / "shared-storage"
        rule = {**ANON, "Trigger": "StableStudy"}
        nodes = start_nodes(node_factory, 2, storage, url, DicomModalities={"dest": dest.modality}, Routes=[rule],
                            StableAge=2)  # fmt: skip
        files = sample_study("Knee")
        halves = [files[::2], files[1::2]]  # each node receives half of the study
        profile = storescu_profile(files, tmp_path / "profile.cfg")  # Knee is JPEG 2000: propose its syntax
        with cf.ThreadPoolExecutor(2) as pool:
            runs = [
                pool.submit(storescu, node, half, profile=profile) for node, half in zip(nodes, halves, strict=True)
            ]
            assert [len(successes(r.result().stdout + r.result().stderr)) for r in runs] == [len(h) for h in halves]
        db = nodes[0]
        wait_for(lambda: db.query("SELECT count(*) FROM outbox WHERE state = 'done'") == [(len(files),)], 60,
                 "the stable study delivered", db)  # fmt: skip
        time.sleep(3)  # a second firing, if any, would come within a StableAge
        assert db.query("SELECT count(*) FROM change WHERE change_type = 'StableStudy'") == [(1,)]
        assert db.query("SELECT count(*) FROM outbox") == [(len(files),)]
        received = dest.datasets()
        assert len(received) == len({d.SOPInstanceUID for d in received}) == len(files)
        assert len({d.StudyInstanceUID for d in received}) == 1
    finally:
        dest.stop()


def test_a_database_restart_costs_no_instance(node_factory, tmp_path: Path) -> None:
    """PostgreSQL ends every connection of the node (as a restart or failover does) in the middle of an
    association: the next C-STOREs on that association succeed on a new connection, and the routing worker
    reconnects and delivers everything."""
    from pynetdicom import AE

    dest = StoreSCP(tmp_path / "received").start()
    try:
        url = new_database_url(tmp_path)
        node = start_nodes(node_factory, 1, tmp_path / "storage", url, DicomModalities={"dest": dest.modality},
                           Routes=[{"Name": "fwd", "Forward": ["dest"]}])[0]  # fmt: skip
        files = [make_instance(tmp_path / f"{i}.dcm", patient_id="CUT", study_uid="1.2.11", series_uid="1.2.11.1",
                               InstanceNumber=i) for i in range(6)]  # fmt: skip
        datasets = [pydicom.dcmread(f) for f in files]
        ae = AE(ae_title="CUTTER")
        ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.aet)
        assert assoc.is_established
        try:
            statuses = [assoc.send_c_store(ds).Status for ds in datasets[:3]]
            cut = node.query("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()")  # fmt: skip
            assert cut[0][0] >= 1
            statuses += [assoc.send_c_store(ds).Status for ds in datasets[3:]]
        finally:
            assoc.release()
        assert statuses == [0] * 6, [hex(s) for s in statuses]
        assert node.query('SELECT count(*) FROM "instance"') == [(6,)]
        wait_for(lambda: len(dest.files()) == 6, 60, "every instance forwarded after the cut", node)
    finally:
        dest.stop()


def test_a_deadlock_is_a_race_to_retry(db_url: str) -> None:
    """PostgreSQL's deadlock victim is retried by the store path: the error peewee raises must be recognised
    as transient (peewee 4 keeps only the message, the driver's exception is the context)."""
    import threading

    from node.archive.db import connect, is_transient

    setup = connect(db_url)
    setup.execute_sql("CREATE TABLE race (id int PRIMARY KEY, v int)")
    setup.execute_sql("INSERT INTO race VALUES (1, 0), (2, 0)")
    setup.close()
    errors: list[Exception] = []
    barrier = threading.Barrier(2)

    def cross(first: int, second: int) -> None:
        db = connect(db_url)
        try:
            with db.atomic():
                db.execute_sql("UPDATE race SET v = v + 1 WHERE id = %s", (first,))
                barrier.wait(10)
                db.execute_sql("UPDATE race SET v = v + 1 WHERE id = %s", (second,))
        except Exception as exc:  # noqa: BLE001 - the deadlock's victim
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=cross, args=args) for args in ((1, 2), (2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 1 and is_transient(errors[0]), errors
    assert not is_transient(ValueError("deadlock detected"))


def test_only_a_code_point_collation_lets_sql_decide_ranges(tmp_path: Path) -> None:
    """find.py trusts index ranges only where text sorts by code point: a ``C`` database, not an ICU one
    (PostgreSQL 15+ reports ``datcollate`` 'C' for ICU databases too)."""
    from conftest import PG_ADMIN, _drop, _pg_admin_sql

    from node.archive.db import connect
    from node.archive.find import code_point_order

    base = PG_ADMIN.rsplit("/", 1)[0]
    cases = {"dn_collate_c": "LC_COLLATE 'C' LC_CTYPE 'C'",
             "dn_collate_icu": "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LC_COLLATE 'C' LC_CTYPE 'C'"}  # fmt: skip
    try:
        seen = {}
        for name, options in cases.items():
            _pg_admin_sql(f'DROP DATABASE IF EXISTS "{name}"')
            _pg_admin_sql(f'CREATE DATABASE "{name}" TEMPLATE template0 {options}')
            db = connect(f"{base}/{name}")
            seen[name] = code_point_order(db)
            db.close_all()
        assert seen == {"dn_collate_c": True, "dn_collate_icu": False}
    finally:
        for name in cases:
            _drop(name)
