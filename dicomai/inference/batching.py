"""Dynamic batching across studies: one batcher thread per model merges concurrent requests.

Several worker threads, each running a different job, call ``predict`` with their own batch
of preprocessed images. The batcher collects pending requests of the same image shape, up
to ``max_batch`` images or until the oldest has waited ``max_wait_ms``, runs the model once,
and hands every caller exactly its own rows of probabilities and CAMs.

This module imports only numpy and the standard library (plus dicomai's errors and logs), so
that ``bench/gpu.py`` can use it on a machine without the DICOM stack.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dicomai.errors import Interrupted
from dicomai.inference.findings import ModelIdentity
from dicomai.logs import log_fields

if TYPE_CHECKING:  # torch is imported by the backend module; the worker has loaded it already
    from dicomai.models.backend import ModelBackend

__all__ = ["BatchingPredictor", "BoundPredictor", "SharedBatchers"]

logger = logging.getLogger(__name__)

#: How often a waiting caller looks at its ``should_stop``.
_STOP_POLL_SECONDS = 0.05

Output = tuple[np.ndarray, np.ndarray | None]


@dataclass(eq=False)
class _Request:
    """One caller's batch, waiting for its rows of the merged output."""

    batch: np.ndarray
    caller: int
    enqueued: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Output | None = None
    error: BaseException | None = None
    cancelled: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.batch.shape[1:])

    def finish(self, result: Output | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class BatchingPredictor:
    """Merges concurrent ``predict`` calls on one model into larger batches.

    It has the same ``identity``, ``labels``, ``device`` and ``predict`` as the backend it
    wraps, so :func:`dicomai.inference.processing.analyse` takes it (or a :meth:`bind` view)
    unchanged.

    Parameters
    ----------
    backend
        The loaded model: anything with ``identity``, ``labels``, ``device`` and
        ``predict(batch) -> (probabilities, cams | None)``.
    max_batch
        Most images in one merged model call (>= 1). A single request larger than this is run
        on its own, whole.
    max_wait_ms
        How long the oldest pending request may wait for others to join (>= 0). The batcher
        waits only while another job is in the middle of its run (it has called ``predict``
        within its session and has nothing pending); otherwise it runs at once. With 0 it
        never waits, but still merges what queued up while the model was busy.
    name
        Name of the batcher thread and in logs; default the model name.

    Notes
    -----
    Each caller has at most one request in flight (``predict`` blocks), so the order of its
    results is the order of its calls. When a merged call fails, each request in it is run
    again on its own, so an error reaches only the caller whose input caused it.
    """

    def __init__(
        self,
        backend: ModelBackend,
        *,
        max_batch: int,
        max_wait_ms: float = 0.0,
        name: str | None = None,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError('Argument "max_batch" must be an int >= 1.')
        if not max_wait_ms >= 0:
            raise ValueError('Argument "max_wait_ms" must be >= 0.')
        self._backend = backend
        self._max_batch = max_batch
        self._max_wait = float(max_wait_ms) / 1000.0
        self._name = name or backend.identity.name
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._active: dict[int, int] = {}  # session id -> predict calls made
        self._next_session = 0
        self._closed = False
        self.calls = 0  #: merged model calls made (for tests and the benchmark)
        self.images = 0  #: images run
        self._thread = threading.Thread(
            target=self._loop, name=f"batcher-{self._name}", daemon=True
        )
        self._thread.start()

    # -- the Predictor protocol --------------------------------------------------------
    @property
    def backend(self) -> ModelBackend:
        """The wrapped model backend."""
        return self._backend

    @property
    def identity(self) -> ModelIdentity:
        """The wrapped backend's identity."""
        return self._backend.identity

    @property
    def labels(self) -> tuple[str, ...]:
        """The wrapped backend's labels."""
        return self._backend.labels

    @property
    def device(self) -> str:
        """The wrapped backend's device."""
        return str(self._backend.device)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def configure(self, *, max_batch: int, max_wait_ms: float) -> None:
        """Change the limits (a configuration reload); the next merged call uses them."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError('Argument "max_batch" must be an int >= 1.')
        if not max_wait_ms >= 0:
            raise ValueError('Argument "max_wait_ms" must be >= 0.')
        with self._cond:
            self._max_batch, self._max_wait = max_batch, float(max_wait_ms) / 1000.0
            self._cond.notify_all()

    def predict(self, batch: np.ndarray) -> Output:
        """Probabilities [B, L] and CAMs [B, L, h, w] (or None) of ``batch``, merged with
        other callers' batches into one model call when they come together.

        Raises
        ------
        Exception
            Whatever the backend raises for this caller's input.
        """
        return self._submit(batch, session=None, should_stop=None)

    def bind(self, should_stop: Callable[[], bool] | None = None) -> BoundPredictor:
        """A view for one job: its ``predict`` gives up with :class:`Interrupted` when
        ``should_stop`` returns True while it waits. Use it as a context manager (or call
        ``release``) so that the batcher knows when the job is done."""
        with self._cond:
            session = self._next_session
            self._next_session += 1
        return BoundPredictor(self, session, should_stop)

    @contextmanager
    def session(self, should_stop: Callable[[], bool] | None = None) -> Iterator[BoundPredictor]:
        """``with batcher.session(stop) as predictor: analyse(..., predictor, ...)``."""
        bound = self.bind(should_stop)
        try:
            yield bound
        finally:
            bound.release()

    def close(self, timeout: float = 10.0) -> None:
        """Run what is pending, then stop the batcher thread (bounded wait).

        Later ``predict`` calls run the backend directly, unbatched.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        logger.info(
            "batcher stopped",
            extra=log_fields(
                "batching.stopped", model=self._name, calls=self.calls, images=self.images
            ),
        )

    # -- callers -----------------------------------------------------------------------
    def _release(self, session: int) -> None:
        with self._cond:
            self._active.pop(session, None)
            self._cond.notify_all()

    def _submit(
        self, batch: np.ndarray, *, session: int | None, should_stop: Callable[[], bool] | None
    ) -> Output:
        if not isinstance(batch, np.ndarray):
            raise TypeError('Argument "batch" must be a numpy array.')
        if batch.ndim != 4 or batch.shape[0] < 1:
            raise ValueError('Argument "batch" must have shape [B, C, H, W] with B >= 1.')
        if should_stop is not None and should_stop():
            raise Interrupted("stopping before a batch")
        request = _Request(batch, -1 if session is None else session, time.monotonic())
        with self._cond:
            if self._closed:
                direct = True
            else:
                direct = False
                if session is not None:
                    self._active[session] = self._active.get(session, 0) + 1
                self._pending.append(request)
                self._cond.notify_all()
        if direct:
            return self._backend.predict(batch)
        while not request.done.wait(_STOP_POLL_SECONDS if should_stop is not None else None):
            if should_stop is not None and should_stop():
                with self._cond:
                    request.cancelled = True
                    if request in self._pending:
                        self._pending.remove(request)
                raise Interrupted("stopping while waiting for the model")
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    # -- the batcher thread ------------------------------------------------------------
    def _busy_elsewhere(self) -> bool:
        """Whether a job that has started predicting has no request pending (so it may send
        one soon). Called with the lock held."""
        waiting = {r.caller for r in self._pending}
        return any(s not in waiting for s, calls in self._active.items() if calls)

    def _take(self) -> list[_Request] | None:
        """Block until a merged batch is due; None when closed and drained."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return None
                first = self._pending[0]
                same = [r for r in self._pending if r.shape == first.shape]
                count = sum(len(r.batch) for r in same)
                wait = first.enqueued + self._max_wait - time.monotonic()
                if (
                    count >= self._max_batch
                    or wait <= 0
                    or self._closed
                    or not self._busy_elsewhere()
                ):
                    break
                self._cond.wait(wait)
            taken: list[_Request] = []
            total = 0
            for r in same:
                if taken and total + len(r.batch) > self._max_batch:
                    continue  # left for the next call; smaller ones behind it may still fit
                taken.append(r)
                total += len(r.batch)
            for r in taken:
                self._pending.remove(r)
            return taken

    def _loop(self) -> None:
        while True:
            try:
                taken = self._take()
            except Exception:  # never leave callers hanging on a batcher bug
                logger.exception(
                    "batcher failed", extra=log_fields("batching.error", model=self._name)
                )
                continue
            if taken is None:
                return
            taken = [r for r in taken if not r.cancelled]
            if taken:
                self._run(taken)

    def _run(self, taken: list[_Request]) -> None:
        if len(taken) == 1:
            self._run_one(taken[0])
            return
        sizes = [len(r.batch) for r in taken]
        try:
            probs, cams = self._backend.predict(np.concatenate([r.batch for r in taken]))
        except Exception:
            # Split up: each request alone, so that only the bad one gets the error.
            logger.warning(
                "merged batch failed, running its requests one by one",
                extra=log_fields(
                    "batching.split", model=self._name, requests=len(taken), images=sum(sizes)
                ),
            )
            for r in taken:
                self._run_one(r)
            return
        self.calls += 1
        self.images += sum(sizes)
        start = 0
        for r, n in zip(taken, sizes, strict=True):
            r.finish((probs[start : start + n], None if cams is None else cams[start : start + n]))
            start += n

    def _run_one(self, request: _Request) -> None:
        try:
            out = self._backend.predict(request.batch)
        except BaseException as exc:
            request.finish(error=exc)
            return
        self.calls += 1
        self.images += len(request.batch)
        request.finish(out)


class BoundPredictor:
    """One job's view of a :class:`BatchingPredictor` (see :meth:`BatchingPredictor.bind`)."""

    def __init__(
        self, batcher: BatchingPredictor, session: int, should_stop: Callable[[], bool] | None
    ) -> None:
        self._batcher = batcher
        self._session = session
        self._should_stop = should_stop

    @property
    def identity(self) -> ModelIdentity:
        """The model's identity."""
        return self._batcher.identity

    @property
    def labels(self) -> tuple[str, ...]:
        """The model's labels."""
        return self._batcher.labels

    @property
    def device(self) -> str:
        """The model's device."""
        return self._batcher.device

    def predict(self, batch: np.ndarray) -> Output:
        """As :meth:`BatchingPredictor.predict`; raises :class:`Interrupted` when the job's
        ``should_stop`` turns True while it waits."""
        return self._batcher._submit(batch, session=self._session, should_stop=self._should_stop)

    def release(self) -> None:
        """The job is done with the model: the batcher no longer waits for it."""
        self._batcher._release(self._session)

    def __enter__(self) -> BoundPredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SharedBatchers:
    """One :class:`BatchingPredictor` per model, shared by the jobs a worker runs at once.

    A model swapped by a configuration reload, or a batcher closed, gets a new batcher; the
    old one drains in its own thread and its holders fall back to the model directly.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: dict[str, BatchingPredictor] = {}

    def get(
        self, name: str, backend: ModelBackend, *, max_batch: int, max_wait_ms: float
    ) -> BatchingPredictor:
        """The batcher of model ``name`` (``backend`` as loaded now), with these limits."""
        retired: BatchingPredictor | None = None
        with self._lock:
            batcher = self._by_model.get(name)
            if batcher is None or batcher.backend is not backend or batcher.closed:
                retired = batcher
                batcher = BatchingPredictor(
                    backend, max_batch=max_batch, max_wait_ms=max_wait_ms, name=name
                )
                self._by_model[name] = batcher
                logger.info(
                    "batcher started",
                    extra=log_fields(
                        "batching.started", model=name, max_batch=max_batch, wait_ms=max_wait_ms
                    ),
                )
            else:
                batcher.configure(max_batch=max_batch, max_wait_ms=max_wait_ms)
        if retired is not None:
            retired.close(timeout=0)
        return batcher

    def __getitem__(self, name: str) -> BatchingPredictor:
        """The current batcher of model ``name`` (KeyError if it has none)."""
        with self._lock:
            return self._by_model[name]

    def close(self, remaining: Callable[[], float]) -> None:
        """Close every batcher (each runs what is pending within ``remaining()`` seconds);
        later calls go to the models directly."""
        with self._lock:
            batchers, self._by_model = list(self._by_model.values()), {}
        for batcher in batchers:
            batcher.close(max(0.0, remaining()))
