"""The job state machine in the database: states, allowed transitions, claims and enqueueing."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomai.db import (
    ComponentHeartbeat,
    Instance,
    Job,
    JobEvent,
    ResultObject,
    Study,
    utcnow,
)
from dicomai.errors import StateConflict
from dicomai.jobs.states import ALLOWED_TRANSITIONS, TERMINAL_STATES, JobState, ResultState
from dicomai.logs import log_fields

__all__ = ["Queue", "RetryPolicy"]

logger = logging.getLogger(__name__)
S = JobState


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


class Queue:
    """All writes of job state: the only place a job's state changes. (Received instances
    are indexed by :class:`dicomai.ingest.index.InstanceIndex`.)"""

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
        result = s.execute(query.values(**values))
        if result.rowcount != 1:  # type: ignore[attr-defined]
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
        """
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
                fields: dict[str, Any] = {"claimed_by": claimer, "heartbeat_at": now}
                if dst is S.RUNNING:
                    fields["attempts"] = job.attempts + 1
                try:
                    # updated_at as the row's version: on SQLite the SELECT above runs outside
                    # the write transaction, so another claimer may have claimed, sent and put
                    # the job back (with a later not_before) in between; a state-only guard
                    # would then claim it before its backoff is over.
                    self._cas(
                        s,
                        job.id,
                        src,
                        dst,
                        {"state": dst.value, "updated_at": now, **fields},
                        "claim",
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

    # -- reads -------------------------------------------------------------------------
    def get_job(self, job_id: int) -> Job:
        """The job row (detached)."""
        with self.sessions() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            return job

    def study_uid(self, job: Job) -> str:
        """StudyInstanceUID of a job's study."""
        with self.sessions() as s:
            return s.scalar(select(Study.study_instance_uid).where(Study.id == job.study_id)) or ""

    def study_instances(self, study_id: int, up_to_generation: int | None = None) -> list[Instance]:
        """All instances of a study, optionally only those of generations up to the given one."""
        with self.sessions() as s:
            q = select(Instance).where(Instance.study_id == study_id)
            if up_to_generation is not None:
                q = q.join(Job, Job.id == Instance.job_id).where(Job.generation <= up_to_generation)
            return list(s.scalars(q.order_by(Instance.id)))

    def jobs_of_study(self, study_id: int) -> list[Job]:
        """Every job (generation) of a study, oldest first."""
        with self.sessions() as s:
            return list(
                s.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.generation))
            )

    def receiving_jobs_quiet_since(self, cutoff: datetime) -> list[Job]:
        """RECEIVING jobs whose last instance arrived before ``cutoff``."""
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(Job)
                    .where(Job.state == S.RECEIVING.value, Job.last_instance_at < cutoff)
                    .order_by(Job.id)
                )
            )

    def receiving_jobs_released_since(self, cutoff: datetime) -> list[Job]:
        """RECEIVING jobs whose sender released its association at or before ``cutoff`` and
        sent nothing after that release."""
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(Job)
                    .where(
                        Job.state == S.RECEIVING.value,
                        Job.released_at.is_not(None),
                        Job.released_at >= Job.last_instance_at,
                        Job.released_at <= cutoff,
                    )
                    .order_by(Job.id)
                )
            )

    def receiving_jobs_complete(
        self, single_image_modalities: Sequence[str]
    ) -> list[tuple[Job, str]]:
        """RECEIVING jobs whose study may be complete, with why.

        ``"announced"``: every instance of the study carries ImagesInAcquisition and each
        (series, acquisition) holds at least that many instances. ``"single_image"``: the study
        is one image of one of ``single_image_modalities`` (a one-view X-ray) — a weaker hint,
        which the scheduler acts on only once the sender released its association.
        """
        groups: dict[int, list[tuple[int, int, int | None, str]]] = {}
        with self.sessions() as s:
            receiving = select(Job.study_id).where(Job.state == S.RECEIVING.value)
            rows = s.execute(
                select(
                    Instance.study_id,
                    func.count(),
                    func.count(Instance.images_in_acquisition),
                    func.max(Instance.images_in_acquisition),
                    func.min(Instance.modality),
                )
                .where(Instance.study_id.in_(receiving))
                .group_by(
                    Instance.study_id, Instance.series_instance_uid, Instance.acquisition_number
                )
            ).all()
            for study_id, n, known, expected, modality in rows:
                groups.setdefault(int(study_id), []).append(
                    (
                        int(n),
                        int(known),
                        None if expected is None else int(expected),
                        str(modality or ""),
                    )
                )
            single = {m.upper() for m in single_image_modalities}
            why: dict[int, str] = {}
            for study_id, parts in groups.items():
                if all(
                    known == n and expected is not None and n >= expected > 0
                    for n, known, expected, _ in parts
                ):
                    why[study_id] = "announced"
                elif len(parts) == 1 and parts[0][0] == 1 and parts[0][3].upper() in single:
                    why[study_id] = "single_image"
            if not why:
                return []
            jobs = s.scalars(
                select(Job)
                .where(Job.state == S.RECEIVING.value, Job.study_id.in_(list(why)))
                .order_by(Job.id)
            )
            return [(job, why[job.study_id]) for job in jobs]

    def stale_claims(self, state: JobState, cutoff: datetime) -> list[Job]:
        """Jobs in ``state`` whose heartbeat is older than ``cutoff``."""
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(Job).where(
                        Job.state == state.value,
                        (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff),
                    )
                )
            )

    def previous_results(self, study_id: int, before_generation: int) -> list[ResultObject]:
        """Result objects of earlier generations of a study (for predecessor references)."""
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(ResultObject)
                    .join(Job, Job.id == ResultObject.job_id)
                    .where(Job.study_id == study_id, Job.generation < before_generation)
                    .order_by(Job.generation.desc())
                )
            )

    def results_for(self, job_id: int) -> list[ResultObject]:
        """Result rows of a job."""
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(ResultObject)
                    .where(ResultObject.job_id == job_id)
                    .order_by(ResultObject.id)
                )
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
        state: str,
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
            notice = bool((job.findings or {}).get("failure_notice"))
            done = (ResultState.SENT, ResultState.SKIPPED)
            unsent = [r for r in results if r.state not in done]
            dst = S.OUTBOX if results and unsent and not notice else S.QUEUED
            for r in unsent:
                r.state, r.last_error = ResultState.PENDING, None
            fields: dict[str, Any] = {
                "not_before": None,
                "claimed_by": None,
                "finished_at": None,
                "last_error": None,
                "send_attempts": 0,
            }
            if dst is S.QUEUED:
                fields.update(attempts=0, findings=None)
            self.transition(
                job_id, S.FAILED, dst, reason="operator.retry", now=now, session=s, **fields
            )
            return dst

    def cancel(self, job_id: int, now: datetime) -> None:
        """QUEUED, OUTBOX or FAILED → CANCELLED (raises StateConflict otherwise)."""
        job = self.get_job(job_id)
        src = JobState(job.state)
        if S.CANCELLED not in ALLOWED_TRANSITIONS[src]:
            raise StateConflict(f"job {job_id} is {src.value} and cannot be cancelled")
        self.transition(job_id, src, S.CANCELLED, reason="operator.cancel", now=now)

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
