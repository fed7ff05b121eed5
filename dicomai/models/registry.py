"""ModelRegistry: loads each configured model once and hands out the loaded backends by name."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

from dicomai.inference.findings import Task
from dicomai.models.backend import ModelBackend, TorchScriptBackend

__all__ = ["ModelLoader", "ModelRegistry"]

#: Signature of :meth:`TorchScriptBackend.load`; tests may pass a fake.
ModelLoader = Callable[..., ModelBackend]


class ModelRegistry:
    """Loaded model backends by name; thread-safe, and each model is loaded only once.

    Parameters
    ----------
    loader
        Builds a backend from ``(path, name=, version=, expected_sha256=, device=, labels=,
        task=, body_part=, warmup_size=, precision=)``; default :meth:`TorchScriptBackend.load`.
    """

    def __init__(self, loader: ModelLoader | None = None) -> None:
        self._loader: ModelLoader = loader or TorchScriptBackend.load
        self._backends: dict[str, ModelBackend] = {}
        self._lock = threading.Lock()

    def load(
        self,
        name: str,
        *,
        path: str | os.PathLike[str],
        version: str | None = None,
        sha256: str | None = None,
        device: str = "auto",
        labels: Sequence[str] | None = None,
        task: Task | str | None = None,
        body_part: str = "",
        warmup_size: int | None = None,
        precision: str = "fp16",
    ) -> ModelBackend:
        """Load model ``name`` unless it is loaded already, and return its backend.

        Parameters
        ----------
        name
            Model name from the configuration.
        path, version, sha256, device, labels, task, body_part, warmup_size, precision
            As for :meth:`TorchScriptBackend.load` (``sha256`` is ``expected_sha256``);
            ignored when ``name`` is loaded already.

        Returns
        -------
        ModelBackend

        Raises
        ------
        ModelLoadError
            If loading fails; nothing is registered then.
        """
        if not isinstance(name, str) or not name:
            raise ValueError('Argument "name" must be a non-empty string.')
        with self._lock:  # held while loading, so concurrent callers wait for the one load
            backend = self._backends.get(name)
            if backend is None:
                backend = self._loader(
                    path,
                    name=name,
                    version=version,
                    expected_sha256=sha256,
                    device=device,
                    labels=labels,
                    task=task,
                    body_part=body_part,
                    warmup_size=warmup_size,
                    precision=precision,
                )
                self._backends[name] = backend
            return backend

    def add(self, name: str, backend: ModelBackend) -> None:
        """Register an already-built backend under ``name``.

        Raises
        ------
        ValueError
            If ``name`` is registered already.
        """
        with self._lock:
            if name in self._backends:
                raise ValueError(f'Argument "name": model {name} is loaded already.')
            self._backends[name] = backend

    def replace(self, name: str, backend: ModelBackend) -> ModelBackend | None:
        """Swap in ``backend`` for ``name`` (already loaded by the caller); returns the old one.

        Jobs that already hold the old backend finish with it; new ``get`` calls see the new.
        """
        with self._lock:
            old = self._backends.get(name)
            self._backends[name] = backend
            return old

    def get(self, name: str) -> ModelBackend:
        """The backend of loaded model ``name``.

        Raises
        ------
        KeyError
            If ``name`` has not been loaded.
        """
        with self._lock:
            try:
                return self._backends[name]
            except KeyError:
                raise KeyError(f"model {name} is not loaded") from None

    def loaded(self) -> list[str]:
        """Names of the loaded models, sorted."""
        with self._lock:
            return sorted(self._backends)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._backends

    def __len__(self) -> int:
        with self._lock:
            return len(self._backends)
