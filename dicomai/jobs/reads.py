"""Every read query of the database, in one place: what the pipeline, the scheduler, `dicomai
status`, the CLI and the metrics ask of it.

Functions take a session factory (or an open session) and return plain rows or ORM objects
detached from their session; none of them writes. Writes (transitions, claims, results, the
instance index) live beside the state they change, in :mod:`dicomai.jobs.queue` and
:mod:`dicomai.ingest.index`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, Subquery, case, func, inspect, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from dicomai.db import (
    ComponentHeartbeat,
    Instance,
    Job,
    JobEvent,
    QuarantineEntry,
    ResultObject,
    Study,
)
from dicomai.jobs.policy import RETRY_REASONS
from dicomai.jobs.states import ACTIVE_STATES, TERMINAL_STATES, JobState, ResultState
from dicomai.timefmt import aware


def latest_generation_subquery() -> Subquery:
    """``(study_id, gen)``: each study's latest (highest) generation; join it to ``Job`` on
    both columns to keep only the latest job of each study."""
    return (
        select(Job.study_id, func.max(Job.generation).label("gen"))
        .group_by(Job.study_id)
        .subquery()
    )


# -- pipeline reads (worker, sender, scheduler) -----------------------------------------------


def get_job(sessions: sessionmaker[Session], job_id: int) -> Job:
    """The job row (detached); KeyError when there is none."""
    with sessions() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise KeyError(job_id)
        return job


def study_uid(sessions: sessionmaker[Session], study_id: int) -> str:
    """A study's StudyInstanceUID ("" when there is none)."""
    with sessions() as s:
        return s.scalar(select(Study.study_instance_uid).where(Study.id == study_id)) or ""


def study_instances(
    sessions: sessionmaker[Session], study_id: int, up_to_generation: int | None = None
) -> list[Instance]:
    """All instances of a study, optionally only those of generations up to the given one."""
    with sessions() as s:
        q = select(Instance).where(Instance.study_id == study_id)
        if up_to_generation is not None:
            q = q.join(Job, Job.id == Instance.job_id).where(Job.generation <= up_to_generation)
        return list(s.scalars(q.order_by(Instance.id)))


def jobs_of_study(sessions: sessionmaker[Session], study_id: int) -> list[Job]:
    """Every job (generation) of a study, oldest first."""
    with sessions() as s:
        return list(s.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.generation)))


def _receiving() -> ColumnElement[bool]:
    return Job.state == JobState.RECEIVING.value


def receiving_jobs_quiet_since(sessions: sessionmaker[Session], cutoff: datetime) -> list[Job]:
    """RECEIVING jobs whose last instance arrived before ``cutoff``."""
    with sessions() as s:
        q = select(Job).where(_receiving(), Job.last_instance_at < cutoff)
        return list(s.scalars(q.order_by(Job.id)))


def receiving_jobs_released_since(sessions: sessionmaker[Session], cutoff: datetime) -> list[Job]:
    """RECEIVING jobs whose sender released its association at or before ``cutoff`` and
    sent nothing after that release."""
    with sessions() as s:
        q = select(Job).where(
            _receiving(),
            Job.released_at.is_not(None),
            Job.released_at >= Job.last_instance_at,
            Job.released_at <= cutoff,
        )
        return list(s.scalars(q.order_by(Job.id)))


def receiving_jobs_complete(
    sessions: sessionmaker[Session], single_image_modalities: Sequence[str]
) -> list[tuple[Job, str]]:
    """RECEIVING jobs whose study may be complete, with why.

    ``"announced"``: every instance of the study carries ImagesInAcquisition and each
    (series, acquisition) holds at least that many instances. ``"single_image"``: the study
    is one image of one of ``single_image_modalities`` (a one-view X-ray) — a weaker hint,
    which the scheduler acts on only once the sender released its association.
    """
    groups: dict[int, list[tuple[int, int, int | None, str]]] = {}
    with sessions() as s:
        rows = s.execute(
            select(
                Instance.study_id,
                func.count(),
                func.count(Instance.images_in_acquisition),
                func.max(Instance.images_in_acquisition),
                func.min(Instance.modality),
            )
            .where(Instance.study_id.in_(select(Job.study_id).where(_receiving())))
            .group_by(Instance.study_id, Instance.series_instance_uid, Instance.acquisition_number)
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
            select(Job).where(_receiving(), Job.study_id.in_(list(why))).order_by(Job.id)
        )
        return [(job, why[job.study_id]) for job in jobs]


def stale_claims(sessions: sessionmaker[Session], state: JobState, cutoff: datetime) -> list[Job]:
    """Jobs in ``state`` whose heartbeat is older than ``cutoff``."""
    with sessions() as s:
        q = select(Job).where(
            Job.state == state.value, (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff)
        )
        return list(s.scalars(q))


def previous_results(
    sessions: sessionmaker[Session], study_id: int, before_generation: int
) -> list[ResultObject]:
    """Result objects of earlier generations of a study (for predecessor references), latest
    generation first."""
    with sessions() as s:
        q = (
            select(ResultObject)
            .join(Job, Job.id == ResultObject.job_id)
            .where(Job.study_id == study_id, Job.generation < before_generation)
            .order_by(Job.generation.desc())
        )
        return list(s.scalars(q))


def results_for(sessions: sessionmaker[Session], job_id: int) -> list[ResultObject]:
    """Result rows of a job."""
    with sessions() as s:
        q = select(ResultObject).where(ResultObject.job_id == job_id).order_by(ResultObject.id)
        return list(s.scalars(q))


@dataclass(frozen=True)
class StudyFiles:
    """What retention removes of one finished study: its jobs, its instance files."""

    study_id: int
    finished_at: datetime
    job_ids: tuple[int, ...]
    instance_paths: tuple[str, ...]


def finished_studies(sessions: sessionmaker[Session], before: datetime) -> list[StudyFiles]:
    """Studies whose every generation is terminal and whose latest finished before ``before``
    (naive datetimes from SQLite read as UTC), with their jobs and instance files."""
    terminal = [x.value for x in TERMINAL_STATES]
    out: list[StudyFiles] = []
    with sessions() as s:
        per_study = s.execute(
            select(
                Job.study_id,
                func.max(Job.finished_at),
                func.sum(case((Job.state.in_(terminal), 0), else_=1)),
            ).group_by(Job.study_id)
        ).all()
        for study_id, finished, open_jobs in per_study:
            if open_jobs or finished is None or aware(finished) >= before:
                continue
            job_ids = tuple(s.scalars(select(Job.id).where(Job.study_id == study_id)))
            paths = tuple(s.scalars(select(Instance.path).where(Instance.study_id == study_id)))
            out.append(StudyFiles(study_id, aware(finished), job_ids, paths))
    return out


# -- metrics (scrape-time gauges) -------------------------------------------------------------


@dataclass(frozen=True)
class Gauges:
    """What a metrics scrape reads from the database."""

    studies_by_state: dict[str, int]  # by each study's latest generation
    jobs_by_state: dict[str, int]  # jobs in the active states
    pending_by_destination: dict[str, int]  # result objects waiting to be sent
    quarantined_by_reason: dict[str, int]
    newest_heartbeat: datetime | None  # aware


def gauges(conn: Connection | Session) -> Gauges:
    """The metrics' database gauges, read on one connection."""
    depth = conn.execute(
        select(Job.state, func.count())
        .where(Job.state.in_([x.value for x in ACTIVE_STATES]))
        .group_by(Job.state)
    )
    backlog = conn.execute(
        select(ResultObject.destination, func.count())
        .where(ResultObject.state == ResultState.PENDING.value)
        .group_by(ResultObject.destination)
    )
    quarantine = conn.execute(
        select(QuarantineEntry.reason, func.count()).group_by(QuarantineEntry.reason)
    )
    beat = conn.scalar(select(func.max(ComponentHeartbeat.beat_at)))
    return Gauges(
        studies_by_state=state_counts(conn),
        jobs_by_state={str(k): int(n) for k, n in depth},
        pending_by_destination={str(k): int(n) for k, n in backlog},
        quarantined_by_reason={str(k): int(n) for k, n in quarantine},
        newest_heartbeat=aware(beat),  # a raw aggregate: SQLite returns naive UTC
    )


# -- operator reads (status, CLI, metrics) ----------------------------------------------------

# Operator reads run on an open Connection (the read-only tools use a plain engine) or Session.
Reader = Connection | Session
#: A result row of any shape (on a Connection, ORM entities come back as their columns).
AnyRow = Row[*tuple[Any, ...]]


def _jobs_with_uid(latest_only: bool) -> Select[Job, str]:
    """Jobs with their study's UID; only each study's latest generation when ``latest_only``."""
    q = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
    if latest_only:
        latest = latest_generation_subquery()
        q = q.join(latest, (latest.c.study_id == Job.study_id) & (latest.c.gen == Job.generation))
    return q


def state_counts(conn: Reader) -> dict[str, int]:
    """Studies per state, by each study's latest generation (states without one left out)."""
    lj = _jobs_with_uid(latest_only=True).subquery()
    return {
        state: n for state, n in conn.execute(select(lj.c.state, func.count()).group_by(lj.c.state))
    }


def job_list(
    conn: Reader,
    *,
    limit: int,
    latest_only: bool = True,
    states: Sequence[str] = (),
    routes: Sequence[str] = (),
    since: datetime | None = None,
) -> Sequence[AnyRow]:
    """Jobs (job columns and ``study_instance_uid``), newest first: `dicomai status`'s recent
    studies and `dicomai studies`' list, filtered by state, route and received-since."""
    q = _jobs_with_uid(latest_only)
    if states:
        q = q.where(Job.state.in_(states))
    if routes:
        q = q.where(Job.route.in_(routes))
    if since is not None:
        q = q.where(Job.created_at >= since)
    return conn.execute(q.order_by(Job.id.desc()).limit(limit)).all()


def result_counts(conn: Reader) -> Sequence[AnyRow]:
    """``(destination, state, count, last sent_at)`` of the result objects."""
    return conn.execute(
        select(
            ResultObject.destination,
            ResultObject.state,
            func.count(),
            func.max(ResultObject.sent_at),
        ).group_by(ResultObject.destination, ResultObject.state)
    ).all()


def result_errors(conn: Reader) -> Sequence[AnyRow]:
    """``(destination, last_error)`` of every result object with an error, newest first."""
    return conn.execute(
        select(ResultObject.destination, ResultObject.last_error)
        .where(ResultObject.last_error.is_not(None))
        .order_by(ResultObject.id.desc())
    ).all()


def finished_since(conn: Reader, since: datetime) -> Sequence[AnyRow]:
    """State, finish and last-instance times, inference time and size of the jobs finished
    since ``since`` (throughput and latency)."""
    return conn.execute(
        select(
            Job.state,
            Job.finished_at,
            Job.last_instance_at,
            Job.inference_seconds,
            Job.instance_count,
        ).where(Job.finished_at >= since)
    ).all()


def recent_failures(conn: Reader, limit: int = 10) -> Sequence[AnyRow]:
    """The latest job events that moved a job to FAILED or put it back for a retry, with the
    job's generation, state, last error and study UID; newest first."""
    return conn.execute(
        select(
            JobEvent.at,
            JobEvent.reason,
            JobEvent.dst,
            JobEvent.job_id,
            Job.generation,
            Job.state,
            Job.last_error,
            Study.study_instance_uid,
        )
        .join(Job, Job.id == JobEvent.job_id)
        .join(Study, Study.id == Job.study_id)
        .where(or_(JobEvent.dst == JobState.FAILED.value, JobEvent.reason.in_(RETRY_REASONS)))
        .order_by(JobEvent.id.desc())
        .limit(limit)
    ).all()


def heartbeats(conn: Reader) -> list[ComponentHeartbeat]:
    """Every component's heartbeat row (as transient objects, bound to no session)."""
    return [
        ComponentHeartbeat(**dict(r._mapping))
        for r in conn.execute(select(*ComponentHeartbeat.__table__.columns))
    ]


def quarantine_recent(conn: Reader, limit: int = 10) -> tuple[int, Sequence[AnyRow]]:
    """How many objects the receiver refused, and the latest ``limit`` of them; ``(0, [])``
    on a database without the quarantine table."""
    if not inspect(conn).has_table("quarantine"):
        return 0, []
    count = conn.scalar(select(func.count()).select_from(QuarantineEntry)) or 0
    recent = conn.execute(
        select(
            QuarantineEntry.reason,
            QuarantineEntry.status_code,
            QuarantineEntry.calling_ae_title,
            QuarantineEntry.peer_address,
            QuarantineEntry.received_at,
            QuarantineEntry.path,
        )
        .order_by(QuarantineEntry.id.desc())
        .limit(limit)
    ).all()
    return count, recent


@dataclass(frozen=True)
class StudyDetail:
    """One study as `dicomai studies show` lists it: its series (grouped instances), every
    generation's job, their result objects and their state changes in time order."""

    study: AnyRow
    series: Sequence[AnyRow]
    jobs: Sequence[AnyRow]
    results: Sequence[AnyRow]
    events: Sequence[AnyRow]


def study_detail(conn: Reader, study_instance_uid: str) -> StudyDetail | None:
    """The study with this UID, or None when there is none."""
    study = conn.execute(
        select(Study).where(Study.study_instance_uid == study_instance_uid)
    ).first()
    if study is None:
        return None
    jobs = conn.execute(select(Job).where(Job.study_id == study.id).order_by(Job.generation)).all()
    job_ids = [j.id for j in jobs]
    series = conn.execute(
        select(
            Instance.series_instance_uid,
            Instance.modality,
            Instance.body_part,
            Instance.series_description,
            func.min(Instance.view_position),
            func.count(),
            func.min(Instance.series_number),
        )
        .where(Instance.study_id == study.id)
        .group_by(
            Instance.series_instance_uid,
            Instance.modality,
            Instance.body_part,
            Instance.series_description,
        )
        .order_by(func.min(Instance.series_number))
    ).all()
    results = conn.execute(
        select(ResultObject)
        .where(ResultObject.job_id.in_(job_ids))
        .order_by(ResultObject.job_id, ResultObject.id)
    ).all()
    events = conn.execute(
        select(JobEvent).where(JobEvent.job_id.in_(job_ids)).order_by(JobEvent.at, JobEvent.id)
    ).all()
    return StudyDetail(study, series, jobs, results, events)


def jobs_for(
    sessions: sessionmaker[Session],
    *,
    job_ids: Sequence[int] = (),
    study_uids: Sequence[str] = (),
    states: Sequence[JobState] = (),
) -> list[Job]:
    """Jobs by id, by study (its latest generation) or by state, in id order: what
    `dicomai retry` and `dicomai cancel` act on."""
    with sessions() as s:
        out: dict[int, Job] = {}
        if job_ids:
            for job in s.scalars(select(Job).where(Job.id.in_(list(job_ids)))):
                out[job.id] = job
        for uid in study_uids:
            latest = s.scalar(
                select(Job)
                .join(Study, Study.id == Job.study_id)
                .where(Study.study_instance_uid == uid)
                .order_by(Job.generation.desc())
                .limit(1)
            )
            if latest is not None:
                out[latest.id] = latest
        if states:
            for job in s.scalars(select(Job).where(Job.state.in_([x.value for x in states]))):
                out[job.id] = job
        return [out[k] for k in sorted(out)]
