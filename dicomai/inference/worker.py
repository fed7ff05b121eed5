"""Worker: claims QUEUED jobs, runs the routed model, writes result objects to the outbox."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

from dicomai import metrics
from dicomai.config import DestinationSettings, Settings
from dicomai.db import ResultObject
from dicomai.errors import DicomAIError, Interrupted, PermanentError, StateConflict
from dicomai.inference.batching import BatchingPredictor
from dicomai.inference.findings import ModelIdentity, Task
from dicomai.inference.prepare import DecodePool, PreparedInputs, renderer
from dicomai.inference.processing import Predictor, analyse
from dicomai.ingest.spool import Spool
from dicomai.jobs.queue import Queue, RetryPolicy
from dicomai.jobs.states import JobState, ResultState
from dicomai.logs import log_fields, uid_ref
from dicomai.models.backend import ModelBackend, TorchScriptBackend
from dicomai.models.reference import ensure_model_file
from dicomai.models.registry import ModelRegistry
from dicomai.results import ResultOptions, build_failure_notice, build_results
from dicomai.runtime.heap import HeapTrimmer
from dicomai.runtime.scheduler import claimer_name

__all__ = ["ModelPool", "Worker", "options_for"]

logger = logging.getLogger(__name__)

#: Values at least this long are read when used, when decode processes read the pixels.
_DEFER_BYTES = 64 * 1024


def options_for(dest: DestinationSettings) -> ResultOptions:
    """Result flavour a destination asked for."""
    return ResultOptions(
        sr_sop_class=dest.sr_sop_class,
        emit_sc=dest.emit_sc,
        emit_text_sr=dest.emit_text_sr,
        emit_ko=dest.emit_ko,
        emit_seg=dest.emit_seg,
        sc_heatmap=dest.sc_heatmap,
    )


class ModelPool:
    """The configured models: builds missing reference models, then loads each once and keeps
    it warm (a :class:`ModelRegistry` underneath).

    ``dicomai serve`` loads them in the background (:meth:`start_loading`), so that the
    receiver stores studies from its first second; a worker claims a job only once its model
    is loaded (:meth:`waiting`), and jobs meanwhile stay queued. A model that fails to load is
    tried again with backoff (``[worker] model_retry_seconds``, doubling, at most 10 min) and
    reported in the heartbeat (``dicomai status``).
    """

    _RETRY_MAX = 600.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._registry = ModelRegistry()
        self._lock = threading.Lock()
        self._background: list[str] = []  # names start_loading() was asked to load
        self._errors: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_loading(self, names: Sequence[str]) -> None:
        """Load ``names`` one after the other in a background thread (returns at once)."""
        self._background = [n for n in dict.fromkeys(names) if n not in self._registry]
        if not self._background:
            return
        self._thread = threading.Thread(
            target=self._load_in_background, name="model-loader", daemon=True
        )
        self._thread.start()

    def _load_in_background(self) -> None:
        pending = list(self._background)
        delay = self.settings.worker.model_retry_seconds
        while pending and not self._stop.is_set():
            for name in list(pending):
                if self._stop.is_set():
                    return
                try:
                    self.get(name)
                except Exception as exc:  # any failure: report, keep its jobs queued, retry
                    self._errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                    logger.error(
                        "model could not be loaded; its studies wait",
                        extra=log_fields(
                            "model.load_failed",
                            model=name,
                            error=self._errors[name],
                            retry_seconds=delay,
                        ),
                    )
                else:
                    pending.remove(name)
                    self._errors.pop(name, None)
            if pending:
                self._stop.wait(delay)
                delay = min(2 * delay, self._RETRY_MAX)

    def waiting(self, name: str) -> bool:
        """Whether ``name`` is being loaded in the background and is not ready yet."""
        return name in self._background and name not in self._registry

    def states(self) -> dict[str, dict[str, str]]:
        """``{name: {"state": "loading" | "failed", "error": ...}}`` of models not ready."""
        out = {}
        for name in self._background:
            if name not in self._registry:
                error = self._errors.get(name)
                out[name] = {"state": "failed", "error": error} if error else {"state": "loading"}
        return out

    def stop(self, timeout: float = 5.0) -> None:
        """Stop background loading (a load in progress finishes on its own thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def get(self, name: str) -> ModelBackend:
        """The loaded backend of model ``name``.

        Raises
        ------
        ModelLoadError
            The file is missing (and not a reference model), unreadable or fails its checksum.
        """
        if name in self._registry:
            return self._registry.get(name)
        with self._lock:
            spec = self.settings.model_settings(name)
            path = self.settings.model_path(name)
            if ensure_model_file(name, path):
                logger.info(
                    "reference model built",
                    extra=log_fields("model.built", model=name, path=str(path)),
                )
            backend = self._registry.load(
                name,
                path=path,
                version=spec.version,
                sha256=spec.sha256 or None,
                device=spec.device,
                labels=tuple(spec.labels) or None,
                task=spec.task,
                body_part=spec.body_part,
                warmup_size=spec.preprocessing.input_size,
                precision=spec.precision,
            )
            ident = backend.identity
            logger.info(
                "model loaded",
                extra=log_fields(
                    "model.loaded",
                    model=name,
                    version=ident.version,
                    sha256=ident.sha256,
                    device=backend.device,
                ),
            )
            return backend

    def reload(self, settings: Settings) -> list[str]:
        """Adopt new settings; models whose file or options changed are loaded anew *before*
        the old backend is released. Returns the names of the models swapped."""
        old, self.settings = self.settings, settings
        swapped = []
        for name in self._registry.loaded():
            if name not in settings.models:
                continue
            if _load_key(old, name) == _load_key(settings, name):
                continue  # thresholds and preprocessing apply per job without a reload
            spec, path = settings.model_settings(name), settings.model_path(name)
            ensure_model_file(name, path)
            backend = TorchScriptBackend.load(
                path,
                name=name,
                version=spec.version,
                expected_sha256=spec.sha256 or None,
                device=spec.device,
                labels=tuple(spec.labels) or None,
                task=spec.task,
                body_part=spec.body_part,
                warmup_size=spec.preprocessing.input_size,
                precision=spec.precision,
            )
            self._registry.replace(name, backend)
            swapped.append(name)
            logger.info(
                "model swapped",
                extra=log_fields(
                    "model.swapped",
                    model=name,
                    version=spec.version,
                    sha256=backend.identity.sha256,
                ),
            )
        return swapped

    def loaded(self) -> dict[str, ModelBackend]:
        """Snapshot of the loaded models."""
        return {name: self._registry.get(name) for name in self._registry.loaded()}


def _load_key(settings: Settings, name: str) -> tuple[object, ...]:
    """What a loaded model depends on (thresholds and the like apply per job)."""
    m = settings.model_settings(name)
    return (
        settings.model_path(name),
        m.version,
        m.sha256,
        m.device,
        tuple(m.labels),
        m.task,
        m.preprocessing.input_size,
        m.precision,
    )


class Worker:
    """Runs jobs: QUEUED → RUNNING → OUTBOX (or back to QUEUED / FAILED).

    With ``[worker] max_batch`` > 0, concurrent jobs of one model share model calls through a
    :class:`~dicomai.inference.batching.BatchingPredictor` per model; with ``decode_processes``
    > 0 (the
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
        clock: Callable[[], datetime],
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
        self.policy = RetryPolicy(w.max_attempts, w.retry_base_seconds)
        self._stop = threading.Event()
        #: Set by the queue when a job of this process becomes queued, and on stop.
        self._wake = threading.Event()
        queue.subscribe(JobState.QUEUED, self._wake)
        self._threads: list[threading.Thread] = []
        self._batchers: dict[str, BatchingPredictor] = {}
        self._batchers_lock = threading.Lock()
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
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._batchers_lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:  # runs what is pending; later calls go to the model directly
            batcher.close(max(0.0, deadline - time.monotonic()))
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
            JobState.QUEUED, JobState.RUNNING, self.name, self.clock(), models=ready
        )
        if job is None:
            return False
        self.run_job(job.id)
        return True

    # -- one job -----------------------------------------------------------------------
    def run_job(self, job_id: int) -> None:
        """Run a claimed (RUNNING) job to OUTBOX, or schedule a retry, or fail it."""
        job = self.queue.get_job(job_id)
        beat_stop = threading.Event()
        beater = threading.Thread(target=self._beat, args=(job_id, beat_stop), daemon=True)
        beater.start()
        try:
            self._run(job_id)
        except StateConflict:
            logger.warning("job taken away", extra=log_fields("job.lost_claim", job_id=job_id))
        except Interrupted:
            # Shutting down mid-run: put the job back without counting the attempt.
            try:
                self.queue.transition(
                    job_id,
                    JobState.RUNNING,
                    JobState.QUEUED,
                    reason="worker.stopping",
                    now=self.clock(),
                    attempts=max(0, job.attempts - 1),
                    claimed_by=None,
                )
            except StateConflict:
                pass
        except PermanentError as exc:
            self._fail(job_id, f"permanent.{type(exc).__name__}", str(exc))
        except Exception as exc:
            logger.exception("job failed", extra=log_fields("job.error", job_id=job_id))
            # Library exception texts may quote dataset values: keep only their type name.
            reason = (
                f"{type(exc).__name__}: {exc}"
                if isinstance(exc, DicomAIError)
                else type(exc).__name__
            )[:500]
            if job.attempts >= self.policy.max_attempts:
                self._fail(job_id, "attempts_exhausted", reason)
            else:
                now = self.clock()
                self.queue.transition(
                    job_id,
                    JobState.RUNNING,
                    JobState.QUEUED,
                    reason="retry.error",
                    now=now,
                    not_before=now + self.policy.delay(job.attempts),
                    last_error=reason,
                    claimed_by=None,
                )
                logger.warning(
                    "job retry scheduled",
                    extra=log_fields("job.retry_scheduled", job_id=job_id, attempt=job.attempts),
                )
        finally:
            beat_stop.set()

    def _beat(self, job_id: int, stop: threading.Event) -> None:
        while not stop.wait(self.settings.worker.heartbeat_seconds):
            try:
                self.queue.heartbeat_job(job_id, self.name, self.clock())
            except Exception:
                logger.warning(
                    "heartbeat failed", extra=log_fields("job.heartbeat_failed", job_id=job_id)
                )

    def _fail(self, job_id: int, code: str, message: str) -> None:
        """RUNNING → FAILED; or → OUTBOX with a failure notice when a destination wants one."""
        logger.error(
            "job failed for good", extra=log_fields("job.failed", job_id=job_id, reason=code)
        )
        now = self.clock()
        try:
            rows = self._failure_notices(job_id, code)
        except Exception:
            logger.exception(
                "could not build failure notice",
                extra=log_fields("job.notice_failed", job_id=job_id),
            )
            rows = []
        try:
            if not rows:
                self.queue.transition(
                    job_id,
                    JobState.RUNNING,
                    JobState.FAILED,
                    reason=code,
                    now=now,
                    last_error=message[:500],
                )
                return
            with self.queue.session() as s, s.begin():
                self.queue.add_results(job_id, rows, session=s)
                self.queue.transition(
                    job_id,
                    JobState.RUNNING,
                    JobState.OUTBOX,
                    reason=f"{code}.notice",
                    now=now,
                    session=s,
                    last_error=message[:500],
                    claimed_by=None,
                    not_before=None,
                    findings={"failure_notice": True, "reason": code},
                )
        except StateConflict:
            pass

    def _failure_notices(self, job_id: int, code: str) -> list[ResultObject]:
        job = self.queue.get_job(job_id)
        wanted = [d for d in job.destinations if self.settings.destination(d).emit_failure_notice]
        if not wanted or not job.model:
            return []
        rows = self.queue.study_instances(job.study_id, up_to_generation=job.generation)
        uids = set(job.series_uids)
        sources = [
            pydicom.dcmread(r.path, stop_before_pixels=True)
            for r in rows
            if r.series_instance_uid in uids
        ]
        if not sources:
            return []
        spec = self.settings.models[job.model]
        loaded = self.models.loaded().get(job.model)
        identity = (
            loaded.identity
            if loaded is not None
            else ModelIdentity(
                name=job.model,
                version=spec.version,
                sha256=spec.sha256 or "unknown",
                task=Task(spec.task),
                architecture="unknown",
                description="model could not be loaded",
                body_part=spec.body_part,
            )
        )
        reason = re.sub(r"[^a-z0-9_]+", "_", code.lower()).strip("_") or "failed"
        out = []
        for dest in wanted:
            notice = build_failure_notice(
                sources, identity, reason, options_for(self.settings.destination(dest))
            )
            path = self.spool.result_path(job_id, f"notice-{notice.SOPInstanceUID}.dcm")
            buf = BytesIO()
            notice.save_as(buf, enforce_file_format=True)
            self.spool.write_atomic(path, buf.getvalue())
            out.append(
                ResultObject(
                    job_id=job_id,
                    destination=dest,
                    kind="notice",
                    sop_class_uid=str(notice.SOPClassUID),
                    sop_instance_uid=str(notice.SOPInstanceUID),
                    series_instance_uid=str(notice.SeriesInstanceUID),
                    path=str(path),
                    state=ResultState.PENDING,
                )
            )
        return out

    def _source_paths(self, job_id: int) -> list[str]:
        job = self.queue.get_job(job_id)
        rows = self.queue.study_instances(job.study_id, up_to_generation=job.generation)
        wanted = set(job.series_uids)
        return [r.path for r in rows if r.series_instance_uid in wanted]

    @contextmanager
    def _predictor(self, name: str, backend: ModelBackend) -> Iterator[Predictor]:
        """The backend itself, or with ``max_batch`` set, this job's view of the model's
        shared batcher (a new one when the model was swapped by a reload)."""
        w = self.settings.worker
        if not w.max_batch:
            yield backend
            return
        retired: BatchingPredictor | None = None
        with self._batchers_lock:
            batcher = self._batchers.get(name)
            if batcher is None or batcher.backend is not backend or batcher.closed:
                retired = batcher
                batcher = BatchingPredictor(
                    backend, max_batch=w.max_batch, max_wait_ms=w.batch_wait_ms, name=name
                )
                self._batchers[name] = batcher
                logger.info(
                    "batcher started",
                    extra=log_fields(
                        "batching.started",
                        model=name,
                        max_batch=w.max_batch,
                        wait_ms=w.batch_wait_ms,
                    ),
                )
            else:
                batcher.configure(max_batch=w.max_batch, max_wait_ms=w.batch_wait_ms)
        if retired is not None:
            retired.close(timeout=0)  # drains in its own thread; holders fall back to direct
        with batcher.session(self._stop.is_set) as bound:
            yield bound

    def _run(self, job_id: int) -> None:
        job = self.queue.get_job(job_id)
        if not job.model:
            raise PermanentError(f"job {job_id} has no model")
        spec = self.settings.model_settings(job.model)
        started = self.clock()
        t0 = time.perf_counter()
        backend = self.models.get(job.model)
        paths = self._source_paths(job_id)
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
        previous = [
            (self.queue.study_uid(job), r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid)
            for r in self.queue.previous_results(job.study_id, job.generation)
            if r.kind == "sr"
        ]
        previous = list(dict.fromkeys(previous))
        rows: list[ResultObject] = []
        built: dict[ResultOptions, list[tuple[str, Dataset, str]]] = {}
        configured = {d.name for d in self.settings.destinations}
        for dest_name in job.destinations:
            if dest_name not in configured:  # removed by a configuration reload
                logger.warning(
                    "destination no longer configured",
                    extra=log_fields(
                        "job.destination_missing", job_id=job_id, destination=dest_name
                    ),
                )
                continue
            options = options_for(self.settings.destination(dest_name))
            if options not in built:
                objects = build_results(
                    datasets, findings, options, previous_sr_refs=previous, render=render
                )
                files = []
                for index, ds in enumerate(objects):
                    kind = _kind(ds)
                    path = self.spool.result_path(job_id, f"{kind}-{index}-{ds.SOPInstanceUID}.dcm")
                    buf = BytesIO()
                    ds.save_as(buf, enforce_file_format=True)
                    self.spool.write_atomic(path, buf.getvalue())
                    files.append((kind, ds, str(path)))
                built[options] = files
            for kind, ds, written in built[options]:
                rows.append(
                    ResultObject(
                        job_id=job_id,
                        destination=dest_name,
                        kind=kind,
                        sop_class_uid=str(ds.SOPClassUID),
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        series_instance_uid=str(ds.SeriesInstanceUID),
                        path=written,
                        state=ResultState.PENDING,
                    )
                )
        elapsed = time.perf_counter() - t0
        with self.queue.session() as s, s.begin():
            self.queue.add_results(job_id, rows, session=s)
            self.queue.transition(
                job_id,
                JobState.RUNNING,
                JobState.OUTBOX,
                reason="results.written",
                now=self.clock(),
                session=s,
                findings=findings.summary(),
                inference_seconds=round(elapsed, 3),
                claimed_by=None,
                not_before=None,
            )
        metrics.observe_job("inference", job.model, elapsed)
        logger.info(
            "job analysed",
            extra=log_fields(
                "job.analysed",
                job_id=job_id,
                model=job.model,
                images=len(datasets),
                objects=len(rows),
                seconds=round(elapsed, 3),
                positive=len(findings.positive_labels),
                study=uid_ref(datasets[0].StudyInstanceUID if datasets else ""),
            ),
        )


def _kind(ds: Dataset) -> str:
    modality = str(ds.get("Modality", ""))
    if modality == "SR":
        return "text-sr" if ds.SOPClassUID == pydicom.uid.BasicTextSRStorage else "sr"
    if modality == "KO":
        return "ko"
    if modality == "SEG":
        return "seg"
    return "sc"
