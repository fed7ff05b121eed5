"""Reading, decoding and preprocessing a job's images in a pool of processes.

The worker thread hands the file paths of a job to :class:`DecodePool`; each process reads a
file with pydicom and calls the same preprocessing function the worker thread would
(:func:`dicomai.inference.preprocessor_for`), so the model input is identical. The worker
thread meanwhile reads the headers it needs for routing the results, and the model (on the
GPU) is not left waiting for one thread's decoding.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomai.config import PreprocessingSettings
from dicomai.errors import Interrupted, UnsupportedInput
from dicomai.findings import Task
from dicomai.logs import log_fields

__all__ = ["DecodePool", "PreparedInputs", "prepare_file"]

logger = logging.getLogger(__name__)

#: How often a wait for a decode result looks at ``should_stop``.
_STOP_POLL_SECONDS = 0.1

#: ``("ok", input)`` or ``("unsupported", message)``.
Prepared = tuple[str, np.ndarray | str]


def _init_process() -> None:
    """Per process: one torch thread (the pool is the parallelism), no inherited signals."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool
    torch.set_num_threads(1)


def _ready() -> int:
    """A no-op run once per process at start, so the first job does not pay for imports."""
    return 0


def prepare_file(path: str, task: str, pre: PreprocessingSettings) -> Prepared:
    """Read ``path`` and return its model input for ``task`` (run in a pool process).

    Returns
    -------
    tuple
        ``("ok", float32 array [C, S, S])``, or ``("unsupported", message)`` where the
        in-thread preprocessing raises :class:`UnsupportedInput`. Other errors (a missing or
        unreadable file) are raised.
    """
    from dicomai.inference import preprocessor_for

    ds = pydicom.dcmread(path)
    try:
        return "ok", preprocessor_for(Task(task))(ds, pre)
    except UnsupportedInput as exc:
        return "unsupported", str(exc)


class PreparedInputs:
    """The pending model inputs of one job, usable as ``analyse(..., preprocess=...)``.

    Parameters
    ----------
    datasets
        The job's instances, in the order their paths were submitted.
    futures
        One future per dataset, from :meth:`DecodePool.submit`.
    should_stop
        Checked while waiting; True raises :class:`Interrupted`.
    """

    def __init__(self, datasets: Sequence[Dataset], futures: Sequence[Future[Prepared]],
                 should_stop: Callable[[], bool] | None = None) -> None:
        if len(datasets) != len(futures):
            raise ValueError('Arguments "datasets" and "futures" must have the same length.')
        self._by_id = {id(ds): fut for ds, fut in zip(datasets, futures, strict=True)}
        self._futures = list(futures)
        self._should_stop = should_stop

    def __call__(self, ds: Dataset, pre: PreprocessingSettings) -> np.ndarray:
        """The model input of ``ds`` (computed with the pool's copy of ``pre``).

        Raises
        ------
        UnsupportedInput
            Where the in-thread preprocessing would.
        KeyError
            ``ds`` is not one of this job's datasets.
        """
        fut = self._by_id[id(ds)]
        while True:
            if self._should_stop is not None and self._should_stop():
                self.cancel()
                raise Interrupted("stopping while decoding")
            try:
                kind, value = fut.result(timeout=_STOP_POLL_SECONDS)
                break
            except TimeoutError:
                continue
        if kind == "unsupported":
            raise UnsupportedInput(str(value))
        assert isinstance(value, np.ndarray)
        return value

    def cancel(self) -> None:
        """Cancel what has not started (after an error or when stopping)."""
        for fut in self._futures:
            fut.cancel()


class DecodePool:
    """A pool of ``processes`` processes preparing model inputs (spawned, not forked: the
    worker process has threads and torch state a fork would copy half-way).

    A process that dies (a decoder crashing on a malformed file) breaks the pool: the jobs
    waiting on it fail and are retried, and the next :meth:`submit` starts a new pool. The
    worker process itself survives, as it would not with that decoder in-thread.

    Parameters
    ----------
    processes
        Number of processes (>= 1).
    """

    def __init__(self, processes: int) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError('Argument "processes" must be an int >= 1.')
        self.processes = processes
        self.restarts = 0  #: pools started again after a process died
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        started = time.monotonic()
        pool = ProcessPoolExecutor(
            max_workers=self.processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_process)
        # Start every process now (imports take seconds), not on the first job.
        for fut in [pool.submit(_ready) for _ in range(self.processes)]:
            fut.result()
        logger.info("decode processes started", extra=log_fields(
            "decode_pool.started", processes=self.processes,
            seconds=round(time.monotonic() - started, 2)))
        return pool

    def submit(self, paths: Sequence[str], task: Task | str,
               pre: PreprocessingSettings) -> list[Future[Prepared]]:
        """Start preparing every file of ``paths``; one future per path, in order."""
        with self._lock:
            try:
                return [self._pool.submit(prepare_file, str(p), str(task), pre) for p in paths]
            except BrokenProcessPool:
                logger.warning("a decode process died; starting new ones", extra=log_fields(
                    "decode_pool.broken", processes=self.processes))
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._start()
                self.restarts += 1
                return [self._pool.submit(prepare_file, str(p), str(task), pre) for p in paths]

    def shutdown(self) -> None:
        """Cancel queued work and stop the processes (waits for running files only)."""
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)
        logger.info("decode processes stopped", extra=log_fields("decode_pool.stopped"))
