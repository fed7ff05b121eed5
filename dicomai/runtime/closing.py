"""Closing a study: a RECEIVING job is routed once its sender went quiet, or earlier where
that is safe, and becomes QUEUED (a route matched) or SKIPPED (:func:`dicomai.jobs.policy.close`).

Plain idempotent functions of ``now``: the scheduler calls them on every tick (and the early
close when a sender releases its association); tests call them directly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from dicomai.config import RouteSettings, SchedulerSettings
from dicomai.db import Instance, Job
from dicomai.errors import StateConflict
from dicomai.jobs import policy, reads
from dicomai.jobs.queue import Queue
from dicomai.jobs.states import JobState
from dicomai.logs import log_fields
from dicomai.routing import RouteDecision, StudyInfo, select_route, summarise_series

__all__ = ["close_early_studies", "close_quiet_studies"]

logger = logging.getLogger(__name__)

_ROUTING_COLUMNS = (
    "series_instance_uid",
    "modality",
    "body_part",
    "series_number",
    "image_type",
    "view_position",
    "study_description",
    "series_description",
    "orientation",
)


def close_quiet_studies(
    queue: Queue, routes: Sequence[RouteSettings], now: datetime, quiet_seconds: float
) -> int:
    """Route every RECEIVING job quiet for ``quiet_seconds``: QUEUED, or SKIPPED if no route.

    Returns
    -------
    int
        Number of jobs closed.
    """
    jobs = reads.receiving_jobs_quiet_since(queue.sessions, now - timedelta(seconds=quiet_seconds))
    closed = sum(_close(queue, job, routes, now) for job in jobs)
    if closed:
        logger.info(
            "quiet studies closed", extra=log_fields("scheduler.closed", jobs=closed, cause="quiet")
        )
    return closed


def close_early_studies(
    queue: Queue, routes: Sequence[RouteSettings], now: datetime, settings: SchedulerSettings
) -> int:
    """Close RECEIVING jobs before their quiet period where that is safe.

    * released: the sender released the association that delivered the study's latest
      instance, ``release_grace_seconds`` ago, and sent nothing since;
    * complete: every image the headers announce (ImagesInAcquisition per series and
      acquisition) is there and nothing arrived for ``complete_quiet_seconds`` — at once if
      the association was also released; a single image of ``single_image_modalities`` (a
      one-view X-ray) closes at once when its association was released, without the grace.

    An instance arriving later opens a new generation, as after the quiet period.

    Returns
    -------
    int
        Number of jobs closed.
    """
    if not settings.early_close:
        return 0
    released_cutoff = now - timedelta(seconds=settings.release_grace_seconds)
    complete_cutoff = now - timedelta(seconds=settings.complete_quiet_seconds)
    closed = {"released": 0, "complete": 0}
    seen: set[int] = set()
    for job in reads.receiving_jobs_released_since(queue.sessions, released_cutoff):
        seen.add(job.id)
        closed["released"] += _close(queue, job, routes, now, cause="released")
    for job, why in reads.receiving_jobs_complete(queue.sessions, settings.single_image_modalities):
        if job.id in seen:
            continue
        released = job.released_at is not None and job.released_at >= job.last_instance_at
        # Announced counts are trusted after a short settle; a single X-ray image only once
        # its association was released (a slow sender's second view must not split the study).
        if released or (why == "announced" and job.last_instance_at <= complete_cutoff):
            closed["complete"] += _close(queue, job, routes, now, cause="complete")
    total = sum(closed.values())
    if total:
        logger.info(
            "studies closed early", extra=log_fields("scheduler.closed", jobs=total, **closed)
        )
    return total


def _close(
    queue: Queue, job: Job, routes: Sequence[RouteSettings], now: datetime, cause: str = "quiet"
) -> int:
    """Route one RECEIVING job (QUEUED, or SKIPPED); 1 if this call closed it, else 0."""
    # Route on what was there at job.last_instance_at; an instance arriving meanwhile
    # changes last_instance_at, the close below fails and a later tick tries again.
    guard = {"last_instance_at": job.last_instance_at}
    rows = reads.study_instances(queue.sessions, job.study_id, up_to_generation=job.generation)
    study = StudyInfo(
        study_instance_uid=reads.study_uid(queue.sessions, job.study_id),
        series=tuple(summarise_series({c: getattr(r, c) for c in _ROUTING_COLUMNS} for r in rows)),
    )
    decision = select_route(study, routes)
    unchanged = (
        decision is not None and job.generation > 1 and _unchanged(queue, job, rows, decision)
    )
    t = policy.close(route_matched=decision is not None, inputs_unchanged=unchanged)
    chosen: dict[str, Any] = {}
    if decision is not None:  # what was chosen is kept, also when the study is skipped
        chosen = {"route": decision.route, "model": decision.model}
        if t.dst is JobState.QUEUED:
            chosen.update(
                destinations=list(decision.destinations),
                series_uids=list(decision.series_instance_uids),
                priority=decision.priority,
            )
    try:
        queue.apply(job.id, t, now=now, guard=guard, **chosen)
    except StateConflict:
        return 0
    logger.debug("study closed", extra=log_fields("scheduler.close", job_id=job.id, cause=cause))
    return 1


def _unchanged(queue: Queue, job: Job, rows: Sequence[Instance], decision: RouteDecision) -> bool:
    """True when a later generation would analyse exactly what an earlier one did.

    New instances that land outside the chosen series (a report, a key-object note, another
    view) do not change the model's input, so the study is not analysed again.
    """
    chosen = set(decision.series_instance_uids)
    generations = reads.jobs_of_study(queue.sessions, job.study_id)
    generation_of = {j.id: j.generation for j in generations}
    now_inputs = {r.sop_instance_uid for r in rows if r.series_instance_uid in chosen}
    before = {
        r.sop_instance_uid
        for r in rows
        if r.series_instance_uid in chosen
        and generation_of.get(r.job_id, job.generation) < job.generation
    }
    if now_inputs != before:
        return False
    previous = [j for j in generations if j.generation < job.generation and j.route is not None]
    return (
        bool(previous)
        and previous[-1].route == decision.route
        and set(previous[-1].series_uids) == chosen
    )
