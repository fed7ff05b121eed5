"""Worker: claims QUEUED jobs, runs the routed model, writes result objects to the outbox.

What a run's outcome means for the job (retry, backoff, give up, failure notice) is decided by
:mod:`dicomai.jobs.policy`; the result files are written by :mod:`dicomai.inference.outbox`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pydicom
from sqlalchemy.orm import Session, sessionmaker

from dicomai import metrics
from dicomai.config import Settings
from dicomai.db import Job, ResultObject
from dicomai.errors import DicomAIError, Interrupted, PermanentError, StateConflict
from dicomai.inference.batching import SharedBatchers
from dicomai.inference.findings import Task
from dicomai.inference.outbox import failure_notice_rows, notice_destinations, result_rows
from dicomai.inference.prepare import DecodePool, PreparedInputs, renderer
from dicomai.inference.processing import Predictor, analyse
from dicomai.ingest.spool import Spool
from dicomai.jobs import reads
from dicomai.jobs.policy import RetryPolicy, Transition, WorkOutcome, after_work, work_failure
from dicomai.jobs.queue import Queue
from dicomai.jobs.states import JobState
from dicomai.logs import log_fields, uid_ref
from dicomai.models.backend import ModelBackend
from dicomai.models.pool import ModelPool
from dicomai.runtime.clock import Clock
from dicomai.runtime.heap import HeapTrimmer
from dicomai.runtime.scheduler import claimer_name

__all__ = ["Worker"]

logger = logging.getLogger(__name__)

#: Values at least this long are read when used, when decode processes read the pixels.
_DEFER_BYTES = 64 * 1024


class Worker:
    """Runs jobs: QUEUED → RUNNING → OUTBOX (or back to QUEUED / FAILED).

    With ``[worker] max_batch`` > 0, concurrent jobs of one model share model calls through a
    :class:`~dicomai.inference.batching.BatchingPredictor` per model
    (:class:`~dicomai.inference.batching.SharedBatchers`); with ``decode_processes`` > 0 (the
    default), a job's images are read, decoded and preprocessed in a
    :class:`~dicomai.inference.prepare.DecodePool`, within ``decode_memory_mb`` and
    ``decode_timeout_seconds`` per image.
    """

    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        spool: Spool,
        models: ModelPool,
        clock: Clock,
        name: str | None = None,
        model_names: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.spool = spool
        self.models = models
        self.clock = clock
        self.name = name or claimer_name("worker")
        self.model_names = (
            list(model_names) if model_names is not None else settings.served_models()
        )
        w = settings.worker
        self.retry = RetryPolicy(w.max_attempts, w.retry_base_seconds)
        self._stop = threading.Event()
        #: Set by the queue when a job of this process becomes queued, and on stop.
        self._wake = threading.Event()
        queue.subscribe(JobState.QUEUED, self._wake)
        self._threads: list[threading.Thread] = []
        self._batchers = SharedBatchers()
        self.decode_pool: DecodePool | None = None
        #: Gives the memory that decoding and models freed back to the system (glibc keeps
        #: it otherwise, and the resident size creeps up over thousands of studies).
        self.heap = HeapTrimmer()

    # -- loop --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the claim loops in background threads."""
        if self.settings.worker.torch_threads:
            import torch

            torch.set_num_threads(self.settings.worker.torch_threads)
        w = self.settings.worker
        if w.decode_processes and self.decode_pool is None:
            self.decode_pool = DecodePool(
                w.decode_processes,
                memory_mb=w.decode_memory_mb,
                timeout_seconds=w.decode_timeout_seconds,
            )
        for i in range(self.settings.worker.threads):
            t = threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def request_stop(self) -> None:
        """Stop claiming; a running model stops at its next batch and puts its job back."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming and wait (bounded) for the running job; the reaper handles the rest."""
        self._stop.set()
        self._wake.set()
        deadline = self.clock.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - self.clock.monotonic()))
        self._batchers.close(lambda: deadline - self.clock.monotonic())
        if self.decode_pool is not None and not self.busy():
            self.decode_pool.shutdown()
            self.decode_pool = None

    def busy(self) -> bool:
        """Whether a worker thread is still running after :meth:`stop`."""
        return any(t.is_alive() for t in self._threads)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                logger.exception("worker loop error", extra=log_fields("worker.loop_error"))
                worked = False
            if worked:
                self.heap.after_work()
            else:
                self.heap.on_idle()
                self._wake.wait(self.settings.worker.poll_seconds)
                self._wake.clear()

    def run_once(self) -> bool:
        """Claim and run one job; False when nothing was due."""
        # A job whose model is still loading stays queued (the receiver does not wait for it).
        ready = [n for n in self.model_names if not self.models.waiting(n)]
        if not ready:
            return False
        job = self.queue.claim_next(
            JobState.QUEUED, JobState.RUNNING, self.name, self.clock.now(), models=ready
        )
        if job is None:
            return False
        self.run_job(job)
        return True

    # -- one job -----------------------------------------------------------------------
    def run_job(self, job: Job) -> None:
        """Run a claimed (RUNNING) job; the policy chooses OUTBOX, a retry or FAILED."""
        beat_stop = threading.Event()
        beater = threading.Thread(target=self._beat, args=(job.id, beat_stop), daemon=True)
        beater.start()
        try:
            self._run(job)
        except StateConflict:
            logger.warning("job taken away", extra=log_fields("job.lost_claim", job_id=job.id))
        except Interrupted:
            # Shutting down mid-run: the job goes back without counting the attempt.
            with contextlib.suppress(StateConflict):
                self._settle(job, WorkOutcome.STOPPED)
        except PermanentError as exc:
            self._settle(job, WorkOutcome.PERMANENT, str(exc), type(exc).__name__)
        except Exception as exc:
            logger.exception("job failed", extra=log_fields("job.error", job_id=job.id))
            # Library exception texts may quote dataset values: keep only their type name.
            reason = (
                f"{type(exc).__name__}: {exc}"
                if isinstance(exc, DicomAIError)
                else type(exc).__name__
            )[:500]
            self._settle(job, WorkOutcome.ERROR, reason)
        finally:
            beat_stop.set()

    def _beat(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(self.settings.worker.heartbeat_seconds):
            try:
                self.queue.heartbeat_job(job_id, self.name, self.clock.now())
            except Exception:
                logger.warning(
                    "heartbeat failed", extra=log_fields("job.heartbeat_failed", job_id=job_id)
                )

    def _apply(
        self, job_id: int, t: Transition, rows: Sequence[ResultObject] = (), **data: Any
    ) -> None:
        """Make the policy's move, with the job's new result rows in the same transaction."""
        now = self.clock.now()
        if not rows:
            self.queue.apply(job_id, t, now=now, **data)
            return
        with self.queue.session() as s, s.begin():
            self.queue.add_results(job_id, rows, session=s)
            self.queue.apply(job_id, t, now=now, session=s, **data)

    def _settle(
        self, job: Job, outcome: WorkOutcome, error: str = "", error_type: str = ""
    ) -> None:
        """Move a job whose run did not write results, as the policy decides: back to QUEUED
        (stopped, or a retry after backoff), FAILED, or OUTBOX with failure notices."""
        failure = work_failure(
            outcome, attempts=job.attempts, retry=self.retry, error=error, error_type=error_type
        )
        rows: list[ResultObject] = []
        if failure is not None:
            logger.error(
                "job failed for good",
                extra=log_fields("job.failed", job_id=job.id, reason=failure.code),
            )
            rows = self._failure_notices(job, failure.code)
        t = after_work(
            outcome,
            attempts=job.attempts,
            retry=self.retry,
            error=error,
            error_type=error_type,
            with_notice=bool(rows),
        )
        if failure is None:  # a lost claim here reaches the loop's log
            self._apply(job.id, t)
            if outcome is WorkOutcome.ERROR:
                logger.warning(
                    "job retry scheduled",
                    extra=log_fields("job.retry_scheduled", job_id=job.id, attempt=job.attempts),
                )
            return
        with contextlib.suppress(StateConflict):
            self._apply(job.id, t, rows)

    def _failure_notices(self, job: Job, code: str) -> list[ResultObject]:
        """Failure notices for the destinations that want one (none if they cannot be built)."""
        try:
            wanted = notice_destinations(self.settings, job)
            if not wanted:
                return []
            sources = [
                pydicom.dcmread(p, stop_before_pixels=True)
                for p in _source_paths(self.queue.sessions, job)
            ]
            loaded = self.models.loaded().get(job.model or "")
            identity = loaded.identity if loaded is not None else None
            return failure_notice_rows(
                self.settings, self.spool, job, wanted, sources, identity, code
            )
        except Exception:
            logger.exception(
                "could not build failure notice",
                extra=log_fields("job.notice_failed", job_id=job.id),
            )
            return []

    @contextmanager
    def _predictor(self, name: str, backend: ModelBackend) -> Iterator[Predictor]:
        """The backend itself, or with ``max_batch`` set, this job's view of the model's
        shared batcher (a new one when the model was swapped by a reload)."""
        w = self.settings.worker
        if not w.max_batch:
            yield backend
            return
        batcher = self._batchers.get(
            name, backend, max_batch=w.max_batch, max_wait_ms=w.batch_wait_ms
        )
        with batcher.session(self._stop.is_set) as bound:
            yield bound

    def _run(self, job: Job) -> None:
        if not job.model:
            raise PermanentError(f"job {job.id} has no model")
        spec = self.settings.model_settings(job.model)
        started = self.clock.now()
        t0 = time.perf_counter()
        backend = self.models.get(job.model)
        paths = _source_paths(self.queue.sessions, job)
        pool = self.decode_pool
        futures = pool.submit(paths, spec.task, spec.preprocessing) if pool else None
        prepared: PreparedInputs | None = None
        try:
            # With decode processes, values as large as pixel data are read from the file
            # only if used here: decoding and the key images' pictures happen in the decode
            # processes, so this process reads the headers only.
            datasets = [
                pydicom.dcmread(p, defer_size=_DEFER_BYTES if pool else None) for p in paths
            ]
            if futures is not None:
                prepared = PreparedInputs(datasets, futures, self._stop.is_set)
            with self._predictor(job.model, backend) as predictor:
                findings = analyse(
                    Task(spec.task),
                    datasets,
                    predictor,
                    spec,
                    started,
                    should_stop=self._stop.is_set,
                    preprocess=prepared,
                )
        finally:
            for fut in futures or ():
                fut.cancel()  # only what has not started: after an error or interruption
        # Key images for the Secondary Captures are drawn in the decode processes too.
        render = renderer(pool, datasets, paths, self._stop.is_set) if pool else None
        rows = result_rows(
            self.settings,
            self.spool,
            job,
            datasets,
            findings,
            previous_sr_refs=_previous_sr_refs(self.queue.sessions, job),
            render=render,
        )
        elapsed = time.perf_counter() - t0
        t = after_work(WorkOutcome.ANALYSED, attempts=job.attempts, retry=self.retry)
        self._apply(
            job.id,
            t,
            rows,
            findings=findings.summary(),
            inference_seconds=round(elapsed, 3),
        )
        metrics.observe_job("inference", job.model, elapsed)
        logger.info(
            "job analysed",
            extra=log_fields(
                "job.analysed",
                job_id=job.id,
                model=job.model,
                images=len(datasets),
                objects=len(rows),
                seconds=round(elapsed, 3),
                positive=len(findings.positive_labels),
                study=uid_ref(datasets[0].StudyInstanceUID if datasets else ""),
            ),
        )


def _source_paths(sessions: sessionmaker[Session], job: Job) -> list[str]:
    """The files of the series the job's route chose, up to the job's generation."""
    rows = reads.study_instances(sessions, job.study_id, job.generation)
    wanted = set(job.series_uids)
    return [r.path for r in rows if r.series_instance_uid in wanted]


def _previous_sr_refs(sessions: sessionmaker[Session], job: Job) -> list[tuple[str, str, str, str]]:
    """(study, series, SOP class, SOP instance) of the SRs earlier generations of the study
    produced, newest first: the new SR names them as predecessors."""
    study_uid = reads.study_uid(sessions, job.study_id)
    previous = [
        (study_uid, r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid)
        for r in reads.previous_results(sessions, job.study_id, job.generation)
        if r.kind == "sr"
    ]
    return list(dict.fromkeys(previous))
