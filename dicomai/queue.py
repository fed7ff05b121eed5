"""The job state machine in the database: states, allowed transitions, claims and enqueueing."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomai.db import (
    ComponentHeartbeat,
    Instance,
    Job,
    JobEvent,
    QuarantineEntry,
    ResultObject,
    Study,
    utcnow,
)
from dicomai.errors import StateConflict
from dicomai.logs import log_fields

__all__ = [
    "ALLOWED_TRANSITIONS",
    "TERMINAL_STATES",
    "InstanceRecord",
    "JobState",
    "Queue",
    "RetryPolicy",
]

logger = logging.getLogger(__name__)


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
class InstanceRecord:
    """Header fields of a received instance, extracted once by the receiver."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    body_part: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    image_type: str = ""
    view_position: str = ""
    study_description: str = ""
    series_description: str = ""
    orientation: str = ""
    slice_position: float | None = None
    rows: int | None = None
    columns: int | None = None
    acquisition_number: int | None = None
    images_in_acquisition: int | None = None


class Queue:
    """All reads and writes of job state. The only place a job's state changes."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._sessions = session_factory

    def session(self) -> Session:
        """A new session (use as a context manager)."""
        return self._sessions()

    # -- receiving ---------------------------------------------------------------------
    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether an instance with this SOP Instance UID is already stored."""
        with self._sessions() as s:
            found = s.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            )
            return found is not None

    def indexed_paths(self, paths: Sequence[str]) -> set[str]:
        """Which of ``paths`` have an instance row."""
        found: set[str] = set()
        with self._sessions() as s:
            for start in range(0, len(paths), 500):
                chunk = list(paths[start:start + 500])
                found.update(s.scalars(select(Instance.path).where(Instance.path.in_(chunk))))
        return found

    def known_instance(self, sop_instance_uid: str) -> str | None:
        """``"stored"`` (already received), ``"own_result"`` (an object dicomai made and a
        PACS sent back), or ``None``."""
        with self._sessions() as s:
            if s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
                        .limit(1)) is not None:
                return "stored"
            if s.scalar(select(ResultObject.id)
                        .where(ResultObject.sop_instance_uid == sop_instance_uid)
                        .limit(1)) is not None:
                return "own_result"
            return None

    def record_instance(
        self, rec: InstanceRecord, path: str, size_bytes: int, calling_ae: str, now: datetime
    ) -> tuple[bool, int]:
        """Index a stored instance and attach it to its study's RECEIVING job.

        Returns
        -------
        tuple[bool, int]
            ``(new, job_id)``; ``new`` is False when the SOP Instance UID was already stored
            (then nothing changes).
        """
        for _ in range(5):
            try:
                return self._record_instance(rec, path, size_bytes, calling_ae, now)
            except (IntegrityError, StateConflict):
                # A concurrent association created the same study/job/instance, or the
                # scheduler closed the job meanwhile: read again.
                continue
        raise StateConflict("could not record instance after 5 attempts")

    def _record_instance(
        self, rec: InstanceRecord, path: str, size_bytes: int, calling_ae: str, now: datetime
    ) -> tuple[bool, int]:
        with self._sessions.begin() as s:
            existing = s.scalar(
                select(Instance.job_id).where(Instance.sop_instance_uid == rec.sop_instance_uid)
            )
            if existing is not None:
                return False, existing
            study = s.scalar(
                select(Study).where(Study.study_instance_uid == rec.study_instance_uid)
            )
            if study is None:
                study = Study(
                    study_instance_uid=rec.study_instance_uid,
                    first_received_at=now,
                    last_received_at=now,
                    calling_ae_title=calling_ae,
                )
                s.add(study)
                s.flush()
            study.last_received_at = now
            job = s.scalar(
                select(Job).where(Job.study_id == study.id, Job.state == S.RECEIVING.value)
                .with_for_update()
            )
            if job is None:
                generation = (
                    s.scalar(select(func.max(Job.generation)).where(Job.study_id == study.id)) or 0
                ) + 1
                job = Job(
                    study_id=study.id,
                    generation=generation,
                    state=S.RECEIVING.value,
                    created_at=now,
                    updated_at=now,
                    last_instance_at=now,
                )
                s.add(job)
                s.flush()
                s.add(JobEvent(job_id=job.id, src=None, dst=S.RECEIVING.value, at=now,
                               reason="instance.first"))
                job.instance_count = 0
                s.flush()
            # Only while the job is still RECEIVING: if the scheduler closed it meanwhile, this
            # instance belongs to the next generation (StateConflict → the caller retries).
            touched = s.execute(
                update(Job).where(Job.id == job.id, Job.state == S.RECEIVING.value)
                .values(last_instance_at=now, instance_count=Job.instance_count + 1)
                .execution_options(synchronize_session=False)
            )
            if touched.rowcount != 1:  # type: ignore[attr-defined]
                raise StateConflict(f"job {job.id} closed while receiving")
            s.add(
                Instance(
                    sop_instance_uid=rec.sop_instance_uid,
                    study_id=study.id,
                    job_id=job.id,
                    series_instance_uid=rec.series_instance_uid,
                    sop_class_uid=rec.sop_class_uid,
                    transfer_syntax_uid=rec.transfer_syntax_uid,
                    modality=rec.modality,
                    body_part=rec.body_part,
                    series_number=rec.series_number,
                    instance_number=rec.instance_number,
                    image_type=rec.image_type,
                    view_position=rec.view_position,
                    study_description=rec.study_description,
                    series_description=rec.series_description,
                    orientation=rec.orientation,
                    slice_position=rec.slice_position,
                    rows=rec.rows,
                    columns=rec.columns,
                    acquisition_number=rec.acquisition_number,
                    images_in_acquisition=rec.images_in_acquisition,
                    path=path,
                    size_bytes=size_bytes,
                    calling_ae_title=calling_ae,
                    received_at=now,
                )
            )
            return True, job.id

    def quarantine(self, *, reason: str, status_code: int, calling_ae: str, peer: str,
                   sop_class_uid: str, path: str | None, size_bytes: int,
                   now: datetime) -> None:
        """Record a refused object."""
        with self._sessions.begin() as s:
            s.add(QuarantineEntry(reason=reason, status_code=status_code,
                                  calling_ae_title=calling_ae, peer_address=peer,
                                  sop_class_uid=sop_class_uid, path=path,
                                  size_bytes=size_bytes, received_at=now))

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
            with self._sessions.begin() as s:
                self._cas(s, job_id, src, dst, values, reason, now, guard)
        else:
            self._cas(session, job_id, src, dst, values, reason, now, guard)
        logger.info(
            "job state changed",
            extra=log_fields("job.transition", job_id=job_id, src=src.value, dst=dst.value,
                             reason=reason),
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
        self, src: JobState, dst: JobState, claimer: str, now: datetime, *,
        models: Sequence[str] | None = None,
    ) -> Job | None:
        """Claim the most urgent due job in ``src`` and move it to ``dst``.

        ``FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite the compare-and-set guard alone
        keeps two claimers off the same job.
        """
        for _ in range(5):
            with self._sessions.begin() as s:
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
                    self._cas(s, job.id, src, dst, {"state": dst.value, "updated_at": now,
                                                     **fields}, "claim", now)
                except StateConflict:
                    continue
                s.flush()
                s.refresh(job)
            logger.info("job claimed", extra=log_fields("job.claimed", job_id=job.id,
                                                          state=dst.value, claimer=claimer))
            return job
        return None

    def heartbeat_job(self, job_id: int, claimer: str, now: datetime) -> None:
        """Touch a claimed job's heartbeat."""
        with self._sessions.begin() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.claimed_by == claimer)
                .values(heartbeat_at=now)
            )

    # -- reads -------------------------------------------------------------------------
    def get_job(self, job_id: int) -> Job:
        """The job row (detached)."""
        with self._sessions() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            return job

    def study_uid(self, job: Job) -> str:
        """StudyInstanceUID of a job's study."""
        with self._sessions() as s:
            return s.scalar(select(Study.study_instance_uid).where(Study.id == job.study_id)) or ""

    def study_instances(self, study_id: int, up_to_generation: int | None = None) -> list[Instance]:
        """All instances of a study, optionally only those of generations up to the given one."""
        with self._sessions() as s:
            q = select(Instance).where(Instance.study_id == study_id)
            if up_to_generation is not None:
                q = q.join(Job, Job.id == Instance.job_id).where(
                    Job.generation <= up_to_generation
                )
            return list(s.scalars(q.order_by(Instance.id)))

    def restart_quiet_clocks(self, now: datetime) -> int:
        """Restart the quiet period of every RECEIVING job (at start: our downtime is not the
        modality's silence, and its sender may still be about to resume)."""
        with self._sessions.begin() as s:
            result = s.execute(
                update(Job).where(Job.state == S.RECEIVING.value, Job.last_instance_at < now)
                .values(last_instance_at=now)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def jobs_of_study(self, study_id: int) -> list[Job]:
        """Every job (generation) of a study, oldest first."""
        with self._sessions() as s:
            return list(s.scalars(select(Job).where(Job.study_id == study_id)
                                  .order_by(Job.generation)))

    def receiving_jobs_quiet_since(self, cutoff: datetime) -> list[Job]:
        """RECEIVING jobs whose last instance arrived before ``cutoff``."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(Job)
                    .where(Job.state == S.RECEIVING.value, Job.last_instance_at < cutoff)
                    .order_by(Job.id)
                )
            )

    def mark_released(self, study_uids: Sequence[str], now: datetime) -> int:
        """Note that the sender released the association that delivered these studies.

        Only RECEIVING jobs are touched; an instance arriving later moves ``last_instance_at``
        past ``released_at``, which cancels the early close until the next release.
        """
        if not study_uids:
            return 0
        with self._sessions.begin() as s:
            studies = select(Study.id).where(Study.study_instance_uid.in_(list(study_uids)))
            result = s.execute(
                update(Job).where(Job.state == S.RECEIVING.value, Job.study_id.in_(studies))
                .values(released_at=now).execution_options(synchronize_session=False)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def receiving_jobs_released_since(self, cutoff: datetime) -> list[Job]:
        """RECEIVING jobs whose sender released its association at or before ``cutoff`` and
        sent nothing after that release."""
        with self._sessions() as s:
            return list(s.scalars(
                select(Job).where(Job.state == S.RECEIVING.value,
                                  Job.released_at.is_not(None),
                                  Job.released_at >= Job.last_instance_at,
                                  Job.released_at <= cutoff)
                .order_by(Job.id)))

    def receiving_jobs_complete(self, single_image_modalities: Sequence[str]) -> list[Job]:
        """RECEIVING jobs whose study holds every image its headers announce.

        Complete means: every instance of the study carries ImagesInAcquisition and each
        (series, acquisition) holds at least that many instances; or the study is a single
        image of one of ``single_image_modalities`` (e.g. a one-view X-ray).
        """
        groups: dict[int, list[tuple[int, int, int | None, str]]] = {}
        with self._sessions() as s:
            receiving = select(Job.study_id).where(Job.state == S.RECEIVING.value)
            rows = s.execute(
                select(Instance.study_id, func.count(), func.count(Instance.images_in_acquisition),
                       func.max(Instance.images_in_acquisition), func.min(Instance.modality))
                .where(Instance.study_id.in_(receiving))
                .group_by(Instance.study_id, Instance.series_instance_uid,
                          Instance.acquisition_number)
            ).all()
            for study_id, n, known, expected, modality in rows:
                groups.setdefault(int(study_id), []).append(
                    (int(n), int(known), None if expected is None else int(expected),
                     str(modality or "")))
            single = {m.upper() for m in single_image_modalities}
            complete = [
                study_id for study_id, parts in groups.items()
                if all(known == n and expected is not None and n >= expected > 0
                       for n, known, expected, _ in parts)
                or (len(parts) == 1 and parts[0][0] == 1 and parts[0][3].upper() in single)
            ]
            if not complete:
                return []
            return list(s.scalars(
                select(Job).where(Job.state == S.RECEIVING.value, Job.study_id.in_(complete))
                .order_by(Job.id)))

    def stale_claims(self, state: JobState, cutoff: datetime) -> list[Job]:
        """Jobs in ``state`` whose heartbeat is older than ``cutoff``."""
        with self._sessions() as s:
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
        with self._sessions() as s:
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
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(ResultObject).where(ResultObject.job_id == job_id).order_by(
                        ResultObject.id
                    )
                )
            )

    def add_results(self, job_id: int, rows: Sequence[ResultObject], *, session: Session) -> None:
        """Replace a job's result rows (a rerun after a crash rebuilds the same UIDs)."""
        for old in session.scalars(select(ResultObject).where(ResultObject.job_id == job_id)):
            session.delete(old)
        session.flush()
        session.add_all(rows)

    def mark_result(self, result_id: int, *, state: str, status_code: int | None,
                    error: str | None, now: datetime) -> None:
        """Record one object's delivery outcome."""
        with self._sessions.begin() as s:
            row = s.get(ResultObject, result_id)
            if row is None:
                return
            row.state = state
            row.status_code = status_code
            row.attempts += 1
            row.last_error = error
            if state == "sent":
                row.sent_at = now

    # -- operator actions --------------------------------------------------------------
    def jobs_for(self, *, job_ids: Sequence[int] = (), study_uids: Sequence[str] = (),
                 states: Sequence[JobState] = ()) -> list[Job]:
        """Jobs by id, by study (its latest generation) or by state."""
        with self._sessions() as s:
            out: dict[int, Job] = {}
            if job_ids:
                for job in s.scalars(select(Job).where(Job.id.in_(list(job_ids)))):
                    out[job.id] = job
            for uid in study_uids:
                job = s.scalar(
                    select(Job).join(Study, Study.id == Job.study_id)
                    .where(Study.study_instance_uid == uid)
                    .order_by(Job.generation.desc()).limit(1))
                if job is not None:
                    out[job.id] = job
            if states:
                for job in s.scalars(select(Job).where(Job.state.in_([x.value for x in states]))):
                    out[job.id] = job
            return [out[k] for k in sorted(out)]

    def retry(self, job_id: int, now: datetime) -> JobState:
        """FAILED → OUTBOX (results exist and were not all refused) or QUEUED; resets counters.

        Raises
        ------
        StateConflict
            The job is not FAILED.
        """
        with self._sessions.begin() as s:
            job = s.get(Job, job_id)
            if job is None or job.state != S.FAILED.value:
                raise StateConflict(f"job {job_id} is not failed")
            results = list(s.scalars(select(ResultObject).where(ResultObject.job_id == job_id)))
            notice = bool((job.findings or {}).get("failure_notice"))
            unsent = [r for r in results if r.state != "sent"]
            dst = S.OUTBOX if results and unsent and not notice else S.QUEUED
            for r in unsent:
                r.state, r.last_error = "pending", None
            fields: dict[str, Any] = {"not_before": None, "claimed_by": None, "finished_at": None,
                                      "last_error": None, "send_attempts": 0}
            if dst is S.QUEUED:
                fields.update(attempts=0, findings=None)
            self.transition(job_id, S.FAILED, dst, reason="operator.retry", now=now, session=s,
                            **fields)
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
        with self._sessions.begin() as s:
            row = s.get(ComponentHeartbeat, component)
            if row is None:
                s.add(ComponentHeartbeat(component=component, role=role, started_at=now,
                                         beat_at=now, info=info))
            else:
                row.beat_at = now
                row.info = info
                row.role = role

    def forget_component(self, component: str) -> None:
        """Remove a component's heartbeat row (clean shutdown)."""
        with self._sessions.begin() as s:
            row = s.get(ComponentHeartbeat, component)
            if row is not None:
                s.delete(row)
