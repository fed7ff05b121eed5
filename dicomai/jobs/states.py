"""Job and result-object states, and the transitions the job state machine allows.

Pure data: which move is taken when is decided in :mod:`dicomai.jobs.policy`; the database
compare-and-set that makes a move is in :mod:`dicomai.jobs.queue`.
"""

from __future__ import annotations

import enum

__all__ = [
    "ACTIVE_STATES",
    "ALLOWED_TRANSITIONS",
    "TERMINAL_STATES",
    "JobState",
    "ResultState",
]


class JobState(enum.StrEnum):
    """Where a study generation is in the pipeline."""

    RECEIVING = "receiving"  # instances still arriving
    QUEUED = "queued"  # quiet period over, route and series chosen; waiting for a worker
    RUNNING = "running"  # claimed by a worker (claimed_by, heartbeat_at set)
    OUTBOX = "outbox"  # result files written; waiting for the sender
    SENDING = "sending"  # claimed by a sender
    DONE = "done"  # terminal: every result object accepted
    SKIPPED = "skipped"  # terminal: no route matched (not an error)
    FAILED = "failed"  # terminal: permanent error, or attempts used up
    CANCELLED = "cancelled"  # terminal: operator action


class ResultState(enum.StrEnum):
    """Where one result object is in its delivery to one destination."""

    PENDING = "pending"  # waiting to be sent (again)
    SENT = "sent"  # accepted by the destination
    FAILED = "failed"  # refused for good, or its destination was removed
    SKIPPED = "skipped"  # optional object (SEG) whose SOP class the destination does not accept


S = JobState
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.RECEIVING: frozenset({S.QUEUED, S.SKIPPED}),
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED}),
    S.RUNNING: frozenset({S.OUTBOX, S.QUEUED, S.FAILED}),
    S.OUTBOX: frozenset({S.SENDING, S.CANCELLED}),
    S.SENDING: frozenset({S.DONE, S.OUTBOX, S.FAILED}),
    S.DONE: frozenset(),
    S.SKIPPED: frozenset(),
    S.FAILED: frozenset({S.QUEUED, S.OUTBOX, S.CANCELLED}),
    S.CANCELLED: frozenset(),
}
TERMINAL_STATES = frozenset({S.DONE, S.SKIPPED, S.FAILED, S.CANCELLED})
#: States in which a job is still travelling through the pipeline (the queue), in pipeline order.
ACTIVE_STATES = (S.RECEIVING, S.QUEUED, S.RUNNING, S.OUTBOX, S.SENDING)
