"""The worker's and the sender's decisions through the job state policy, on a real database
and a ManualClock: each run's outcome is scripted (the model run, the transport), and the job's
next state, counters, backoff (``not_before`` to the second) and events are checked."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from dicomai.config import Settings, load_settings
from dicomai.db import Instance, Job, JobEvent, ResultObject, Study, make_session_factory
from dicomai.delivery.sender import Sender
from dicomai.delivery.transport import SendItem, SendReport
from dicomai.errors import Interrupted, RetryableError, UnsupportedInput
from dicomai.inference.worker import Worker
from dicomai.ingest.spool import Spool
from dicomai.jobs.policy import SendOutcome
from dicomai.jobs.queue import Queue
from dicomai.jobs.states import JobState, ResultState
from dicomai.runtime.clock import ManualClock

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
MODEL = "chest-xray"
CR = "1.2.840.10008.5.1.4.1.1.1"


def _settings(**dest: Any) -> Settings:
    settings = load_settings(
        REPO / "config" / "dicomai.toml",
        environ={},
        overrides={
            "worker": {"max_attempts": 3, "retry_base_seconds": 30},
            "sender": {"max_attempts": 4, "retry_base_seconds": 10, "retry_max_seconds": 25},
        },
    )
    dests = [d.model_copy(update=dest) for d in settings.destinations]
    return settings.model_copy(update={"destinations": dests})


class _Models:
    """The worker's view of a model pool whose models are all ready (none loaded)."""

    def waiting(self, name: str) -> bool:
        return False

    def loaded(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def queue(engine: Engine) -> Queue:
    return Queue(make_session_factory(engine))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


def _job(queue: Queue, state: JobState, *, paths: Sequence[str] = (), **fields: Any) -> int:
    """A job of one CR study in ``state``, routed to the chest model and the "pacs"
    destination, with an instance row per file in ``paths``."""
    with queue.session() as s, s.begin():
        study = Study(study_instance_uid="1.2.3", first_received_at=T0, last_received_at=T0)
        s.add(study)
        s.flush()
        job = Job(
            study_id=study.id,
            generation=1,
            state=state.value,
            route=MODEL,
            model=MODEL,
            series_uids=["1.2.3.1"],
            destinations=["pacs"],
            created_at=T0,
            updated_at=T0,
            last_instance_at=T0,
            closed_at=T0,
            **fields,
        )
        s.add(job)
        s.flush()
        for n, path in enumerate(paths):
            s.add(
                Instance(
                    sop_instance_uid=f"1.2.3.1.{n}",
                    study_id=study.id,
                    job_id=job.id,
                    series_instance_uid="1.2.3.1",
                    sop_class_uid=CR,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    modality="CR",
                    path=path,
                )
            )
        return job.id


def _results(queue: Queue, job_id: int, *destinations_kinds: tuple[str, str]) -> list[int]:
    with queue.session() as s, s.begin():
        rows = [
            ResultObject(
                job_id=job_id,
                destination=dest,
                kind=kind,
                sop_class_uid=CR,
                sop_instance_uid=f"2.{n}",
                series_instance_uid="2",
                path=f"/r/{n}.dcm",
                state=ResultState.PENDING,
            )
            for n, (dest, kind) in enumerate(destinations_kinds)
        ]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def _row(queue: Queue, job_id: int) -> Job:
    with queue.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _reasons(queue: Queue, job_id: int) -> list[tuple[str | None, str, str]]:
    with queue.session() as s:
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        return [(e.src, e.dst, e.reason) for e in rows]


def _result_states(queue: Queue, job_id: int) -> list[str]:
    with queue.session() as s:
        rows = s.scalars(
            select(ResultObject).where(ResultObject.job_id == job_id).order_by(ResultObject.id)
        )
        return [r.state for r in rows]


# -- worker --------------------------------------------------------------------------------
@pytest.fixture
def make_worker(
    queue: Queue, clock: ManualClock, tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    def make(settings: Settings, run: Callable[[Job], None]) -> Worker:
        worker = Worker(
            settings,
            queue,
            Spool(tmp_path / "spool"),
            _Models(),  # type: ignore[arg-type]  # a stand-in: the model run is scripted
            clock,
            name="worker@test",
            model_names=[MODEL],
        )
        worker._run = run  # type: ignore[method-assign]  # the run's outcome is scripted
        return worker

    yield make


def _raises(exc: Exception) -> Callable[[Job], None]:
    def run(job: Job) -> None:
        raise exc

    return run


def test_worker_retries_with_doubling_backoff_then_gives_up(
    queue: Queue, clock: ManualClock, make_worker: Callable[..., Worker]
) -> None:
    job_id = _job(queue, JobState.QUEUED)
    worker = make_worker(_settings(), _raises(RetryableError("model busy")))

    assert worker.run_once()
    job = _row(queue, job_id)
    assert (job.state, job.attempts, job.claimed_by) == ("queued", 1, None)
    assert job.not_before == T0 + timedelta(seconds=30)
    assert job.last_error == "RetryableError: model busy"

    clock.advance(29)
    assert not worker.run_once()  # not due yet
    clock.advance(1)
    assert worker.run_once()
    job = _row(queue, job_id)
    assert job.attempts == 2 and job.not_before == T0 + timedelta(seconds=30 + 60)

    clock.advance(60)
    assert worker.run_once()
    job = _row(queue, job_id)
    assert (job.state, job.attempts) == ("failed", 3)
    assert job.finished_at == T0 + timedelta(seconds=90)
    assert job.last_error == "RetryableError: model busy"
    assert [r for _, _, r in _reasons(queue, job_id)] == [
        "claim",
        "retry.error",
        "claim",
        "retry.error",
        "claim",
        "attempts_exhausted",
    ]


def test_worker_error_text_of_a_library_exception_is_its_type_only(
    queue: Queue, make_worker: Callable[..., Worker]
) -> None:
    job_id = _job(queue, JobState.QUEUED)
    worker = make_worker(_settings(), _raises(ValueError("PatientName=Doe^John")))
    assert worker.run_once()
    assert _row(queue, job_id).last_error == "ValueError"


def test_worker_permanent_error_fails_at_once(
    queue: Queue, make_worker: Callable[..., Worker]
) -> None:
    job_id = _job(queue, JobState.QUEUED)
    worker = make_worker(_settings(), _raises(UnsupportedInput("no pixel data")))
    assert worker.run_once()
    job = _row(queue, job_id)
    assert (job.state, job.attempts, job.last_error) == ("failed", 1, "no pixel data")
    assert _reasons(queue, job_id)[-1] == ("running", "failed", "permanent.UnsupportedInput")


def test_worker_stopping_puts_the_job_back_without_using_an_attempt(
    queue: Queue, clock: ManualClock, make_worker: Callable[..., Worker]
) -> None:
    job_id = _job(queue, JobState.QUEUED, attempts=1)
    worker = make_worker(_settings(), _raises(Interrupted("stopping")))
    assert worker.run_once()
    job = _row(queue, job_id)
    assert (job.state, job.attempts, job.claimed_by, job.not_before) == ("queued", 1, None, None)
    assert _reasons(queue, job_id)[-1] == ("running", "queued", "worker.stopping")
    assert worker.run_once()  # due at once


def test_worker_failure_notice_goes_to_the_outbox_and_ends_failed_once_sent(
    queue: Queue, clock: ManualClock, make_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    from dicomai_tools import synthetic

    ds = synthetic.make_xray("chest", modality="CR", rows=32, cols=32, seed=3)
    ds.SeriesInstanceUID = "1.2.3.1"
    (path,) = synthetic.write_study([ds], tmp_path / "in")
    settings = _settings(emit_failure_notice=True)
    job_id = _job(queue, JobState.QUEUED, paths=[str(path)])
    worker = make_worker(settings, _raises(UnsupportedInput("bad")))

    assert worker.run_once()
    job = _row(queue, job_id)
    assert (job.state, job.claimed_by, job.last_error) == ("outbox", None, "bad")
    assert job.findings == {"failure_notice": True, "reason": "permanent.UnsupportedInput"}
    assert _reasons(queue, job_id)[-1] == (
        "running",
        "outbox",
        "permanent.UnsupportedInput.notice",
    )
    with queue.session() as s:
        (notice,) = s.scalars(select(ResultObject).where(ResultObject.job_id == job_id))
        assert (notice.kind, notice.destination, notice.state) == ("notice", "pacs", "pending")
        assert Path(notice.path).is_file()

    sender = Sender(settings, queue, clock, name="sender@test")
    sender._send = _sends(SendOutcome.SENT)  # type: ignore[method-assign]  # scripted
    assert sender.run_once()
    job = _row(queue, job_id)
    assert job.state == "failed" and job.finished_at == T0
    assert _reasons(queue, job_id)[-1] == ("sending", "failed", "failed.notice_sent")


# -- sender --------------------------------------------------------------------------------
def _sends(*outcomes: SendOutcome) -> Callable[[Any, Sequence[SendItem]], SendReport]:
    """A transport answering each item with the next outcome (the last one repeats)."""

    def send(dest: Any, items: Sequence[SendItem]) -> SendReport:
        report = SendReport()
        for n, item in enumerate(items):
            outcome = outcomes[min(n, len(outcomes) - 1)]
            error = None if outcome is SendOutcome.SENT else f"{outcome.value} {n}"
            report.outcomes[item.result_id] = (outcome, None, error)
        return report

    return send


@pytest.fixture
def make_sender(queue: Queue, clock: ManualClock) -> Callable[..., Sender]:
    def make(*outcomes: SendOutcome, settings: Settings | None = None) -> Sender:
        sender = Sender(settings or _settings(), queue, clock, name="sender@test")
        sender._send = _sends(*outcomes)  # type: ignore[method-assign]  # scripted transport
        return sender

    return make


def test_sender_all_sent_is_done(queue: Queue, make_sender: Callable[..., Sender]) -> None:
    job_id = _job(queue, JobState.OUTBOX, last_error="earlier")
    _results(queue, job_id, ("pacs", "sr"), ("pacs", "sc"))
    assert make_sender(SendOutcome.SENT).run_once()
    job = _row(queue, job_id)
    assert (job.state, job.claimed_by, job.last_error, job.send_attempts) == (
        "done",
        None,
        None,
        0,
    )
    assert _result_states(queue, job_id) == ["sent", "sent"]
    assert _reasons(queue, job_id) == [
        ("outbox", "sending", "claim"),
        ("sending", "done", "send.done"),
    ]


def test_sender_optional_object_refused_by_sop_class_is_skipped(
    queue: Queue, make_sender: Callable[..., Sender]
) -> None:
    job_id = _job(queue, JobState.OUTBOX)
    _results(queue, job_id, ("pacs", "sr"), ("pacs", "seg"))
    assert make_sender(SendOutcome.SENT, SendOutcome.SKIPPED).run_once()
    assert _row(queue, job_id).state == "done"
    assert _result_states(queue, job_id) == ["sent", "skipped"]


def test_sender_backoff_then_attempts_exhausted(
    queue: Queue, clock: ManualClock, make_sender: Callable[..., Sender]
) -> None:
    job_id = _job(queue, JobState.OUTBOX)
    _results(queue, job_id, ("pacs", "sr"))
    sender = make_sender(SendOutcome.RETRY)

    assert sender.run_once()
    job = _row(queue, job_id)
    assert (job.state, job.send_attempts, job.claimed_by) == ("outbox", 1, None)
    assert job.not_before == T0 + timedelta(seconds=10)
    assert job.last_error == "pacs: retry 0"

    assert not sender.run_once()  # backoff not over
    expected = [10, 20, 25]  # doubling, capped by retry_max_seconds
    for attempt, delay in enumerate(expected[1:], start=2):
        clock.advance(expected[attempt - 2])
        assert sender.run_once()
        job = _row(queue, job_id)
        assert job.send_attempts == attempt
        assert job.not_before == clock.now() + timedelta(seconds=delay)
    clock.advance(25)
    assert sender.run_once()
    job = _row(queue, job_id)
    assert (job.state, job.send_attempts) == ("failed", 4)
    assert job.finished_at == clock.now()
    assert _reasons(queue, job_id)[-1] == ("sending", "failed", "send.attempts_exhausted")


def test_sender_some_retryable_goes_back_to_the_outbox(
    queue: Queue, make_sender: Callable[..., Sender]
) -> None:
    job_id = _job(queue, JobState.OUTBOX)
    _results(queue, job_id, ("pacs", "sr"), ("pacs", "sc"))
    assert make_sender(SendOutcome.SENT, SendOutcome.RETRY).run_once()
    job = _row(queue, job_id)
    assert (job.state, job.send_attempts, job.last_error) == ("outbox", 1, "pacs: retry 1")
    assert job.not_before == T0 + timedelta(seconds=10)
    assert _result_states(queue, job_id) == ["sent", "pending"]
    assert _reasons(queue, job_id)[-1] == ("sending", "outbox", "retry.send")


def test_sender_refused_fails_the_job(queue: Queue, make_sender: Callable[..., Sender]) -> None:
    job_id = _job(queue, JobState.OUTBOX)
    _results(queue, job_id, ("pacs", "sr"), ("pacs", "sc"))
    assert make_sender(SendOutcome.SENT, SendOutcome.REFUSED).run_once()
    job = _row(queue, job_id)
    assert (job.state, job.last_error, job.send_attempts) == ("failed", "pacs: refused 1", 0)
    assert _result_states(queue, job_id) == ["sent", "failed"]
    assert _reasons(queue, job_id)[-1] == ("sending", "failed", "send.refused")


def test_sender_retry_wins_over_refused(queue: Queue, make_sender: Callable[..., Sender]) -> None:
    job_id = _job(queue, JobState.OUTBOX)
    _results(queue, job_id, ("pacs", "sr"), ("pacs", "sc"))
    assert make_sender(SendOutcome.REFUSED, SendOutcome.RETRY).run_once()
    assert _reasons(queue, job_id)[-1] == ("sending", "outbox", "retry.send")


def test_sender_cut_short_at_shutdown_counts_no_attempt(
    queue: Queue, clock: ManualClock, make_sender: Callable[..., Sender]
) -> None:
    job_id = _job(queue, JobState.OUTBOX, send_attempts=2)
    _results(queue, job_id, ("pacs", "sr"))
    sender = make_sender(SendOutcome.RETRY)
    sender._cancel.cancel()
    assert sender.run_once()
    job = _row(queue, job_id)
    assert (job.state, job.send_attempts, job.not_before) == ("outbox", 2, T0)
    assert _reasons(queue, job_id)[-1] == ("sending", "outbox", "retry.shutdown")


def test_sender_destination_removed_by_a_reload_refuses_its_objects(
    queue: Queue, make_sender: Callable[..., Sender]
) -> None:
    job_id = _job(queue, JobState.OUTBOX)
    _results(queue, job_id, ("pacs", "sr"), ("gone", "sr"))
    assert make_sender(SendOutcome.SENT).run_once()
    job = _row(queue, job_id)
    assert (job.state, job.last_error) == ("failed", "gone: no longer configured")
    assert _result_states(queue, job_id) == ["sent", "failed"]
