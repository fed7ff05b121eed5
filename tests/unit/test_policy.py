"""The job state policy as a table: each row is a stage's outcome and inputs, and the move and
column changes the policy answers with."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dicomai.jobs import policy
from dicomai.jobs.policy import (
    KEEP,
    ReclaimCause,
    RetryPolicy,
    SendOutcome,
    Transition,
    WorkOutcome,
)
from dicomai.jobs.states import ALLOWED_TRANSITIONS, JobState, ResultState
from dicomai.runtime.clock import ManualClock, SystemClock

S = JobState
NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
WORK = RetryPolicy(max_attempts=3, base_seconds=30)
SEND = RetryPolicy(max_attempts=4, base_seconds=10, max_seconds=25)
NOTICE = {"failure_notice": True, "reason": "attempts_exhausted"}


def _check(t: Transition, src: S, dst: S, reason: str, changes: dict[str, Any]) -> None:
    assert (t.src, t.dst, t.reason) == (src, dst, reason)
    assert t.dst in ALLOWED_TRANSITIONS[t.src]
    assert t.changes(NOW) == changes


# -- worker --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("outcome", "attempts", "error_type", "with_notice", "dst", "reason", "changes"),
    [
        pytest.param(
            WorkOutcome.ANALYSED, 1, "", False, S.OUTBOX, "results.written",
            {"not_before": None, "claimed_by": None}, id="analysed",
        ),
        pytest.param(
            WorkOutcome.ANALYSED, 3, "", True, S.OUTBOX, "results.written",
            {"not_before": None, "claimed_by": None}, id="analysed-last-attempt",
        ),
        pytest.param(
            WorkOutcome.STOPPED, 2, "", False, S.QUEUED, "worker.stopping",
            {"attempts": 1, "claimed_by": None}, id="stopped-attempt-not-counted",
        ),
        pytest.param(
            WorkOutcome.STOPPED, 0, "", False, S.QUEUED, "worker.stopping",
            {"attempts": 0, "claimed_by": None}, id="stopped-never-below-zero",
        ),
        pytest.param(
            WorkOutcome.ERROR, 1, "", False, S.QUEUED, "retry.error",
            {"not_before": NOW + timedelta(seconds=30), "last_error": "boom",
             "claimed_by": None}, id="error-first-attempt",
        ),
        pytest.param(
            WorkOutcome.ERROR, 2, "", True, S.QUEUED, "retry.error",
            {"not_before": NOW + timedelta(seconds=60), "last_error": "boom",
             "claimed_by": None}, id="error-second-attempt-backoff-doubles",
        ),
        pytest.param(
            WorkOutcome.ERROR, 3, "", False, S.FAILED, "attempts_exhausted",
            {"last_error": "boom"}, id="error-attempts-exhausted",
        ),
        pytest.param(
            WorkOutcome.ERROR, 4, "", False, S.FAILED, "attempts_exhausted",
            {"last_error": "boom"}, id="error-past-max",
        ),
        pytest.param(
            WorkOutcome.ERROR, 3, "", True, S.OUTBOX, "attempts_exhausted.notice",
            {"last_error": "boom", "not_before": None, "claimed_by": None,
             "findings": NOTICE}, id="error-attempts-exhausted-with-notice",
        ),
        pytest.param(
            WorkOutcome.PERMANENT, 1, "UnsupportedInput", False, S.FAILED,
            "permanent.UnsupportedInput", {"last_error": "boom"}, id="permanent",
        ),
        pytest.param(
            WorkOutcome.PERMANENT, 1, "ModelLoadError", True, S.OUTBOX,
            "permanent.ModelLoadError.notice",
            {"last_error": "boom", "not_before": None, "claimed_by": None,
             "findings": {"failure_notice": True, "reason": "permanent.ModelLoadError"}},
            id="permanent-with-notice",
        ),
    ],
)
def test_after_work(outcome: WorkOutcome, attempts: int, error_type: str, with_notice: bool,
                    dst: S, reason: str, changes: dict[str, Any]) -> None:
    t = policy.after_work(outcome, attempts=attempts, retry=WORK, error="boom",
                          error_type=error_type, with_notice=with_notice)
    _check(t, S.RUNNING, dst, reason, changes)


@pytest.mark.parametrize(
    ("outcome", "attempts", "expected"),
    [
        (WorkOutcome.ANALYSED, 3, None),
        (WorkOutcome.STOPPED, 3, None),
        (WorkOutcome.ERROR, 2, None),
        (WorkOutcome.ERROR, 3, policy.Failure("attempts_exhausted", "boom")),
        (WorkOutcome.PERMANENT, 1, policy.Failure("permanent.Bad", "boom")),
    ],
)
def test_work_failure(outcome: WorkOutcome, attempts: int,
                      expected: policy.Failure | None) -> None:
    assert policy.work_failure(outcome, attempts=attempts, retry=WORK, error="boom",
                               error_type="Bad") == expected


def test_a_failure_message_is_cut_to_500_characters() -> None:
    t = policy.after_work(WorkOutcome.PERMANENT, attempts=1, retry=WORK, error="x" * 900,
                          error_type="Bad")
    assert t.last_error == "x" * 500


# -- sender --------------------------------------------------------------------------------
R, F, D, K = SendOutcome.RETRY, SendOutcome.REFUSED, SendOutcome.SENT, SendOutcome.SKIPPED


@pytest.mark.parametrize(
    ("outcomes", "send_attempts", "shutting_down", "notice", "dst", "reason", "changes"),
    [
        pytest.param([D, D], 0, False, False, S.DONE, "send.done",
                     {"claimed_by": None, "last_error": None}, id="all-sent"),
        pytest.param([D, K], 2, False, False, S.DONE, "send.done",
                     {"claimed_by": None, "last_error": None}, id="sent-and-optional-skipped"),
        pytest.param([], 0, False, False, S.DONE, "send.done",
                     {"claimed_by": None, "last_error": None}, id="nothing-pending"),
        pytest.param([D, D], 0, True, False, S.DONE, "send.done",
                     {"claimed_by": None, "last_error": None}, id="all-sent-while-stopping"),
        pytest.param([D], 0, False, True, S.FAILED, "failed.notice_sent",
                     {"claimed_by": None}, id="failure-notice-delivered"),
        pytest.param([D, R], 0, False, False, S.OUTBOX, "retry.send",
                     {"send_attempts": 1, "not_before": NOW + timedelta(seconds=10),
                      "last_error": "err", "claimed_by": None}, id="some-retryable"),
        pytest.param([R], 1, False, False, S.OUTBOX, "retry.send",
                     {"send_attempts": 2, "not_before": NOW + timedelta(seconds=20),
                      "last_error": "err", "claimed_by": None}, id="retry-backoff-doubles"),
        pytest.param([R], 2, False, False, S.OUTBOX, "retry.send",
                     {"send_attempts": 3, "not_before": NOW + timedelta(seconds=25),
                      "last_error": "err", "claimed_by": None}, id="retry-backoff-capped"),
        pytest.param([R, F], 3, False, True, S.FAILED, "send.attempts_exhausted",
                     {"send_attempts": 4, "last_error": "err"}, id="attempts-exhausted"),
        pytest.param([R], 0, True, False, S.OUTBOX, "retry.shutdown",
                     {"not_before": NOW, "last_error": "err", "claimed_by": None},
                     id="cut-short-by-shutdown-no-attempt"),
        pytest.param([R], 3, True, False, S.OUTBOX, "retry.shutdown",
                     {"not_before": NOW, "last_error": "err", "claimed_by": None},
                     id="shutdown-before-last-attempt"),
        pytest.param([D, F], 0, False, False, S.FAILED, "send.refused",
                     {"last_error": "err"}, id="some-refused"),
        pytest.param([F, K], 0, False, True, S.FAILED, "send.refused",
                     {"last_error": "err"}, id="refused-notice"),
    ],
)
def test_after_send(outcomes: list[SendOutcome], send_attempts: int, shutting_down: bool,
                    notice: bool, dst: S, reason: str, changes: dict[str, Any]) -> None:
    t = policy.after_send(outcomes, send_attempts=send_attempts, retry=SEND,
                          shutting_down=shutting_down, failure_notice=notice, error="err")
    _check(t, S.SENDING, dst, reason, changes)


@pytest.mark.parametrize(
    ("outcome", "state"),
    [(D, ResultState.SENT), (R, ResultState.PENDING), (F, ResultState.FAILED),
     (K, ResultState.SKIPPED)],
)
def test_result_state_per_send_outcome(outcome: SendOutcome, state: ResultState) -> None:
    assert policy.result_state(outcome) is state


@pytest.mark.parametrize(
    ("state", "resend"),
    [(ResultState.PENDING, True), (ResultState.FAILED, True), (ResultState.SENT, False),
     (ResultState.SKIPPED, False), ("failed", True), ("sent", False)],
)
def test_needs_resend(state: ResultState | str, resend: bool) -> None:
    assert policy.needs_resend(state) is resend


# -- scheduler -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("matched", "unchanged", "dst", "reason"),
    [
        (True, False, S.QUEUED, "route.matched"),
        (True, True, S.SKIPPED, "route.inputs_unchanged"),
        (False, False, S.SKIPPED, "route.none"),
        (False, True, S.SKIPPED, "route.none"),
    ],
)
def test_close(matched: bool, unchanged: bool, dst: S, reason: str) -> None:
    t = policy.close(route_matched=matched, inputs_unchanged=unchanged)
    _check(t, S.RECEIVING, dst, reason, {"closed_at": NOW})


@pytest.mark.parametrize(
    ("src", "cause", "dst"),
    [
        (S.RUNNING, ReclaimCause.STALE_HEARTBEAT, S.QUEUED),
        (S.SENDING, ReclaimCause.STALE_HEARTBEAT, S.OUTBOX),
        (S.RUNNING, ReclaimCause.DEAD_PROCESS, S.QUEUED),
        (S.SENDING, ReclaimCause.DEAD_PROCESS, S.OUTBOX),
    ],
)
def test_reclaim(src: S, cause: ReclaimCause, dst: S) -> None:
    _check(policy.reclaim(src, cause), src, dst, cause.value, {"claimed_by": None})


def test_reclaim_reasons() -> None:
    assert ReclaimCause.STALE_HEARTBEAT.value == "reap.stale_heartbeat"
    assert ReclaimCause.DEAD_PROCESS.value == "reap.dead_process"


@pytest.mark.parametrize(
    ("src", "dst", "attempts", "changes"),
    [
        (S.QUEUED, S.RUNNING, 0, {"attempts": 1}),
        (S.QUEUED, S.RUNNING, 2, {"attempts": 3}),
        (S.OUTBOX, S.SENDING, 2, {}),
    ],
)
def test_claim(src: S, dst: S, attempts: int, changes: dict[str, Any]) -> None:
    _check(policy.claim(src, dst, attempts=attempts), src, dst, "claim", changes)


@pytest.mark.parametrize(
    ("src", "dst"),
    [(S.QUEUED, S.SENDING), (S.OUTBOX, S.RUNNING), (S.FAILED, S.RUNNING),
     (S.RECEIVING, S.RUNNING)],
)
def test_claim_only_from_the_claimable_state(src: S, dst: S) -> None:
    with pytest.raises(ValueError):
        policy.claim(src, dst, attempts=0)


# -- operator actions ------------------------------------------------------------------------
RESET = {"not_before": None, "claimed_by": None, "finished_at": None, "last_error": None,
         "send_attempts": 0}
REANALYSE = {**RESET, "attempts": 0, "findings": None}


@pytest.mark.parametrize(
    ("states", "notice", "dst", "changes"),
    [
        pytest.param(["sent", "failed"], False, S.OUTBOX, RESET, id="some-unsent"),
        pytest.param(["pending"], False, S.OUTBOX, RESET, id="pending"),
        pytest.param(["sent", "skipped"], False, S.QUEUED, REANALYSE, id="all-accepted"),
        pytest.param([], False, S.QUEUED, REANALYSE, id="no-results"),
        pytest.param(["failed"], True, S.QUEUED, REANALYSE, id="failure-notice"),
    ],
)
def test_operator_retry(states: list[str], notice: bool, dst: S,
                        changes: dict[str, Any]) -> None:
    t = policy.operator_retry(states, failure_notice=notice)
    _check(t, S.FAILED, dst, "operator.retry", changes)


@pytest.mark.parametrize("src", list(JobState))
def test_cancel(src: S) -> None:
    t = policy.cancel(src)
    if src in (S.QUEUED, S.OUTBOX, S.FAILED):
        assert t is not None
        _check(t, src, S.CANCELLED, "operator.cancel", {})
    else:
        assert t is None


# -- the transition itself -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("src", "dst"), [(a, b) for a in JobState for b in JobState if b not in ALLOWED_TRANSITIONS[a]]
)
def test_a_move_outside_the_table_cannot_be_built(src: S, dst: S) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        Transition(src, dst, "x")


def test_fields_left_alone_are_not_written() -> None:
    t = Transition(S.OUTBOX, S.CANCELLED, "x")
    assert t.attempts is KEEP and t.changes(NOW) == {}
    assert t.finishes and not Transition(S.RUNNING, S.QUEUED, "x").finishes


def test_failure_notice_flag_round_trip() -> None:
    assert policy.is_failure_notice(policy.failure_notice_findings("attempts_exhausted"))
    assert not policy.is_failure_notice(None)
    assert not policy.is_failure_notice({"positive": ["x"]})
    assert not policy.is_failure_notice({"failure_notice": False})


def test_retry_policy_doubles_and_caps() -> None:
    retry = RetryPolicy(max_attempts=10, base_seconds=15, max_seconds=100)
    assert [retry.delay(a).total_seconds() for a in range(1, 7)] == [15, 30, 60, 100, 100, 100]
    with pytest.raises(ValueError):
        retry.delay(0)
    assert RetryPolicy(3, 10).delay(3) == timedelta(seconds=40)
    assert RetryPolicy(3, 10).delay(20) == timedelta(hours=1)


# -- clocks ----------------------------------------------------------------------------------
def test_manual_clock_moves_only_when_told() -> None:
    clock = ManualClock(NOW)
    assert clock.now() == NOW and clock.monotonic() == 0.0
    assert clock.advance(90) == NOW + timedelta(seconds=90)
    clock.advance(timedelta(minutes=1))
    assert clock.now() == NOW + timedelta(seconds=150) and clock.monotonic() == 150.0
    clock.set(NOW + timedelta(hours=1))
    assert clock.now() == NOW + timedelta(hours=1)
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        ManualClock(datetime(2024, 1, 1))  # naive


def test_system_clock_is_aware_utc() -> None:
    clock = SystemClock()
    assert clock.now().tzinfo is UTC
    a = clock.monotonic()
    assert clock.monotonic() >= a


def test_retry_reasons_are_the_reasons_of_backoff_retries() -> None:
    work = policy.after_work(WorkOutcome.ERROR, attempts=1, retry=WORK, error="e")
    send = policy.after_send([R], send_attempts=0, retry=SEND, error="e")
    assert (work.reason, send.reason) == policy.RETRY_REASONS
