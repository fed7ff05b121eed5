"""The configured models, loaded once and kept warm for the worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from dicomai.config import Settings
from dicomai.logs import log_fields
from dicomai.models.backend import ModelBackend, TorchScriptBackend
from dicomai.models.reference import ensure_model_file
from dicomai.models.registry import ModelRegistry

__all__ = ["ModelPool"]

logger = logging.getLogger(__name__)


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
