"""APScheduler wiring; each periodic job is a plain idempotent function tests can call directly.

The studies are closed by :mod:`dicomai.runtime.closing`; stale and dead claims are taken back,
finished studies purged and orphan files swept here.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from dicomai.config import Settings
from dicomai.errors import StateConflict
from dicomai.ingest.copies import restore_copies
from dicomai.ingest.index import InstanceIndex
from dicomai.ingest.spool import Spool
from dicomai.jobs import policy, reads
from dicomai.jobs.queue import Queue
from dicomai.logs import log_fields
from dicomai.runtime.clock import Clock
from dicomai.runtime.closing import close_early_studies, close_quiet_studies
from dicomai.runtime.leadership import Leadership

__all__ = [
    "PurgeItem",
    "Scheduler",
    "purge_finished",
    "reap_stale",
    "reclaim_dead_local",
    "sweep_orphans",
]

logger = logging.getLogger(__name__)

#: Instance copies older than this are restored by the scheduler (their receiver is gone).
COPY_MAX_AGE_SECONDS = 60.0


def reap_stale(queue: Queue, now: datetime, stale_seconds: float) -> int:
    """Return RUNNING/SENDING jobs with a stale heartbeat to QUEUED/OUTBOX."""
    cutoff = now - timedelta(seconds=stale_seconds)
    reaped = 0
    for state in policy.CLAIMED_STATES:
        t = policy.reclaim(state, policy.ReclaimCause.STALE_HEARTBEAT)
        for job in reads.stale_claims(queue.sessions, state, cutoff):
            try:
                queue.apply(job.id, t, now=now)
                reaped += 1
            except StateConflict:
                continue
    if reaped:
        logger.warning("stale claims reaped", extra=log_fields("scheduler.reaped", jobs=reaped))
    return reaped


@dataclass(frozen=True, slots=True)
class PurgeItem:
    """What retention removes (or would remove) for one study."""

    study_id: int
    job_ids: tuple[int, ...]
    finished_at: datetime
    instance_files: int
    result_folders: int
    size_bytes: int


def purge_finished(
    index: InstanceIndex,
    spool: Spool,
    now: datetime,
    retention_days: float,
    *,
    dry_run: bool = False,
) -> list[PurgeItem]:
    """Delete the spool files of studies finished more than ``retention_days`` ago.

    A study qualifies when every generation is terminal and the latest finished before the
    cutoff. Its instance files, its result folders and its instance rows go (so a study sent
    again later is stored and analysed afresh); jobs, events and result rows stay as history.
    """
    cutoff = now - timedelta(days=retention_days)
    items: list[PurgeItem] = []
    for study in reads.finished_studies(index.sessions, cutoff):
        paths = [Path(p) for p in study.instance_paths]
        results = spool.root / "results"
        folders = [d for d in (results / str(j) for j in study.job_ids) if d.exists()]
        present = [p for p in paths if p.exists()]
        size = sum(p.stat().st_size for p in present) + sum(
            f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file()
        )
        if not paths and not folders:
            continue
        items.append(
            PurgeItem(
                study.study_id,
                study.job_ids,
                study.finished_at,
                len(present),
                len(folders),
                size,
            )
        )
        if dry_run:
            continue
        for path in present:
            path.unlink(missing_ok=True)
        for directory in {p.parent for p in present}:
            try:
                directory.rmdir()  # a receiver directory left empty
            except OSError:
                pass
        for folder in folders:
            spool.remove_tree(folder)
        index.forget_study(study.study_id)
    if items and not dry_run:
        logger.info(
            "retention purge",
            extra=log_fields(
                "scheduler.purged",
                studies=len(items),
                files=sum(i.instance_files for i in items),
                bytes=sum(i.size_bytes for i in items),
            ),
        )
    return items


def sweep_orphans(index: InstanceIndex, spool: Spool, older_than_seconds: float = 3600.0) -> int:
    """Delete received files that no row indexes (a crash between fsync and commit).

    Such a file was never acknowledged, so the sender will send it again. Files of receiver
    processes that are gone go at once (their ownership lock is free, see
    :mod:`dicomai.ingest.slots`); any other file only when older than an hour, since another
    receiver
    sharing the spool may be about to commit it.
    """
    removed = spool.reap_dead_writers(index.indexed_paths)
    candidates = [str(p) for p in spool.incoming_files(older_than_seconds)]
    indexed = index.indexed_paths(candidates)
    for path in candidates:
        if path not in indexed:
            Path(path).unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.warning(
            "unindexed received files removed",
            extra=log_fields("spool.orphans_removed", files=removed),
        )
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Random per process: tells this process's claims from those of a dead one with the same PID
#: (containers restart as PID 1).
PROCESS_TOKEN = uuid.uuid4().hex[:8]


def claimer_name(role: str) -> str:
    """``role@host:pid:token``, the name a worker or sender claims jobs under."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}:{PROCESS_TOKEN}"


def reclaim_dead_local(queue: Queue, hostname: str, now: datetime, own_token: str = "") -> int:
    """At start: return jobs claimed by a process of this host that no longer exists.

    Claims are named ``role@host:pid:token``; a claim from this host whose process is gone, or
    whose PID is ours but whose token is not (a restart under the same PID), need not wait for
    its heartbeat to go stale.
    """
    reclaimed = 0
    for state in policy.CLAIMED_STATES:
        t = policy.reclaim(state, policy.ReclaimCause.DEAD_PROCESS)
        for job in reads.stale_claims(queue.sessions, state, now + timedelta(days=3650)):
            claimer = job.claimed_by or ""
            _, _, where = claimer.partition("@")
            parts = where.split(":")
            if len(parts) < 2 or parts[0] != hostname or not parts[1].isdigit():
                continue
            pid, token = int(parts[1]), parts[2] if len(parts) > 2 else ""
            if pid == os.getpid():
                if token == own_token:
                    continue  # our own live claim
            elif _pid_alive(pid):
                continue
            try:
                queue.apply(job.id, t, now=now)
                reclaimed += 1
            except StateConflict:
                continue
    if reclaimed:
        logger.warning(
            "claims of dead processes reclaimed",
            extra=log_fields("scheduler.reclaimed", jobs=reclaimed),
        )
    return reclaimed


class Scheduler:
    """BackgroundScheduler running the periodic jobs."""

    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        index: InstanceIndex,
        spool: Spool,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.index = index
        self.spool = spool
        self.clock = clock
        self._sched: BackgroundScheduler | None = None
        self._running = 0  # periodic jobs running now (stop waits for them, bounded)
        self._idle = threading.Condition()
        self._stopped = False  # a job the executor starts after stop() does nothing
        self.leadership: Leadership | None = None

    @property
    def active(self) -> bool:
        """Whether this scheduler holds the leadership (others stand by)."""
        return self.leadership is None or self.leadership.acquire()

    def tick(self) -> None:
        """One pass of every periodic job except purge (also used by tests)."""
        if not self.active:
            return
        s = self.settings.scheduler
        now = self.clock.now()
        close_early_studies(self.queue, self.settings.routes, now, s)
        close_quiet_studies(self.queue, self.settings.routes, now, s.study_quiet_seconds)
        reap_stale(self.queue, now, s.stale_claim_seconds)

    def tick_early(self) -> None:
        """Only the early close (run when a sender released an association)."""
        if not self.active:
            return
        close_early_studies(
            self.queue, self.settings.routes, self.clock.now(), self.settings.scheduler
        )

    def wake(self) -> None:
        """Run the early close now, and again once the release grace has passed."""
        sched = self._sched
        s = self.settings.scheduler
        if sched is None or not s.early_close:
            return
        now = datetime.now(UTC)
        sched.add_job(
            self._safe(self.tick_early), "date", run_date=now, id="wake", replace_existing=True
        )
        if s.release_grace_seconds > 0:
            sched.add_job(
                self._safe(self.tick_early),
                "date",
                run_date=now + timedelta(seconds=s.release_grace_seconds + 0.05),
                id="wake-grace",
                replace_existing=True,
            )

    def _safe(self, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with self._idle:
                if self._stopped:
                    return
                self._running += 1
            try:
                fn()
            except Exception:
                logger.exception("periodic job failed", extra=log_fields("scheduler.error"))
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()

        return run

    def start(self) -> None:
        """Start the periodic jobs."""
        s = self.settings.scheduler
        with self._idle:
            self._stopped = False
        sched = BackgroundScheduler(
            timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1}
        )
        sched.add_job(self._safe(self.tick), "interval", seconds=s.poll_seconds, id="tick")
        sched.add_job(
            self._safe(
                lambda: (
                    self.active
                    and purge_finished(
                        self.index, self.spool, self.clock.now(), self.settings.spool.retention_days
                    )
                )
            ),
            "interval",
            seconds=s.purge_interval_seconds,
            id="purge",
        )
        # copies a receiver process left behind (it died before flushing their files)
        sched.add_job(
            self._safe(
                lambda: restore_copies(
                    self.index, self.clock.now() - timedelta(seconds=COPY_MAX_AGE_SECONDS)
                )
            ),
            "interval",
            seconds=COPY_MAX_AGE_SECONDS,
            id="copies",
        )
        sched.start()
        self._sched = sched

    def stop(self, timeout: float = 10.0) -> None:
        """Stop, and wait (bounded) for a running job: it holds a database connection, and
        the daemon disposes of the engine next."""
        with self._idle:
            self._stopped = True
        if self._sched is not None:
            self._sched.shutdown(wait=False)
            self._sched = None
            with self._idle:
                self._idle.wait_for(lambda: self._running == 0, timeout)
        if self.leadership is not None:
            self.leadership.release()
