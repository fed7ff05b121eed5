"""Tests of dicomai.jobs.queue, dicomai.ingest.index and dicomai.db on a fresh SQLite file,
plus the scheduler's jobs."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import StatementError

from dicomai.config import load_settings
from dicomai.db import Instance, Job, JobEvent, Study, create_all, make_engine, make_session_factory
from dicomai.errors import StateConflict
from dicomai.ingest.index import InstanceIndex, InstanceRecord
from dicomai.jobs.queue import Queue
from dicomai.jobs.states import ALLOWED_TRANSITIONS, TERMINAL_STATES, JobState
from dicomai.runtime.closing import close_early_studies, close_quiet_studies
from dicomai.runtime.scheduler import reap_stale
from dicomai.jobs import reads

REPO = Path(__file__).resolve().parents[2]
ROUTES = load_settings(REPO / "config" / "dicomai.toml", environ={}).routes

T0 = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
EVRLE = "1.2.840.10008.1.2.1"
AXIAL = "1.0000\\0.0000\\0.0000\\0.0000\\1.0000\\0.0000"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'dicomai.db'}")
    create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def queue(engine: Engine) -> Queue:
    return Queue(make_session_factory(engine))


@pytest.fixture
def index(engine: Engine) -> InstanceIndex:
    return InstanceIndex(make_session_factory(engine))


def rec(
    study: str = "1.2.3",
    series: str = "1.2.3.1",
    sop: str = "1.2.3.1.1",
    **kwargs: object,
) -> InstanceRecord:
    values: dict[str, object] = {
        "sop_instance_uid": sop,
        "study_instance_uid": study,
        "series_instance_uid": series,
        "sop_class_uid": DX,
        "transfer_syntax_uid": EVRLE,
        "modality": "DX",
        "body_part": "CHEST",
        "view_position": "PA",
        "series_number": 1,
        "instance_number": 1,
    }
    values.update(kwargs)
    return InstanceRecord(**values)  # type: ignore[arg-type]


def record(index: InstanceIndex, r: InstanceRecord, now: datetime = T0) -> tuple[bool, int]:
    return index.record_instance(r, f"/spool/{r.sop_instance_uid}.dcm", 1234, "MODALITY", now)


def events(queue: Queue, job_id: int) -> list[tuple[str | None, str, str]]:
    with queue.session() as s:
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        return [(e.src, e.dst, e.reason) for e in rows]


def queued_job(queue: Queue, index: InstanceIndex, n: int, now: datetime = T0,
               **fields: object) -> int:
    """A fresh study with one instance, moved to QUEUED."""
    _, job_id = record(index, rec(study=f"1.9.{n}", series=f"1.9.{n}.1", sop=f"1.9.{n}.1.1"), now)
    queue.transition(job_id, JobState.RECEIVING, JobState.QUEUED, reason="test", now=now,
                     closed_at=now, model="chest-xray", **fields)
    return job_id


# -- receiving --------------------------------------------------------------------------------


def test_first_instance_creates_study_and_receiving_job(queue: Queue, index: InstanceIndex) -> None:
    new, job_id = record(index, rec())
    assert new is True
    job = reads.get_job(queue.sessions, job_id)
    assert job.state == JobState.RECEIVING
    assert job.generation == 1
    assert job.instance_count == 1
    assert job.last_instance_at == T0
    assert job.last_instance_at.tzinfo is not None
    assert reads.study_uid(queue.sessions, job.study_id) == "1.2.3"
    assert index.has_instance("1.2.3.1.1")
    assert not index.has_instance("1.2.3.1.2")
    assert events(queue, job_id) == [(None, "receiving", "instance.first")]

    (inst,) = reads.study_instances(queue.sessions, job.study_id)
    assert inst.sop_instance_uid == "1.2.3.1.1"
    assert inst.job_id == job_id
    assert inst.path == "/spool/1.2.3.1.1.dcm"
    assert inst.size_bytes == 1234
    assert inst.calling_ae_title == "MODALITY"
    assert inst.modality == "DX"
    assert inst.view_position == "PA"


def test_more_instances_join_the_same_job(queue: Queue, index: InstanceIndex) -> None:
    _, job1 = record(index, rec(sop="1.2.3.1.1"), T0)
    new, job2 = record(index, rec(sop="1.2.3.1.2"), T0 + timedelta(seconds=5))
    assert new is True
    assert job2 == job1
    job = reads.get_job(queue.sessions, job1)
    assert job.instance_count == 2
    assert job.last_instance_at == T0 + timedelta(seconds=5)
    assert len(events(queue, job1)) == 1


def test_duplicate_sop_instance_uid_changes_nothing(queue: Queue, index: InstanceIndex) -> None:
    _, job_id = record(index, rec(), T0)
    later = T0 + timedelta(seconds=20)
    new, again = index.record_instance(rec(), "/spool/other.dcm", 99, "OTHER", later)
    assert (new, again) == (False, job_id)
    job = reads.get_job(queue.sessions, job_id)
    assert job.instance_count == 1
    assert job.last_instance_at == T0
    with queue.session() as s:
        assert s.scalar(select(Study.last_received_at)) == T0
        paths = list(s.scalars(select(Instance.path)))
    assert paths == ["/spool/1.2.3.1.1.dcm"]


def test_instance_after_job_left_receiving_opens_generation_2(
        queue: Queue, index: InstanceIndex) -> None:
    _, job1 = record(index, rec(sop="1.2.3.1.1"), T0)
    queue.transition(job1, JobState.RECEIVING, JobState.QUEUED, reason="test", now=T0)
    later = T0 + timedelta(minutes=5)
    new, job2 = record(index, rec(sop="1.2.3.1.2"), later)
    assert new is True
    assert job2 != job1
    first, second = reads.get_job(queue.sessions, job1), reads.get_job(queue.sessions, job2)
    assert (first.state, first.generation, first.instance_count) == ("queued", 1, 1)
    assert (second.state, second.generation, second.instance_count) == ("receiving", 2, 1)
    assert second.study_id == first.study_id
    assert len(reads.study_instances(queue.sessions, first.study_id)) == 2
    gen1 = reads.study_instances(queue.sessions, first.study_id, 1)
    assert [i.sop_instance_uid for i in gen1] == ["1.2.3.1.1"]
    # A third instance joins generation 2, not a new one.
    _, job3 = record(index, rec(sop="1.2.3.1.3"), later)
    assert job3 == job2
    with queue.session() as s:
        assert s.scalar(select(Study.last_received_at)) == later


def test_naive_datetime_is_refused(queue: Queue, index: InstanceIndex) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        record(index, rec(), datetime(2024, 1, 1))
    assert not index.has_instance("1.2.3.1.1")


# -- transitions ------------------------------------------------------------------------------


def test_transition_writes_state_fields_and_event(queue: Queue, index: InstanceIndex) -> None:
    _, job_id = record(index, rec())
    later = T0 + timedelta(seconds=31)
    queue.transition(job_id, "receiving", "queued", reason="route.matched", now=later,
                     route="chest-xray", model="chest-xray", series_uids=["1.2.3.1"])
    job = reads.get_job(queue.sessions, job_id)
    assert job.state == "queued"
    assert job.updated_at == later
    assert (job.route, job.model, job.series_uids) == ("chest-xray", "chest-xray", ["1.2.3.1"])
    assert job.finished_at is None
    assert events(queue, job_id)[-1] == ("receiving", "queued", "route.matched")


def test_transition_to_terminal_state_sets_finished_at(queue: Queue, index: InstanceIndex) -> None:
    _, job_id = record(index, rec())
    queue.transition(job_id, JobState.RECEIVING, JobState.SKIPPED, reason="route.none", now=T0)
    assert reads.get_job(queue.sessions, job_id).finished_at == T0


@pytest.mark.parametrize(
    ("src", "dst"),
    [(s, d) for s in JobState for d in JobState if d not in ALLOWED_TRANSITIONS[s]],
)
def test_disallowed_transitions_raise_value_error(queue: Queue, index: InstanceIndex, src: JobState,
                                                  dst: JobState) -> None:
    _, job_id = record(index, rec())
    with queue.session() as s, s.begin():
        s.execute(update(Job).where(Job.id == job_id).values(state=src.value))
    with pytest.raises(ValueError, match="not allowed"):
        queue.transition(job_id, src, dst, reason="test", now=T0)
    assert reads.get_job(queue.sessions, job_id).state == src.value
    assert len(events(queue, job_id)) == 1


def test_terminal_states_have_no_way_out_except_failed() -> None:
    for state in TERMINAL_STATES - {JobState.FAILED}:
        assert ALLOWED_TRANSITIONS[state] == frozenset()
    assert JobState.RECEIVING not in set().union(*ALLOWED_TRANSITIONS.values())


def test_transition_compare_and_set(queue: Queue, index: InstanceIndex) -> None:
    _, job_id = record(index, rec())
    with pytest.raises(StateConflict):
        queue.transition(job_id, JobState.QUEUED, JobState.RUNNING, reason="test", now=T0)
    assert reads.get_job(queue.sessions, job_id).state == "receiving"
    queue.transition(job_id, JobState.RECEIVING, JobState.QUEUED, reason="first", now=T0)
    with pytest.raises(StateConflict):  # a second mover loses
        queue.transition(job_id, JobState.RECEIVING, JobState.QUEUED, reason="second", now=T0)
    with pytest.raises(StateConflict):  # no such job
        queue.transition(job_id + 100, JobState.QUEUED, JobState.RUNNING, reason="x", now=T0)
    assert [e[2] for e in events(queue, job_id)] == ["instance.first", "first"]


# -- claiming ---------------------------------------------------------------------------------


def test_claim_next_moves_to_running_and_counts_attempts(
        queue: Queue, index: InstanceIndex) -> None:
    job_id = queued_job(queue, index, 1)
    claimed = queue.claim_next(JobState.QUEUED, JobState.RUNNING, "worker-1", T0)
    assert claimed is not None
    assert claimed.id == job_id
    assert claimed.state == "running"
    assert claimed.attempts == 1
    assert claimed.claimed_by == "worker-1"
    assert claimed.heartbeat_at == T0
    assert events(queue, job_id)[-1] == ("queued", "running", "claim")
    assert queue.claim_next(JobState.QUEUED, JobState.RUNNING, "worker-1", T0) is None

    # back to QUEUED and claimed again: attempts 2
    queue.transition(job_id, JobState.RUNNING, JobState.QUEUED, reason="retry", now=T0)
    again = queue.claim_next(JobState.QUEUED, JobState.RUNNING, "worker-2", T0)
    assert again is not None
    assert (again.id, again.attempts, again.claimed_by) == (job_id, 2, "worker-2")


def test_claim_for_sending_does_not_count_inference_attempts(
        queue: Queue, index: InstanceIndex) -> None:
    job_id = queued_job(queue, index, 1)
    queue.claim_next(JobState.QUEUED, JobState.RUNNING, "w", T0)
    queue.transition(job_id, JobState.RUNNING, JobState.OUTBOX, reason="built", now=T0)
    claimed = queue.claim_next(JobState.OUTBOX, JobState.SENDING, "s", T0)
    assert claimed is not None
    assert (claimed.state, claimed.attempts, claimed.claimed_by) == ("sending", 1, "s")


def test_claim_next_respects_not_before(queue: Queue, index: InstanceIndex) -> None:
    job_id = queued_job(queue, index, 1, not_before=T0 + timedelta(seconds=60))
    assert queue.claim_next(JobState.QUEUED, JobState.RUNNING, "w", T0) is None
    assert queue.claim_next(JobState.QUEUED, JobState.RUNNING, "w",
                            T0 + timedelta(seconds=59)) is None
    claimed = queue.claim_next(JobState.QUEUED, JobState.RUNNING, "w", T0 + timedelta(seconds=60))
    assert claimed is not None
    assert claimed.id == job_id


def test_claim_next_order_priority_then_closed_at(queue: Queue, index: InstanceIndex) -> None:
    early = queued_job(queue, index, 1, T0)
    late = queued_job(queue, index, 2, T0 + timedelta(seconds=10))
    urgent = queued_job(queue, index, 3, T0 + timedelta(seconds=20), priority=5)
    deferred = queued_job(queue, index, 4, T0, priority=9, not_before=T0 + timedelta(hours=1))
    now = T0 + timedelta(minutes=1)
    order = []
    while (job := queue.claim_next(JobState.QUEUED, JobState.RUNNING, "w", now)) is not None:
        order.append(job.id)
    assert order == [urgent, early, late]
    assert reads.get_job(queue.sessions, deferred).state == "queued"


def test_claim_next_filters_by_model(queue: Queue, index: InstanceIndex) -> None:
    chest = queued_job(queue, index, 1)
    _, ct = record(index, rec(study="1.8", series="1.8.1", sop="1.8.1.1"))
    queue.transition(ct, JobState.RECEIVING, JobState.QUEUED, reason="t", now=T0,
                     closed_at=T0, model="head-ct-ich")
    assert queue.claim_next(JobState.QUEUED, JobState.RUNNING, "w", T0, models=["bone-xray"]) \
        is None
    got = queue.claim_next(JobState.QUEUED, JobState.RUNNING, "w", T0, models=["head-ct-ich"])
    assert got is not None and got.id == ct
    got = queue.claim_next(JobState.QUEUED, JobState.RUNNING, "w", T0)
    assert got is not None and got.id == chest


def test_concurrent_claimers_never_share_a_job(queue: Queue, index: InstanceIndex) -> None:
    jobs = [queued_job(queue, index, n) for n in range(20)]
    claims: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def claimer(name: str) -> None:
        got: list[int] = []
        claims[name] = got
        try:
            start.wait()
            while (job := queue.claim_next(JobState.QUEUED, JobState.RUNNING, name, T0)) \
                    is not None:
                got.append(job.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    counted = Counter(j for got in claims.values() for j in got)
    assert sorted(counted) == sorted(jobs)
    assert set(counted.values()) == {1}
    for name, got in claims.items():
        for job_id in got:
            job = reads.get_job(queue.sessions, job_id)
            assert (job.state, job.claimed_by, job.attempts) == ("running", name, 1)
            assert [e[1] for e in events(queue, job_id)].count("running") == 1


# -- scheduler jobs ---------------------------------------------------------------------------


def test_close_quiet_studies_routes_or_skips(queue: Queue, index: InstanceIndex) -> None:
    # chest radiograph: PA and lateral series
    _, chest = record(index, rec(study="1.1", series="1.1.1", sop="1.1.1.1", series_number=1,
                                 view_position="LL"), T0)
    record(index, rec(study="1.1", series="1.1.2", sop="1.1.2.1", series_number=2,
                      view_position="PA"), T0)
    # head CT: localizer and an axial series of 3 slices
    _, head = record(index, rec(study="1.2", series="1.2.1", sop="1.2.1.1", modality="CT",
                                sop_class_uid=CT, body_part="HEAD",
                                image_type="ORIGINAL\\PRIMARY\\LOCALIZER"), T0)
    for i in range(3):
        record(index, rec(study="1.2", series="1.2.2", sop=f"1.2.2.{i}", modality="CT",
                          sop_class_uid=CT, body_part="HEAD", orientation=AXIAL,
                          image_type="ORIGINAL\\PRIMARY\\AXIAL"), T0)
    # MR knee: no route
    _, knee = record(index, rec(study="1.3", series="1.3.1", sop="1.3.1.1", modality="MR",
                                body_part="KNEE"), T0)
    # still arriving: last instance 10 s before the check
    _, busy = record(index, rec(study="1.4", series="1.4.1", sop="1.4.1.1"),
                     T0 + timedelta(seconds=25))

    now = T0 + timedelta(seconds=35)
    assert close_quiet_studies(queue, ROUTES, now, 30) == 3

    job = reads.get_job(queue.sessions, chest)
    assert (job.state, job.route, job.model) == ("queued", "chest-xray", "chest-xray")
    assert job.series_uids == ["1.1.2"]
    assert job.destinations == ["pacs"]
    assert job.closed_at == now

    job = reads.get_job(queue.sessions, head)
    assert (job.state, job.route, job.model) == ("queued", "brain-ct", "head-ct-ich")
    assert job.series_uids == ["1.2.2"]

    job = reads.get_job(queue.sessions, knee)
    assert (job.state, job.route, job.model, job.series_uids) == ("skipped", None, None, [])
    assert job.finished_at == now
    assert events(queue, knee)[-1] == ("receiving", "skipped", "route.none")

    assert reads.get_job(queue.sessions, busy).state == "receiving"
    assert close_quiet_studies(queue, ROUTES, now, 30) == 0  # idempotent
    assert close_quiet_studies(queue, ROUTES, now + timedelta(seconds=30), 30) == 1
    assert reads.get_job(queue.sessions, busy).state == "queued"


def test_close_quiet_generation_2_sees_earlier_instances(
        queue: Queue, index: InstanceIndex) -> None:
    _, job1 = record(index, rec(study="1.1", series="1.1.1", sop="1.1.1.1"), T0)
    assert close_quiet_studies(queue, ROUTES, T0 + timedelta(seconds=31), 30) == 1
    later = T0 + timedelta(minutes=5)
    # A lateral view arrives later: the frontal series (the model's input) is unchanged.
    _, job2 = record(index, rec(study="1.1", series="1.1.2", sop="1.1.2.1", view_position="LL",
                                series_number=2), later)
    assert close_quiet_studies(queue, ROUTES, later + timedelta(seconds=31), 30) == 1
    job = reads.get_job(queue.sessions, job2)
    assert (job.generation, job.state, job.route) == (2, "skipped", "chest-xray")
    assert events(queue, job2)[-1] == ("receiving", "skipped", "route.inputs_unchanged")
    assert reads.get_job(queue.sessions, job1).state == "queued"
    # Another image in the analysed series changes the input: generation 3 is analysed.
    even_later = later + timedelta(minutes=5)
    _, job3 = record(index, rec(study="1.1", series="1.1.1", sop="1.1.1.2"), even_later)
    assert close_quiet_studies(queue, ROUTES, even_later + timedelta(seconds=31), 30) == 1
    job = reads.get_job(queue.sessions, job3)
    assert (job.generation, job.state, job.route) == (3, "queued", "chest-xray")
    assert job.series_uids == ["1.1.1"]  # the frontal series, generations 1 and 3


def test_reap_stale_returns_claims(queue: Queue, index: InstanceIndex) -> None:
    stale_run = queued_job(queue, index, 1)
    fresh_run = queued_job(queue, index, 2)
    stale_send = queued_job(queue, index, 3)
    # claim all three as worker "w", then move one on to SENDING
    while queue.claim_next(JobState.QUEUED, JobState.RUNNING, "w", T0) is not None:
        pass
    queue.transition(stale_send, JobState.RUNNING, JobState.OUTBOX, reason="built", now=T0)
    assert queue.claim_next(JobState.OUTBOX, JobState.SENDING, "s", T0) is not None
    now = T0 + timedelta(seconds=400)
    queue.heartbeat_job(fresh_run, "w", now - timedelta(seconds=10))
    queue.heartbeat_job(stale_run, "someone-else", now)  # not its claimer: ignored

    assert reap_stale(queue, now, 300) == 2
    job = reads.get_job(queue.sessions, stale_run)
    assert (job.state, job.claimed_by) == ("queued", None)
    assert events(queue, stale_run)[-1] == ("running", "queued", "reap.stale_heartbeat")
    job = reads.get_job(queue.sessions, stale_send)
    assert (job.state, job.claimed_by) == ("outbox", None)
    job = reads.get_job(queue.sessions, fresh_run)
    assert (job.state, job.claimed_by) == ("running", "w")
    assert reap_stale(queue, now, 300) == 0


def test_claim_only_jobs_for_the_models_a_worker_serves(queue: Queue, index: InstanceIndex) -> None:
    chest = queued_job(queue, index, 1)
    ct = queued_job(queue, index, 2)
    queue.transition(ct, JobState.QUEUED, JobState.CANCELLED, reason="test", now=T0)
    ct = queued_job(queue, index, 3)
    with queue.session() as s, s.begin():
        s.execute(update(Job).where(Job.id == ct).values(model="head-ct-ich"))
    assert queue.claim_next(JobState.QUEUED, JobState.RUNNING, "ct-worker", T0,
                            models=["head-ct-ich"]).id == ct
    assert queue.claim_next(JobState.QUEUED, JobState.RUNNING, "ct-worker", T0,
                            models=["head-ct-ich"]) is None  # the chest job is not its own
    assert queue.claim_next(JobState.QUEUED, JobState.RUNNING, "any-worker", T0).id == chest


def test_restart_quiet_clocks_only_touches_receiving_jobs(
        queue: Queue, index: InstanceIndex) -> None:
    _, receiving = record(index, rec(study="1.7", series="1.7.1", sop="1.7.1.1"), T0)
    queued = queued_job(queue, index, 4)
    later = T0 + timedelta(minutes=10)
    assert index.restart_quiet_clocks(later) == 1
    assert reads.get_job(queue.sessions, receiving).last_instance_at == later
    assert reads.get_job(queue.sessions, queued).last_instance_at == T0


def test_urgent_route_is_claimed_before_older_routine_jobs(
        queue: Queue, index: InstanceIndex) -> None:
    from dicomai.config import load_settings

    routes = load_settings(Path(__file__).resolve().parents[2] / "config" / "dicomai.toml",
                           environ={}).routes
    for n in range(3):  # a backlog of chest X-rays
        record(index, rec(study=f"1.5.{n}", series=f"1.5.{n}.1", sop=f"1.5.{n}.1.1"), T0)
    _, ct = record(index, rec(study="1.6", series="1.6.1", sop="1.6.1.1", modality="CT",
                              body_part="HEAD", image_type="ORIGINAL\\PRIMARY\\AXIAL"),
                   T0 + timedelta(seconds=5))
    assert close_quiet_studies(queue, routes, T0 + timedelta(minutes=5), 30) == 4
    first = queue.claim_next(JobState.QUEUED, JobState.RUNNING, "w", T0 + timedelta(minutes=5))
    assert (first.id, first.route, first.priority) == (ct, "brain-ct", 10)


def test_sweep_orphans_removes_only_old_unindexed_files(
        queue: Queue, index: InstanceIndex, tmp_path: Path) -> None:
    import os
    import time

    from dicomai.runtime.scheduler import sweep_orphans
    from dicomai.ingest.slots import EMPTY_SLOT_SWEEP_AGE
    from dicomai.ingest.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.start()
    indexed, _ = spool.write_instance([b"DICM"])
    orphan, _ = spool.write_instance([b"DICM"])
    young, _ = spool.write_instance([b"DICM"])
    free = sorted(p for p in indexed.parent.iterdir() if p.stat().st_size == 0)
    assert len(free) > 3  # pre-created slots, not yet used
    stale_free, fresh_free = free[0], free[1]
    hour_old = time.time() - 7200
    for path in (indexed, orphan, fresh_free):  # two hours: empty slots are kept
        os.utime(path, (hour_old, hour_old))
    days_old = hour_old - EMPTY_SLOT_SWEEP_AGE
    os.utime(stale_free, (days_old, days_old))  # left by a process long gone
    index.record_instance(rec(study="1.2", series="1.2.3", sop="1.2.3.4"), str(indexed), 4,
                          "MODALITY", T0)
    assert sweep_orphans(index, spool) == 2
    assert indexed.exists() and young.exists() and fresh_free.exists()
    assert not orphan.exists() and not stale_free.exists()


# -- early close ------------------------------------------------------------------------------
EARLY = load_settings(REPO / "config" / "dicomai.toml", environ={}).scheduler


def _ct(study: str, series: str, i: int, **kwargs: object) -> InstanceRecord:
    values: dict[str, object] = {
        "modality": "CT", "sop_class_uid": CT, "body_part": "HEAD", "orientation": AXIAL,
        "image_type": "ORIGINAL\\PRIMARY\\AXIAL", "acquisition_number": 1,
    }
    values.update(kwargs)
    return rec(study=study, series=series, sop=f"{series}.{i}", **values)


def test_early_close_after_release_and_grace(queue: Queue, index: InstanceIndex) -> None:
    assert (EARLY.early_close, EARLY.release_grace_seconds) == (True, 2.0)
    for i in range(3):  # no ImagesInAcquisition: only the release can close it early
        _, job_id = record(index, _ct("2.1", "2.1.1", i), T0)
    assert index.mark_released(["2.1"], T0 + timedelta(seconds=1)) == 1
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=2), EARLY) == 0  # grace
    assert reads.get_job(queue.sessions, job_id).state == "receiving"
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=3), EARLY) == 1
    job = reads.get_job(queue.sessions, job_id)
    assert (job.state, job.route) == ("queued", "brain-ct")
    assert events(queue, job_id)[-1] == ("receiving", "queued", "route.matched")


def test_instance_after_release_cancels_early_close(queue: Queue, index: InstanceIndex) -> None:
    _, job_id = record(index, _ct("2.2", "2.2.1", 0), T0)
    index.mark_released(["2.2"], T0 + timedelta(seconds=1))
    # The sender opens a new association and goes on: the old release no longer counts.
    record(index, _ct("2.2", "2.2.1", 1), T0 + timedelta(seconds=2))
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=10), EARLY) == 0
    assert reads.get_job(queue.sessions, job_id).state == "receiving"
    # ... until that association is released too.
    index.mark_released(["2.2"], T0 + timedelta(seconds=11))
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=13.5), EARLY) == 1
    assert reads.get_job(queue.sessions, job_id).state == "queued"


def test_early_close_when_images_in_acquisition_are_all_there(
        queue: Queue, index: InstanceIndex) -> None:
    for i in range(2):
        _, job_id = record(index, _ct("2.3", "2.3.1", i, images_in_acquisition=3), T0)
    # 2 of 3 announced slices: not complete, association still open, quiet period not over.
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=10), EARLY) == 0
    record(index, _ct("2.3", "2.3.1", 2, images_in_acquisition=3), T0 + timedelta(seconds=10))
    # complete, but give back-to-back images complete_quiet_seconds (1 s) to settle
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=10.5), EARLY) == 0
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=11), EARLY) == 1
    assert reads.get_job(queue.sessions, job_id).state == "queued"


def test_complete_and_released_closes_at_once(queue: Queue, index: InstanceIndex) -> None:
    _, job_id = record(index, rec(study="2.4", series="2.4.1", sop="2.4.1.1"), T0)  # one DX
    index.mark_released(["2.4"], T0)
    assert close_early_studies(queue, ROUTES, T0, EARLY) == 1
    assert reads.get_job(queue.sessions, job_id).state == "queued"


def test_single_xray_image_closes_at_release_without_grace(
        queue: Queue, index: InstanceIndex) -> None:
    _, one = record(index, rec(study="2.5", series="2.5.1", sop="2.5.1.1"), T0)
    _, two = record(index, rec(study="2.6", series="2.6.1", sop="2.6.1.1"), T0)
    record(index, rec(study="2.6", series="2.6.2", sop="2.6.2.1", view_position="LL"), T0)
    # a CT series whose headers announce nothing
    _, ct = record(index, _ct("2.7", "2.7.1", 0), T0)
    # Still connected: a single image is only a hint (a slow sender's lateral may follow).
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=10), EARLY) == 0
    index.mark_released(["2.5", "2.6", "2.7"], T0 + timedelta(seconds=10))
    # Released: the one-view study closes at once, the others wait for the grace period.
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=10), EARLY) == 1
    assert [reads.get_job(queue.sessions, j).state for j in (one, two, ct)] == \
        ["queued", "receiving", "receiving"]
    # with the rule switched off the one-view study waits for the grace period too
    off = EARLY.model_copy(update={"single_image_modalities": []})
    _, three = record(index, rec(study="2.8", series="2.8.1", sop="2.8.1.1"), T0)
    index.mark_released(["2.8"], T0)
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=1), off) == 0
    disabled = EARLY.model_copy(update={"early_close": False})
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=5), disabled) == 0
    assert reads.get_job(queue.sessions, three).state == "receiving"
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=12), off) == 3


def test_late_instance_after_early_close_opens_generation_2(
        queue: Queue, index: InstanceIndex) -> None:
    for i in range(2):
        _, job1 = record(index, _ct("2.9", "2.9.1", i, images_in_acquisition=2), T0)
    index.mark_released(["2.9"], T0)
    assert close_early_studies(queue, ROUTES, T0, EARLY) == 1
    # A slice the headers did not announce arrives later: a new generation, analysed again
    # with every slice of the series (nothing lost), once it is complete or quiet.
    _, job2 = record(index, _ct("2.9", "2.9.1", 2, images_in_acquisition=2),
                     T0 + timedelta(seconds=5))
    assert job2 != job1
    assert close_early_studies(queue, ROUTES, T0 + timedelta(seconds=30), EARLY) == 1
    job = reads.get_job(queue.sessions, job2)
    assert (job.generation, job.state, job.route) == (2, "queued", "brain-ct")
    assert len(reads.study_instances(queue.sessions, job.study_id, up_to_generation=2)) == 3


def test_retention_removes_the_receiver_directories_it_empties(queue: Queue, index: InstanceIndex,
                                                               tmp_path: Path) -> None:
    from dicomai.runtime.scheduler import purge_finished
    from dicomai.ingest.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.start()
    old, _ = spool.write_instance([b"old study"])
    spool.close()  # its writer stopped: its directory holds only the old study's file now
    live = Spool(tmp_path / "spool")
    recent, _ = live.write_instance([b"recent study"])  # a running writer's directory
    _, old_job = index.record_instance(rec(study="1.5", series="1.5.1", sop="1.5.1.1"),
                                       str(old), 9, "MODALITY", T0)
    index.record_instance(rec(study="1.6", series="1.6.1", sop="1.6.1.1"), str(recent), 12,
                          "MODALITY", T0)
    queue.transition(old_job, JobState.RECEIVING, JobState.SKIPPED, reason="test", now=T0)
    items = purge_finished(index, spool, T0 + timedelta(days=30), retention_days=7)
    assert [i.instance_files for i in items] == [1]
    assert not old.exists() and not old.parent.exists()  # emptied: removed
    assert recent.exists() and len(list(recent.parent.iterdir())) == 64  # still in use
    live.close()
