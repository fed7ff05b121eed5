"""Which state a job moves to next, and with which counters and backoff: every decision of the
job state machine, as pure functions.

The worker, the sender, the scheduler and the operator commands describe what happened (a
stage's outcome, the job's attempt counts, whether the job carries a failure notice) and get
back a :class:`Transition`; :meth:`dicomai.jobs.queue.Queue.apply` makes it in the database.
Nothing here reads the database, the clock or the configuration, so the whole policy is tested
as a table (``tests/unit/test_policy.py``). A :class:`Transition` outside
:data:`~dicomai.jobs.states.ALLOWED_TRANSITIONS` cannot be built.

The reason strings are part of the interface: they are the ``job_events.reason`` values, the
``job.transition`` log events' ``reason`` and what ``dicomai status`` shows.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from dicomai.jobs.states import ALLOWED_TRANSITIONS, TERMINAL_STATES, JobState, ResultState

__all__ = [
    "CLAIMED_STATES",
    "KEEP",
    "RETRY_REASONS",
    "Failure",
    "ReclaimCause",
    "RetryPolicy",
    "SendOutcome",
    "Transition",
    "WorkOutcome",
    "after_send",
    "after_work",
    "cancel",
    "claim",
    "close",
    "failure_notice_findings",
    "is_failure_notice",
    "needs_resend",
    "operator_retry",
    "reclaim",
    "result_state",
    "work_failure",
]

S = JobState


class _Keep(enum.Enum):
    KEEP = "keep"


#: A :class:`Transition` field left as it is in the database.
KEEP: Final = _Keep.KEEP
Keep = Literal[_Keep.KEEP]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: ``base * 2**(attempt-1)`` seconds, capped, for ``max_attempts``."""

    max_attempts: int
    base_seconds: float
    max_seconds: float = 3600.0

    def delay(self, attempt: int) -> timedelta:
        """Wait before the attempt after ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError('Argument "attempt" must be positive.')
        return timedelta(seconds=min(self.max_seconds, self.base_seconds * 2 ** (attempt - 1)))


@dataclass(frozen=True, slots=True)
class Transition:
    """One move of the job state machine and the job columns it changes.

    Fields left at :data:`KEEP` are not written. ``retry_in`` sets ``not_before`` to the
    moment of the move plus that delay (``None`` clears it); ``release_claim`` clears
    ``claimed_by``; ``reopen`` clears ``finished_at``; ``closes`` sets ``closed_at`` (the
    study stopped receiving). A move into a terminal state sets ``finished_at`` (in
    :meth:`dicomai.jobs.queue.Queue.transition`).

    Raises
    ------
    ValueError
        ``src`` → ``dst`` is not in :data:`~dicomai.jobs.states.ALLOWED_TRANSITIONS`.
    """

    src: JobState
    dst: JobState
    reason: str
    attempts: int | Keep = KEEP
    send_attempts: int | Keep = KEEP
    retry_in: timedelta | Keep | None = KEEP
    last_error: str | Keep | None = KEEP
    findings: Mapping[str, Any] | Keep | None = KEEP
    release_claim: bool = False
    reopen: bool = False
    closes: bool = False

    def __post_init__(self) -> None:
        if self.dst not in ALLOWED_TRANSITIONS[self.src]:
            raise ValueError(f"transition {self.src} -> {self.dst} is not allowed")

    @property
    def finishes(self) -> bool:
        """Whether the job ends here (``finished_at`` is set)."""
        return self.dst in TERMINAL_STATES

    def changes(self, now: datetime) -> dict[str, Any]:
        """The job columns this move writes besides ``state`` and ``updated_at``."""
        out: dict[str, Any] = {}
        if self.attempts is not KEEP:
            out["attempts"] = self.attempts
        if self.send_attempts is not KEEP:
            out["send_attempts"] = self.send_attempts
        if self.retry_in is not KEEP:
            out["not_before"] = None if self.retry_in is None else now + self.retry_in
        if self.last_error is not KEEP:
            out["last_error"] = self.last_error
        if self.findings is not KEEP:
            out["findings"] = None if self.findings is None else dict(self.findings)
        if self.release_claim:
            out["claimed_by"] = None
        if self.reopen:
            out["finished_at"] = None
        if self.closes:
            out["closed_at"] = now
        return out


#: Reasons of the moves that put a failed attempt back for another after its backoff (the
#: worker's and the sender's); ``dicomai status`` lists them beside the failures.
RETRY_REASONS: Final = ("retry.error", "retry.send")


# -- failure notices ---------------------------------------------------------------------------
_NOTICE_KEY = "failure_notice"


def failure_notice_findings(code: str) -> dict[str, Any]:
    """The findings of a job whose analysis failed for good and which carries a failure
    notice instead of results (stored as the job's findings JSON)."""
    return {_NOTICE_KEY: True, "reason": code}


def is_failure_notice(findings: Mapping[str, Any] | None) -> bool:
    """Whether a job's findings say its results are a failure notice: delivered, the job
    still ends FAILED; retried by an operator, it is analysed again rather than resent."""
    return bool((findings or {}).get(_NOTICE_KEY))


# -- worker: RUNNING → OUTBOX, QUEUED or FAILED --------------------------------------------
class WorkOutcome(enum.StrEnum):
    """How one run of a job's analysis ended."""

    ANALYSED = "analysed"  # result objects written
    STOPPED = "stopped"  # the worker is shutting down (Interrupted)
    ERROR = "error"  # may succeed later
    PERMANENT = "permanent"  # retrying cannot help


@dataclass(frozen=True, slots=True)
class Failure:
    """A job that fails for good: its reason code (``permanent.<Error>`` or
    ``attempts_exhausted``) and the error text kept as ``last_error``."""

    code: str
    message: str


def work_failure(
    outcome: WorkOutcome, *, attempts: int, retry: RetryPolicy, error: str, error_type: str = ""
) -> Failure | None:
    """Whether a run that ended with ``outcome`` fails the job for good, and why.

    ``attempts`` counts the run that just ended (the claim counted it); ``error_type`` is the
    class name of a permanent error.
    """
    if outcome is WorkOutcome.PERMANENT:
        return Failure(f"permanent.{error_type}", error)
    if outcome is WorkOutcome.ERROR and attempts >= retry.max_attempts:
        return Failure("attempts_exhausted", error)
    return None


def after_work(
    outcome: WorkOutcome,
    *,
    attempts: int,
    retry: RetryPolicy,
    error: str = "",
    error_type: str = "",
    with_notice: bool = False,
) -> Transition:
    """The next state of a RUNNING job after a run of its analysis.

    * analysed: OUTBOX;
    * stopped: back to QUEUED, the attempt not counted;
    * a transient error with attempts left: QUEUED after the backoff of this attempt;
    * a permanent error, or the last attempt's error: FAILED, or OUTBOX when a failure notice
      was written for a destination that wants one (``with_notice``).
    """
    if outcome is WorkOutcome.ANALYSED:
        return Transition(S.RUNNING, S.OUTBOX, "results.written", retry_in=None, release_claim=True)
    if outcome is WorkOutcome.STOPPED:
        return Transition(
            S.RUNNING,
            S.QUEUED,
            "worker.stopping",
            attempts=max(0, attempts - 1),
            release_claim=True,
        )
    failure = work_failure(
        outcome, attempts=attempts, retry=retry, error=error, error_type=error_type
    )
    if failure is None:
        return Transition(
            S.RUNNING,
            S.QUEUED,
            "retry.error",
            retry_in=retry.delay(attempts),
            last_error=error,
            release_claim=True,
        )
    if with_notice:
        return Transition(
            S.RUNNING,
            S.OUTBOX,
            f"{failure.code}.notice",
            last_error=failure.message[:500],
            release_claim=True,
            retry_in=None,
            findings=failure_notice_findings(failure.code),
        )
    return Transition(S.RUNNING, S.FAILED, failure.code, last_error=failure.message[:500])


# -- sender: SENDING → DONE, OUTBOX or FAILED ----------------------------------------------
class SendOutcome(enum.StrEnum):
    """What happened to one result object sent to one destination."""

    SENT = "sent"
    RETRY = "retry"
    REFUSED = "refused"
    SKIPPED = "skipped"  # an optional object whose SOP class the destination does not accept


_RESULT_STATE: Final[Mapping[SendOutcome, ResultState]] = {
    SendOutcome.SENT: ResultState.SENT,
    SendOutcome.RETRY: ResultState.PENDING,
    SendOutcome.REFUSED: ResultState.FAILED,
    SendOutcome.SKIPPED: ResultState.SKIPPED,
}


def result_state(outcome: SendOutcome) -> ResultState:
    """The state a result object takes after a send with this outcome."""
    return _RESULT_STATE[outcome]


def needs_resend(state: ResultState | str) -> bool:
    """Whether an operator's retry sends this result object again (it was not accepted, nor
    skipped as optional)."""
    return state not in (ResultState.SENT, ResultState.SKIPPED)


def after_send(
    outcomes: Iterable[SendOutcome],
    *,
    send_attempts: int,
    retry: RetryPolicy,
    shutting_down: bool = False,
    failure_notice: bool = False,
    error: str | None = None,
) -> Transition:
    """The next state of a SENDING job once each of its pending objects has an outcome.

    In order: an object to retry while this process shuts down: back to OUTBOX at once, no
    attempt counted; an object to retry: OUTBOX after the backoff, or FAILED when that was
    the last send attempt; an object refused: FAILED; a delivered failure notice: FAILED
    (the analysis failed); otherwise DONE. ``send_attempts`` counts the earlier sends;
    ``error`` is the joined error text (``last_error``).
    """
    seen = set(outcomes)
    if SendOutcome.RETRY in seen:
        if shutting_down:
            return Transition(
                S.SENDING,
                S.OUTBOX,
                "retry.shutdown",
                retry_in=timedelta(0),
                last_error=error,
                release_claim=True,
            )
        attempts = send_attempts + 1
        if attempts >= retry.max_attempts:
            return Transition(
                S.SENDING,
                S.FAILED,
                "send.attempts_exhausted",
                send_attempts=attempts,
                last_error=error,
            )
        return Transition(
            S.SENDING,
            S.OUTBOX,
            "retry.send",
            send_attempts=attempts,
            retry_in=retry.delay(attempts),
            last_error=error,
            release_claim=True,
        )
    if SendOutcome.REFUSED in seen:
        return Transition(S.SENDING, S.FAILED, "send.refused", last_error=error)
    if failure_notice:
        return Transition(S.SENDING, S.FAILED, "failed.notice_sent", release_claim=True)
    return Transition(S.SENDING, S.DONE, "send.done", release_claim=True, last_error=None)


# -- scheduler: RECEIVING → QUEUED or SKIPPED; claims back -----------------------------------
def close(*, route_matched: bool, inputs_unchanged: bool = False) -> Transition:
    """Closing a RECEIVING job (quiet, or early): QUEUED when a route matched, SKIPPED when
    none did or when a later generation would analyse exactly what an earlier one did."""
    if not route_matched:
        return Transition(S.RECEIVING, S.SKIPPED, "route.none", closes=True)
    if inputs_unchanged:
        return Transition(S.RECEIVING, S.SKIPPED, "route.inputs_unchanged", closes=True)
    return Transition(S.RECEIVING, S.QUEUED, "route.matched", closes=True)


#: The claimed states, and where a job goes back when its claim is given up or taken back.
CLAIMED_STATES: Final[Mapping[JobState, JobState]] = {S.RUNNING: S.QUEUED, S.SENDING: S.OUTBOX}


class ReclaimCause(enum.StrEnum):
    """Why a claim is taken back (the transition's reason)."""

    STALE_HEARTBEAT = "reap.stale_heartbeat"  # its claimer stopped beating
    DEAD_PROCESS = "reap.dead_process"  # its claimer was a process of this host that is gone


def reclaim(src: JobState, cause: ReclaimCause) -> Transition:
    """A RUNNING or SENDING job whose claimer is gone goes back to QUEUED or OUTBOX (its
    attempt stays counted)."""
    return Transition(src, CLAIMED_STATES[src], cause.value, release_claim=True)


def claim(src: JobState, dst: JobState, *, attempts: int) -> Transition:
    """A worker (QUEUED → RUNNING, one more attempt) or a sender (OUTBOX → SENDING) claims a
    job; the caller adds ``claimed_by`` and ``heartbeat_at``."""
    if CLAIMED_STATES.get(dst) is not src:
        raise ValueError(f"{src} -> {dst} is not a claim")
    if dst is S.RUNNING:
        return Transition(src, dst, "claim", attempts=attempts + 1)
    return Transition(src, dst, "claim")


# -- operator actions ------------------------------------------------------------------------
def operator_retry(
    result_states: Iterable[ResultState | str], *, failure_notice: bool
) -> Transition:
    """``dicomai retry`` of a FAILED job: OUTBOX when it has results and some were not
    accepted (they are sent again), else QUEUED (analysed again, attempts reset); the backoff,
    the claim, the error and the send attempts are reset either way. A failure notice is
    never resent: its job is analysed again."""
    states = list(result_states)
    unsent = [s for s in states if needs_resend(s)]
    common: dict[str, Any] = {
        "retry_in": None,
        "release_claim": True,
        "reopen": True,
        "last_error": None,
        "send_attempts": 0,
    }
    if states and unsent and not failure_notice:
        return Transition(S.FAILED, S.OUTBOX, "operator.retry", **common)
    return Transition(S.FAILED, S.QUEUED, "operator.retry", attempts=0, findings=None, **common)


def cancel(src: JobState) -> Transition | None:
    """``dicomai cancel``: QUEUED, OUTBOX or FAILED → CANCELLED; ``None`` from any other state."""
    if S.CANCELLED not in ALLOWED_TRANSITIONS[src]:
        return None
    return Transition(src, S.CANCELLED, "operator.cancel")
