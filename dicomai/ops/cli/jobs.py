"""`dicomai retry` and `dicomai cancel`: operator actions on jobs named by id or study."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from dicomai.jobs.states import JobState
from dicomai.ops.cli.common import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, settings_from

if TYPE_CHECKING:
    from dicomai.db import Job
    from dicomai.jobs.queue import Queue

__all__ = ["cmd_cancel", "cmd_retry"]


def _on_jobs(args: argparse.Namespace, action: Callable[[Queue, Job, datetime], str]) -> int:
    """Apply ``action(queue, job, now) -> message`` to the jobs named by --job/--study/
    --all-failed; a StateConflict is reported and makes the exit code 1."""
    from dicomai.db import make_engine, make_session_factory, utcnow
    from dicomai.errors import StateConflict
    from dicomai.jobs import reads
    from dicomai.jobs.queue import Queue
    from dicomai.migrations import upgrade

    engine = make_engine(settings_from(args).database_url)
    problems = 0
    try:
        upgrade(engine)
        sessions = make_session_factory(engine)
        queue = Queue(sessions)
        states = [JobState.FAILED] if getattr(args, "all_failed", False) else []
        jobs = reads.jobs_for(
            sessions, job_ids=args.job or [], study_uids=args.study or [], states=states
        )
        if not jobs:
            print("no matching job", file=sys.stderr)
            return EXIT_RUNTIME
        for job in jobs:
            try:
                print(action(queue, job, utcnow()))
            except StateConflict as exc:
                print(f"job {job.id}: {exc}; left alone", file=sys.stderr)
                problems += 1
    finally:
        engine.dispose()
    return EXIT_RUNTIME if problems else EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Send failed jobs round again (re-send results, or re-run the analysis)."""
    if not (args.job or args.study or args.all_failed):
        print("dicomai retry: give --job, --study or --all-failed", file=sys.stderr)
        return EXIT_USAGE
    return _on_jobs(
        args,
        lambda queue, job, now: (
            f"job {job.id}: {JobState.FAILED.value} -> {queue.retry(job.id, now).value}"
        ),
    )


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel queued, outbox or failed jobs."""
    if not (args.job or args.study):
        print("dicomai cancel: give --job or --study", file=sys.stderr)
        return EXIT_USAGE

    def cancel(queue: Queue, job: Job, now: datetime) -> str:
        queue.cancel(job.id, now)
        return f"job {job.id}: {job.state} -> {JobState.CANCELLED.value}"

    return _on_jobs(args, cancel)
