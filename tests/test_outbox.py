"""The routing outbox's state machine and the stable-series/study scheduler, on a real SQLite index."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from conftest import make_instance

from node.archive import outbox
from node.archive.db import write_transaction
from node.archive.models import Change, Outbox, Series, Study, utcnow
from node.archive.store import Archive, Origin, delete_instance, open_archive, store
from node.dicom.maintags import read_index_tags
from node.routing import stable
from node.routing.replay import replay
from node.routing.rules import parse_routes


@pytest.fixture
def archive(tmp_path: Path, db_url: str) -> Archive:
    a = open_archive(db_url, tmp_path / "storage")
    a.db.connect()
    return a


def queue(archive: Archive, n: int, destination: str = "dest", rule: str = "r") -> None:
    with write_transaction(archive.db):
        for i in range(n):
            outbox.enqueue(archive.db, f"{destination}-{rule}-{i}", "study", [(rule, destination)], utcnow())


def claim(archive: Archive, worker: str = "w", **kw: object) -> list[outbox.Delivery]:
    args: dict[str, object] = {"lease_s": 60, "limit": 10, "max_per_destination": 2, **kw}
    return outbox.claim(archive.db, worker, **args)  # type: ignore[arg-type]


def states(archive: Archive) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in Outbox.select():
        out[row.state] = out.get(row.state, 0) + 1
    return out


def test_claims_are_fifo_exclusive_and_limited_per_destination(archive: Archive) -> None:
    queue(archive, 15)
    queue(archive, 3, destination="other")
    first = claim(archive, "w1")
    assert [d.instance for d in first] == [f"dest-r-{i}" for i in range(10)]  # oldest first, one destination
    second = claim(archive, "w2")
    assert [d.instance for d in second] == ["dest-r-10", "dest-r-11", "dest-r-12", "dest-r-13", "dest-r-14"]
    third = claim(archive, "w3")  # dest has 2 live claims (= max associations): the other destination's turn
    assert {d.destination for d in third} == {"other"}
    assert claim(archive, "w4") == []
    assert states(archive) == {"claimed": 18}


def test_a_renewed_lease_is_not_reclaimed_and_a_stale_claim_renews_nothing(archive: Archive) -> None:
    queue(archive, 2)
    rows = claim(archive, lease_s=1)
    outbox.renew(archive.db, rows, lease_s=60)
    assert outbox.reclaim_expired(archive.db, now=utcnow() + dt.timedelta(seconds=30)) == 0
    queue(archive, 2)  # queued again: the old claim's renewal must not touch the new rows
    outbox.renew(archive.db, rows, lease_s=600)
    assert {(r.state, r.lease_until) for r in Outbox.select()} == {("pending", None)}


def test_expired_leases_and_a_dead_workers_claims_come_back(archive: Archive) -> None:
    queue(archive, 4)
    claim(archive, "node@host/w0:1", lease_s=60, limit=2)
    claim(archive, "node@host/w1:2", lease_s=-1, limit=2)  # already expired
    assert outbox.reclaim_expired(archive.db) == 2
    assert outbox.release_claims_of(archive.db, "node@host/w0:1") == 2
    assert states(archive) == {"pending": 4}


def test_failures_back_off_with_jitter_then_die_and_can_be_retried_or_discarded(archive: Archive) -> None:
    queue(archive, 2)
    policy = outbox.RetryPolicy(max_attempts=3, base_delay=10, max_delay=15)
    for attempt in (1, 2):
        rows = claim(archive)
        before = utcnow()
        outcome = outbox.mark_failed(archive.db, rows, "status 0xA700 full", 0xA700, policy)
        assert all(not o.dead and o.attempts == attempt for o in outcome)
        full = min(15, 10 * 2 ** (attempt - 1))
        for o in outcome:
            assert o.next_attempt is not None
            assert full / 2 - 0.1 <= (o.next_attempt - before).total_seconds() <= full + 0.1
        assert claim(archive) == []  # not due yet
        Outbox.update(next_attempt=utcnow()).execute()
    outcome = outbox.mark_failed(archive.db, claim(archive), "status 0xA700 full", 0xA700, policy)
    assert all(o.dead for o in outcome)
    dead = list(Outbox.select())
    assert {(r.state, r.attempts, r.last_status, r.last_error) for r in dead} == {
        ("dead", 3, 0xA700, "status 0xA700 full")
    }
    assert outbox.retry(archive.db, rule="other") == 0
    assert outbox.retry(archive.db, destination="dest") == 2
    assert {(r.state, r.attempts) for r in Outbox.select()} == {("pending", 0)}
    outbox.mark_failed(archive.db, claim(archive), "x", None, outbox.RetryPolicy(max_attempts=1))
    assert outbox.discard(archive.db) == 2
    assert Outbox.select().count() == 0


def test_delays_double_up_to_the_cap() -> None:
    policy = outbox.RetryPolicy(max_attempts=20, base_delay=2, max_delay=60)
    for attempts, full in ((1, 2), (2, 4), (5, 32), (6, 60), (19, 60)):
        delays = [policy.delay(attempts) for _ in range(200)]
        assert full / 2 <= min(delays) and max(delays) <= full
        assert max(delays) - min(delays) > full / 10  # jitter: not all in the same second


def test_a_down_destination_holds_back_its_whole_queue_without_counting_attempts(archive: Archive) -> None:
    queue(archive, 5)
    later = utcnow() + dt.timedelta(seconds=30)
    assert outbox.postpone(archive.db, "dest", later) == 5
    assert claim(archive) == []
    assert {r.attempts for r in Outbox.select()} == {0}


def test_queueing_again_restarts_a_delivered_row_and_stats_count_per_destination(archive: Archive) -> None:
    queue(archive, 3)
    rows = claim(archive)
    assert outbox.mark_done(archive.db, [rows[0]]) == [rows[0].id]
    outbox.mark_failed(archive.db, [rows[1]], "refused", 0xC000, outbox.RetryPolicy(1))
    [st] = outbox.stats(archive.db)
    assert (st.destination, st.pending, st.in_flight, st.done, st.dead) == ("dest", 0, 1, 1, 1)
    assert st.oldest_pending_s is not None
    queue(archive, 1)  # the same (instance, rule, destination) as rows[0]
    row = Outbox.get_by_id(rows[0].id)
    assert (row.state, row.attempts) == ("pending", 0)


# -- stable triggers --------------------------------------------------------------------------------------


def put(archive: Archive, path: Path, deliveries: list[tuple[str, str]] | None = None) -> str:
    spool = archive.storage.new_spool()
    spool.write(path.read_bytes())
    tags = read_index_tags(spool.name)
    return store(
        archive, spool, tags, Origin("DicomProtocol", "MOD", "NODE", "10.0.0.7"), deliveries or []
    ).ids.instance


ROUTES = parse_routes(
    [{"Name": "by-study", "Trigger": "StableStudy", "Forward": ["dest"]},
     {"Name": "ct-series", "Trigger": "StableSeries", "Forward": ["dest"], "Filter": {"Tags": {"Modality": "CT"}}}],
    ["dest"],
)  # fmt: skip


def age(archive: Archive, seconds: float) -> None:
    """Pretend the last instance came ``seconds`` ago (the receiver's parent cache, too)."""
    archive.series_cache.clear()
    past = utcnow() - dt.timedelta(seconds=seconds)
    Series.update(last_update=past).execute()
    Study.update(last_update=past).execute()


def test_a_quiet_study_fires_once_for_its_instances_and_again_only_for_new_ones(
    archive: Archive, tmp_path: Path
) -> None:
    study = "1.2.3.4"
    ids = [put(archive, make_instance(tmp_path / f"{i}.dcm", study_uid=study, series_uid=f"1.2.3.4.{i % 2}",
                                      Modality="MR" if i % 2 else "CT")) for i in range(4)]  # fmt: skip
    assert stable.fire(archive, ROUTES, stable_age=60) == []  # not quiet for long enough
    age(archive, 61)
    fired = stable.fire(archive, ROUTES, stable_age=60)
    assert sorted((f.trigger, f.instances, f.deliveries) for f in fired) == [
        ("StableSeries", 2, 0), ("StableSeries", 2, 2), ("StableStudy", 4, 4)]  # fmt: skip
    assert {(r.instance, r.rule) for r in Outbox.select()} == {
        *((i, "by-study") for i in ids), (ids[0], "ct-series"), (ids[2], "ct-series")}  # fmt: skip
    assert Change.select().where(Change.change_type == "StableStudy").count() == 1
    assert stable.fire(archive, ROUTES, stable_age=60) == []  # once
    Outbox.delete().execute()
    new = put(archive, make_instance(tmp_path / "late.dcm", study_uid=study, series_uid="1.2.3.4.0"))
    age(archive, 61)
    fired = stable.fire(archive, ROUTES, stable_age=60)
    assert sorted((f.trigger, f.instances) for f in fired) == [("StableSeries", 1), ("StableStudy", 1)]
    assert {r.instance for r in Outbox.select()} == {new}


def test_a_study_that_changes_while_it_is_evaluated_is_not_declared_stable(archive: Archive, tmp_path: Path) -> None:
    put(archive, make_instance(tmp_path / "a.dcm", study_uid="1.2.5"))
    age(archive, 61)
    real = stable.route_instance

    def and_a_new_instance(*args: object) -> object:
        Series.update(last_update=utcnow()).execute()  # what a receiver does meanwhile
        Study.update(last_update=utcnow()).execute()
        return real(*args)  # type: ignore[arg-type]

    stable.route_instance = and_a_new_instance  # type: ignore[assignment]
    try:
        assert stable.fire(archive, ROUTES, stable_age=60) == []
    finally:
        stable.route_instance = real  # type: ignore[assignment]
    assert Outbox.select().count() == 0


def test_instances_stored_by_routing_itself_are_never_routed_again(archive: Archive, tmp_path: Path) -> None:
    spool = archive.storage.new_spool()
    spool.write(make_instance(tmp_path / "r.dcm", study_uid="1.2.6").read_bytes())
    store(archive, spool, read_index_tags(spool.name), Origin(stable.ROUTING_ORIGIN))
    age(archive, 61)
    assert [f.deliveries for f in stable.fire(archive, ROUTES, stable_age=60)] == [0, 0]


def test_replay_queues_the_study_again_through_the_rule_filter(archive: Archive, tmp_path: Path) -> None:
    for i, modality in enumerate(("CT", "MR")):
        put(archive, make_instance(tmp_path / f"{i}.dcm", study_uid="1.2.7", Modality=modality))
    result = replay(archive, ROUTES[1], "1.2.7")
    assert (result.instances, result.queued, result.filtered_out) == (2, 1, 1)
    assert replay(archive, ROUTES[1], "9.9.9").instances == 0


def test_deleting_an_instance_removes_empty_parents_and_the_file(archive: Archive, tmp_path: Path) -> None:
    a = put(archive, make_instance(tmp_path / "a.dcm", study_uid="1.2.8", series_uid="1.2.8.1"))
    b = put(archive, make_instance(tmp_path / "b.dcm", study_uid="1.2.8", series_uid="1.2.8.1"))
    assert delete_instance(archive, a) and Series.select().count() == 1
    assert delete_instance(archive, b) and Series.select().count() == Study.select().count() == 0
    assert not delete_instance(archive, b)
    assert not [p for p in archive.storage.root.glob("??/*")]
    assert Change.select().where(Change.change_type == "Deleted").count() == 5  # 2 instances, series, study, patient


def test_a_partial_batch_waits_a_moment_a_full_one_does_not(archive: Archive) -> None:
    queue(archive, 3)
    assert not outbox.worth_claiming(archive.db, batch=4, linger_s=60)
    assert outbox.worth_claiming(archive.db, batch=3, linger_s=60)
    assert outbox.worth_claiming(archive.db, batch=4, linger_s=60, now=utcnow() + dt.timedelta(seconds=61))
    claim(archive)
    assert not outbox.worth_claiming(archive.db, batch=1, linger_s=0)  # nothing pending


def test_a_row_queued_again_while_in_flight_is_not_closed_by_the_old_claim(archive: Archive) -> None:
    """An overwritten instance (or a replay) resets its row while a worker sends the old copy: the old claim's
    outcome must not mark the new copy delivered, nor count an attempt against it."""
    queue(archive, 2)
    a, b = claim(archive)
    queue(archive, 2)  # both queued again meanwhile
    assert outbox.mark_done(archive.db, [a]) == []
    assert outbox.mark_failed(archive.db, [b], "x", None, outbox.RetryPolicy(1)) == []
    assert {(r.state, r.attempts) for r in Outbox.select()} == {("pending", 0)}
    assert outbox.held(archive.db, [a, b]) == []
    c, d = claim(archive)
    assert outbox.held(archive.db, [c, d]) == [c, d]
