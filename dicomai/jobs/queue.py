"""The job repository: every write of a job's state (transitions, claims, heartbeats, result
rows, operator retry and cancel) and of component heartbeats.

Reads are in :mod:`dicomai.jobs.reads`; received instances are indexed by
:class:`dicomai.ingest.index.InstanceIndex`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import event as sa_event
from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from dicomai.db import (
    ComponentHeartbeat,
    Job,
    JobEvent,
    ResultObject,
    utcnow,
)
from dicomai.errors import StateConflict
from dicomai.jobs import policy, reads
from dicomai.jobs.policy import Transition
from dicomai.jobs.states import ALLOWED_TRANSITIONS, TERMINAL_STATES, JobState, ResultState
from dicomai.logs import log_fields

__all__ = ["Queue"]

logger = logging.getLogger(__name__)
S = JobState


class Queue:
    """All writes of job state: the only place a job's state changes."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.sessions = session_factory
        #: In-process wake-ups: events set after a job entered a state (see :meth:`subscribe`).
        self._subscribers: dict[JobState, list[threading.Event]] = {}

    def subscribe(self, state: JobState | str, wake: threading.Event) -> None:
        """Set ``wake`` whenever a job of this process enters ``state`` (after the commit).

        The worker and sender wait on it instead of sleeping their whole poll interval, so a
        job closed by this process's scheduler is claimed at once; other hosts still poll.
        """
        self._subscribers.setdefault(JobState(state), []).append(wake)

    def _notify(self, state: JobState) -> None:
        for wake in self._subscribers.get(state, ()):
            wake.set()

    def session(self) -> Session:
        """A new session (use as a context manager)."""
        return self.sessions()

    # -- transitions -------------------------------------------------------------------
    def transition(
        self,
        job_id: int,
        src: JobState | str,
        dst: JobState | str,
        *,
        reason: str,
        now: datetime | None = None,
        session: Session | None = None,
        guard: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Compare-and-set a job from ``src`` to ``dst``, recording a job event.

        ``guard`` adds column values that must still hold (e.g. the ``last_instance_at`` the
        caller routed on, so an instance that arrived meanwhile makes the close fail).

        Raises
        ------
        ValueError
            The transition is not in :data:`ALLOWED_TRANSITIONS`.
        StateConflict
            The job was not in ``src`` (somebody else moved it).
        """
        src, dst = JobState(src), JobState(dst)
        if dst not in ALLOWED_TRANSITIONS[src]:
            raise ValueError(f"transition {src} -> {dst} is not allowed")
        now = now or utcnow()
        values: dict[str, Any] = {"state": dst.value, "updated_at": now, **fields}
        if dst in TERMINAL_STATES and "finished_at" not in values:
            values["finished_at"] = now
        if session is None:
            with self.sessions.begin() as s:
                self._cas(s, job_id, src, dst, values, reason, now, guard)
            self._notify(dst)
        else:
            self._cas(session, job_id, src, dst, values, reason, now, guard)
            if dst in self._subscribers:
                sa_event.listen(session, "after_commit", lambda _s: self._notify(dst), once=True)
        logger.info(
            "job state changed",
            extra=log_fields(
                "job.transition", job_id=job_id, src=src.value, dst=dst.value, reason=reason
            ),
        )

    def apply(
        self,
        job_id: int,
        t: Transition,
        *,
        now: datetime,
        session: Session | None = None,
        guard: dict[str, Any] | None = None,
        **data: Any,
    ) -> None:
        """Make a move the policy decided (:mod:`dicomai.jobs.policy`): :meth:`transition`
        with its reason and column changes, plus ``data`` the caller adds (findings, the
        chosen route).

        Raises
        ------
        StateConflict
            The job was not in ``t.src`` (somebody else moved it).
        """
        self.transition(
            job_id,
            t.src,
            t.dst,
            reason=t.reason,
            now=now,
            session=session,
            guard=guard,
            **t.changes(now),
            **data,
        )

    @staticmethod
    def _cas(
        s: Session,
        job_id: int,
        src: JobState,
        dst: JobState,
        values: dict[str, Any],
        reason: str,
        now: datetime,
        guard: dict[str, Any] | None = None,
    ) -> None:
        query = update(Job).where(Job.id == job_id, Job.state == src.value)
        for column, expected in (guard or {}).items():
            query = query.where(getattr(Job, column) == expected)
        # an UPDATE returns a CursorResult, the Result subclass that has rowcount
        result = cast("CursorResult[Any]", s.execute(query.values(**values)))
        if result.rowcount != 1:
            raise StateConflict(f"job {job_id} is not {src.value}")
        s.add(JobEvent(job_id=job_id, src=src.value, dst=dst.value, at=now, reason=reason))

    def claim_next(
        self,
        src: JobState,
        dst: JobState,
        claimer: str,
        now: datetime,
        *,
        models: Sequence[str] | None = None,
    ) -> Job | None:
        """Claim the most urgent due job in ``src`` and move it to ``dst``.

        ``FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite the compare-and-set guard alone
        keeps two claimers off the same job.

        Raises
        ------
        ValueError
            ``src`` → ``dst`` is not a claim (:func:`dicomai.jobs.policy.claim`).
        """
        policy.claim(src, dst, attempts=0)  # a pair that is not a claim fails before any query
        for _ in range(5):
            with self.sessions.begin() as s:
                query = (
                    select(Job)
                    .where(Job.state == src.value)
                    .where((Job.not_before.is_(None)) | (Job.not_before <= now))
                    .order_by(Job.priority.desc(), Job.closed_at, Job.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if models is not None:
                    query = query.where(Job.model.in_(list(models)))
                job = s.scalar(query)
                if job is None:
                    return None
                t = policy.claim(src, dst, attempts=job.attempts)
                fields = {"claimed_by": claimer, "heartbeat_at": now, **t.changes(now)}
                try:
                    # updated_at as the row's version: on SQLite the SELECT above runs outside
                    # the write transaction, so another claimer may have claimed, sent and put
                    # the job back (with a later not_before) in between; a state-only guard
                    # would then claim it before its backoff is over.
                    self._cas(
                        s,
                        job.id,
                        t.src,
                        t.dst,
                        {"state": t.dst.value, "updated_at": now, **fields},
                        t.reason,
                        now,
                        guard={"updated_at": job.updated_at},
                    )
                except StateConflict:
                    continue
                s.flush()
                s.refresh(job)
            logger.info(
                "job claimed",
                extra=log_fields("job.claimed", job_id=job.id, state=dst.value, claimer=claimer),
            )
            return job
        return None

    def heartbeat_job(self, job_id: int, claimer: str, now: datetime) -> None:
        """Touch a claimed job's heartbeat."""
        with self.sessions.begin() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.claimed_by == claimer)
                .values(heartbeat_at=now)
            )

    def add_results(self, job_id: int, rows: Sequence[ResultObject], *, session: Session) -> None:
        """Replace a job's result rows (a rerun after a crash rebuilds the same UIDs)."""
        for old in session.scalars(select(ResultObject).where(ResultObject.job_id == job_id)):
            session.delete(old)
        session.flush()
        session.add_all(rows)

    def mark_result(
        self,
        result_id: int,
        *,
        state: ResultState,
        status_code: int | None,
        error: str | None,
        now: datetime,
    ) -> None:
        """Record one object's delivery outcome."""
        with self.sessions.begin() as s:
            row = s.get(ResultObject, result_id)
            if row is None:
                return
            row.state = state
            row.status_code = status_code
            row.attempts += 1
            row.last_error = error
            if state == ResultState.SENT:
                row.sent_at = now

    # -- operator actions --------------------------------------------------------------
    def retry(self, job_id: int, now: datetime) -> JobState:
        """FAILED → OUTBOX (results exist and were not all refused) or QUEUED; resets counters.

        Raises
        ------
        StateConflict
            The job is not FAILED.
        """
        with self.sessions.begin() as s:
            job = s.get(Job, job_id)
            if job is None or job.state != S.FAILED.value:
                raise StateConflict(f"job {job_id} is not failed")
            results = list(s.scalars(select(ResultObject).where(ResultObject.job_id == job_id)))
            t = policy.operator_retry(
                [r.state for r in results], failure_notice=policy.is_failure_notice(job.findings)
            )
            for r in results:
                if policy.needs_resend(r.state):
                    r.state, r.last_error = ResultState.PENDING, None
            self.apply(job_id, t, now=now, session=s)
            return t.dst

    def cancel(self, job_id: int, now: datetime) -> None:
        """QUEUED, OUTBOX or FAILED → CANCELLED (raises StateConflict otherwise)."""
        src = JobState(reads.get_job(self.sessions, job_id).state)
        t = policy.cancel(src)
        if t is None:
            raise StateConflict(f"job {job_id} is {src.value} and cannot be cancelled")
        self.apply(job_id, t, now=now)

    # -- components --------------------------------------------------------------------
    def beat(self, component: str, role: str, now: datetime, info: dict[str, Any]) -> None:
        """Record that a component is alive."""
        with self.sessions.begin() as s:
            row = s.get(ComponentHeartbeat, component)
            if row is None:
                s.add(
                    ComponentHeartbeat(
                        component=component, role=role, started_at=now, beat_at=now, info=info
                    )
                )
            else:
                row.beat_at = now
                row.info = info
                row.role = role

    def forget_component(self, component: str) -> None:
        """Remove a component's heartbeat row (clean shutdown)."""
        with self.sessions.begin() as s:
            row = s.get(ComponentHeartbeat, component)
            if row is not None:
                s.delete(row)
