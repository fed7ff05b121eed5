"""Reading, decoding and preprocessing a job's images in separate processes, within limits.

The worker thread hands the file paths of a job to :class:`DecodePool`; a decode process
reads a file with pydicom and calls the same preprocessing function the worker thread would
(:func:`dicomai.inference.processing.preprocessor_for`), so the model input is identical. The worker
thread meanwhile reads the headers it needs for routing the results, and the model (on the
GPU) is not left waiting for one thread's decoding. The pictures of the key images for the
Secondary Captures are drawn there too (:func:`renderer`), so that the worker's process
decodes no pixel data at all.

Decoding is where a file's content turns into memory and time: a frame whose header and
codestream agree on a size the receiver allows can still need gigabytes, and a decoder can
loop or crash on a malformed stream. In a decode process that costs the process, not the
daemon:

- its data segment is limited (``RLIMIT_DATA``) to what it holds once started plus
  ``[worker] decode_memory_mb``: an allocation beyond fails with ``MemoryError``, the image's
  job fails with :class:`~dicomai.errors.DecodeOverBudget` (permanent: the same image needs
  the same memory again), and the process goes on with the next image;
- an image that takes longer than ``[worker] decode_timeout_seconds``, or a process that dies
  (a decoder crashing, the kernel's OOM killer), fails the waiting image's job with
  :class:`~dicomai.errors.DecodeFailed` (retried as any transient error); the process is
  killed and replaced, and later jobs are served by the new one.

Processes start once, when the pool is created (in the background: imports take seconds),
and again only to replace one that died or was killed.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicomai.config import PreprocessingSettings
from dicomai.errors import DecodeFailed, DecodeOverBudget, Interrupted, UnsupportedInput
from dicomai.inference.decode_process import Prepared, serve
from dicomai.inference.findings import Task
from dicomai.logs import log_fields

__all__ = ["DecodePool", "PreparedInputs", "renderer"]

logger = logging.getLogger(__name__)

#: How often a wait for a decode result looks at ``should_stop``.
_STOP_POLL_SECONDS = 0.1
#: How long a new decode process may take to import its libraries and say it is ready.
_START_SECONDS = 300.0


@dataclass
class _Request:
    future: Future[Prepared]
    #: ``(kind, *arguments)`` as :func:`dicomai.inference.decode_process.serve` takes it.
    message: tuple[Any, ...]


class _Slot:
    """One decode process and the thread that feeds it requests from the pool's queue."""

    def __init__(self, pool: DecodePool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: Any = None
        self.conn: Connection | None = None
        self.thread = threading.Thread(target=self._run, name=f"decode-{index}", daemon=True)

    # -- process -----------------------------------------------------------------------
    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=serve,
            args=(child, self.pool.memory_mb),
            name=f"dicomai-decode-{self.index}",
            daemon=True,
        )
        started = time.monotonic()
        process.start()
        child.close()
        try:
            if not parent.poll(_START_SECONDS):
                raise DecodeFailed("a decode process did not start")
            parent.recv()
        except (EOFError, OSError) as exc:
            process.join(1.0)
            raise DecodeFailed(
                f"a decode process died while starting (exit code {process.exitcode})"
            ) from exc
        except DecodeFailed:
            process.kill()
            process.join(5.0)
            raise
        self.process, self.conn = process, parent
        logger.info(
            "decode process started",
            extra=log_fields(
                "decode_pool.process_started",
                slot=self.index,
                pid=process.pid,
                seconds=round(time.monotonic() - started, 2),
                memory_mb=self.pool.memory_mb,
            ),
        )

    def _stop_process(self, kill: bool) -> None:
        process, conn = self.process, self.conn
        self.process = self.conn = None
        if conn is not None:
            if not kill:
                with contextlib.suppress(OSError, ValueError):
                    conn.send(None)
            conn.close()
        if process is not None:
            if kill:
                process.kill()
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)

    def _replace(self, why: str) -> None:
        """Kill the process (it died, overran or broke its pipe); the next request starts a
        new one."""
        process = self.process
        exitcode = process.exitcode if process is not None else None
        self._stop_process(kill=True)
        with self.pool._lock:
            self.pool.restarts += 1
        logger.warning(
            "decode process replaced",
            extra=log_fields(
                "decode_pool.replaced", slot=self.index, reason=why, exit_code=exitcode
            ),
        )

    # -- loop --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._start()
        except DecodeFailed:
            logger.exception(
                "decode process failed to start",
                extra=log_fields("decode_pool.start_failed", slot=self.index),
            )
        while True:
            request = self.pool._requests.get()
            if request is None:
                break
            if not request.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                request.future.set_result(self._serve(request))
            except BaseException as exc:  # every failure goes to the waiting job
                request.future.set_exception(exc)
        self._stop_process(kill=False)

    def _ended(self) -> bool:
        """Whether the process has exited (its sentinel is readable: this does not depend on
        who reaps it)."""
        return self.process is None or bool(wait([self.process.sentinel], timeout=0))

    def _serve(self, request: _Request) -> Prepared:
        if self._ended():
            if self.process is not None:
                self._replace("died while idle")
            self._start()
        assert self.conn is not None
        try:
            self.conn.send(request.message)
        except (OSError, ValueError):  # it died since: once more with a new process
            self._replace("pipe broken")
            self._start()
            assert self.conn is not None
            self.conn.send(request.message)
        timeout = self.pool.timeout_seconds
        conn = self.conn  # shutdown() may close it from another thread meanwhile
        try:
            ready = conn.poll(timeout)
            answer = conn.recv() if ready else None
        except (EOFError, OSError, ValueError):
            if self.pool._closed:
                raise DecodeFailed("the decode pool was shut down while decoding") from None
            process = self.process
            if process is not None:
                process.join(1.0)  # its exit code, for the error
            exitcode = process.exitcode if process is not None else None
            self._replace("died")
            raise DecodeFailed(
                f"the decode process died while decoding an image (exit code {exitcode}); "
                "it was replaced"
            ) from None
        if answer is None:
            self._replace("timeout")
            raise DecodeFailed(
                f"decoding an image took more than {timeout:g} s ([worker] "
                "decode_timeout_seconds); the decode process was replaced"
            )
        kind, value = answer
        if kind == "memory":
            raise DecodeOverBudget(
                f"decoding an image needed more than {self.pool.memory_mb} MB ([worker] "
                "decode_memory_mb)"
            )
        if kind == "error":
            raise DecodeFailed(f"decoding an image failed ({value})")
        return kind, value


def _result(
    fut: Future[Prepared], should_stop: Callable[[], bool] | None, on_stop: Callable[[], object]
) -> np.ndarray:
    """The array ``fut`` gives, waiting while ``should_stop`` says no (else ``on_stop`` and
    :class:`Interrupted`); ``UnsupportedInput`` where the work found the input unusable."""
    while True:
        if should_stop is not None and should_stop():
            on_stop()
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


def renderer(
    pool: DecodePool,
    datasets: Sequence[Dataset],
    paths: Sequence[str],
    should_stop: Callable[[], bool] | None = None,
) -> Callable[[Dataset, int], np.ndarray]:
    """A :data:`~dicomai.results.sc.Renderer` that draws the key images of a job (its
    ``datasets``, read from ``paths``) in the pool's processes, within their limits, instead
    of decoding them in the worker's process."""
    by_id = {id(ds): str(path) for ds, path in zip(datasets, paths, strict=True)}

    def render(src: Dataset, frame: int) -> np.ndarray:
        fut = pool.render(by_id[id(src)], frame)
        return _result(fut, should_stop, lambda: fut.cancel())

    return render


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

    def __init__(
        self,
        datasets: Sequence[Dataset],
        futures: Sequence[Future[Prepared]],
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
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
        DecodeOverBudget, DecodeFailed
            The decode process ran out of its memory or time, or died.
        KeyError
            ``ds`` is not one of this job's datasets.
        """
        return _result(self._by_id[id(ds)], self._should_stop, self.cancel)

    def cancel(self) -> None:
        """Cancel what has not started (after an error or when stopping)."""
        for fut in self._futures:
            fut.cancel()


class DecodePool:
    """``processes`` decode processes (spawned, not forked: the worker process has threads
    and torch state a fork would copy half-way), each fed by its own thread from one queue.

    Parameters
    ----------
    processes
        Number of processes (>= 1).
    memory_mb
        Memory each process may take beyond its start-up size (None: unlimited).
    timeout_seconds
        Time one image may take (None: unlimited).
    """

    def __init__(
        self, processes: int, *, memory_mb: int | None = None, timeout_seconds: float | None = None
    ) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError('Argument "processes" must be an int >= 1.')
        if memory_mb is not None and memory_mb < 1:
            raise ValueError('Argument "memory_mb" must be >= 1 or None.')
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ValueError('Argument "timeout_seconds" must be > 0 or None.')
        self.processes = processes
        self.memory_mb = memory_mb
        self.timeout_seconds = timeout_seconds
        self.restarts = 0  #: processes replaced after dying or overrunning
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._closed = False
        self._slots = [_Slot(self, i) for i in range(processes)]
        for slot in self._slots:  # each starts its process in the background
            slot.thread.start()
        logger.info(
            "decode processes starting",
            extra=log_fields(
                "decode_pool.started",
                processes=processes,
                memory_mb=memory_mb,
                timeout_seconds=timeout_seconds,
            ),
        )

    def pids(self) -> list[int]:
        """Process ids of the decode processes running now."""
        return [s.process.pid for s in self._slots if s.process is not None and not s._ended()]

    def submit(
        self, paths: Sequence[str], task: Task | str, pre: PreprocessingSettings
    ) -> list[Future[Prepared]]:
        """Queue every file of ``paths``; one future per path, in order."""
        futures: list[Future[Prepared]] = []
        for path in paths:
            futures.append(self._submit(("prepare", str(path), str(task), pre)))
        return futures

    def render(self, path: str, frame: int) -> Future[Prepared]:
        """Queue the picture of a key image for its Secondary Capture
        (:func:`~dicomai.results.sc.render_key_image` of ``path``'s ``frame``, 0-based)."""
        return self._submit(("render", str(path), int(frame)))

    def _submit(self, message: tuple[Any, ...]) -> Future[Prepared]:
        if self._closed:
            raise RuntimeError("decode pool is shut down")
        fut: Future[Prepared] = Future()
        self._requests.put(_Request(fut, message))
        return fut

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel queued work and stop the processes (an image being decoded may finish
        within ``timeout``; then its process is killed)."""
        self._closed = True
        while True:  # cancel what is queued
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                request.future.cancel()
        for _ in self._slots:
            self._requests.put(None)
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            slot.thread.join(max(0.0, deadline - time.monotonic()))
        for slot in self._slots:
            if slot.thread.is_alive():
                slot._stop_process(kill=True)
        logger.info("decode processes stopped", extra=log_fields("decode_pool.stopped"))
