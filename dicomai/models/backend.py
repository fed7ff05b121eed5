"""The ModelBackend seam and its TorchScript implementation: load, verify, warm up, predict."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from dicomai.errors import InferenceError, ModelLoadError
from dicomai.inference.findings import ModelIdentity, Task
from dicomai.logs import log_fields
from dicomai.models.device import is_oom, resolve_device, supported_precision
from dicomai.models.model_file import describe, file_metadata, load_module, read_model_file
from dicomai.models.reference import MIN_INPUT_SIZE

__all__ = ["PRECISIONS", "ModelBackend", "TorchScriptBackend"]

logger = logging.getLogger(__name__)

#: Autocast precisions on CUDA (``"fp32"`` turns autocast off). CPU always runs float32.
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@runtime_checkable
class ModelBackend(Protocol):
    """A loaded model: who it is, its labels, and how to run a preprocessed batch."""

    @property
    def identity(self) -> ModelIdentity:
        """Name, version, file hash, task, architecture and description."""
        ...

    @property
    def labels(self) -> tuple[str, ...]:
        """Output labels in model order."""
        ...

    @property
    def device(self) -> str:
        """Where the model runs, e.g. ``"cpu"`` or ``"cuda:0"``."""
        ...

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities [B, L] and per-image, per-label normalised CAMs [B, L, h, w] or None."""
        ...


def _normalise_cams(cams: Tensor) -> Tensor:
    """Scale each [h, w] map to [0, 1]; a constant map becomes zeros."""
    flat = cams.flatten(2)
    low = flat.amin(dim=2, keepdim=True)
    span = flat.amax(dim=2, keepdim=True) - low
    scaled = torch.where(span > 1e-12, (flat - low) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return scaled.view_as(cams)


def _as_batch(batch: np.ndarray, input_channels: int | None) -> np.ndarray:
    """``batch`` checked to be [B, C, H, W] (B >= 1, C as the model expects), as float32."""
    if not isinstance(batch, np.ndarray):
        raise TypeError('Argument "batch" must be a numpy array.')
    if batch.ndim != 4 or batch.shape[0] < 1:
        raise ValueError('Argument "batch" must have shape [B, C, H, W] with B >= 1.')
    if input_channels is not None and batch.shape[1] != input_channels:
        raise ValueError(f'Argument "batch" must have {input_channels} channels.')
    return np.ascontiguousarray(batch, dtype=np.float32)


def _outputs(
    name: str, logits: Tensor, cams: Tensor | None, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and normalised CAMs as float32 arrays, once the logits are checked to be
    ``shape`` ([B, L]) and finite and the CAMs [B, L, h, w].

    Raises
    ------
    InferenceError
        A shape does not match, or a logit is not finite.
    """
    n, n_labels = shape
    if logits.shape != (n, n_labels):
        raise InferenceError(
            f"model {name}: output shape {tuple(logits.shape)}, expected ({n}, {n_labels})"
        )
    if cams is not None and (cams.dim() != 4 or cams.shape[:2] != (n, n_labels)):
        raise InferenceError(f"model {name}: CAM shape {tuple(cams.shape)} does not match")
    if not bool(torch.isfinite(logits).all()):
        raise InferenceError(f"model {name}: non-finite output")
    probs = torch.sigmoid(logits).cpu().numpy().astype(np.float32, copy=False)
    cam_array = None
    if cams is not None:
        cam_array = _normalise_cams(cams).cpu().numpy().astype(np.float32, copy=False)
    return probs, cam_array


class TorchScriptBackend:
    """A TorchScript model on one device; ``predict`` is serialised by a lock.

    Build it with :meth:`load`; the constructor only stores its arguments.

    Parameters
    ----------
    module
        The loaded ``torch.jit.ScriptModule`` (in eval mode, on ``device``); any module whose
        forward returns logits or ``(logits, cams)`` works.
    identity
        Recorded in every result.
    labels
        Output labels in model order.
    device
        Torch device the module lives on.
    input_channels
        Expected channel count, or None to accept any.
    jit_optimize
        Let the TorchScript executor profile and optimise the graph (default: on CUDA only).
        On CPU it costs seconds on the first calls, again for each new input shape, and gains
        nothing measurable for these convolutional models.
    precision
        ``"fp16"`` (default), ``"bf16"`` or ``"fp32"``: the autocast dtype on CUDA. Ignored on
        CPU, which always runs float32 (so CPU results do not depend on it). Outputs are
        float32 either way, and a batch whose logits overflow is run again in float32.
    channels_last
        Run the module and its inputs in channels-last memory layout (on CUDA, half-precision
        convolutions are usually faster so); default off. The module is converted by
        :meth:`load`.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        identity: ModelIdentity,
        labels: Sequence[str],
        device: torch.device,
        input_channels: int | None = 3,
        jit_optimize: bool | None = None,
        precision: str = "fp16",
        channels_last: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f'Argument "precision" must be one of {sorted(PRECISIONS)}.')
        self._module = module
        self._identity = identity
        self._labels = tuple(labels)
        self._device = device
        self._input_channels = input_channels
        self._jit_optimize = device.type == "cuda" if jit_optimize is None else jit_optimize
        self._precision = precision if device.type == "cuda" else "fp32"
        self._autocast_dtype = PRECISIONS[self._precision]
        self._channels_last = channels_last
        self._lock = threading.Lock()

    @property
    def identity(self) -> ModelIdentity:
        """Name, version, file hash, task, architecture and description."""
        return self._identity

    @property
    def labels(self) -> tuple[str, ...]:
        """Output labels in model order."""
        return self._labels

    @property
    def device(self) -> str:
        """Where the model runs, e.g. ``"cpu"`` or ``"cuda:0"``."""
        return str(self._device)

    @property
    def precision(self) -> str:
        """The precision the model actually runs in: ``"fp32"`` on CPU, else as configured."""
        return self._precision

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        name: str,
        version: str | None = None,
        expected_sha256: str | None = None,
        device: str = "auto",
        labels: Sequence[str] | None = None,
        task: Task | str | None = None,
        body_part: str = "",
        warmup_size: int | None = None,
        precision: str = "fp16",
        channels_last: bool = False,
        jit_optimize: bool | None = None,
    ) -> TorchScriptBackend:
        """Load, verify and warm up a TorchScript model file.

        The file is read once; its SHA-256 is computed over the bytes that are loaded.

        Parameters
        ----------
        path
            The model file.
        name
            Model name (from the configuration); used in identity and messages.
        version
            Model version; default: the file's metadata.
        expected_sha256
            Hex digest the file must have; None or ``""`` to accept any (the actual hash is
            still recorded in the identity).
        device
            ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        labels
            Output labels; default: the file's metadata. Their count must equal the number of
            model outputs.
        task
            The model's task; default: the file's metadata. Both given and different is an
            error.
        body_part
            Recorded in the identity.
        warmup_size
            Height and width of the warm-up image; default: the file's ``min_input_size``
            (64). Pass the preprocessing size so that the first real batch is not slower.
        precision
            Autocast precision on CUDA: ``"fp16"``, ``"bf16"`` (fp16 where the GPU lacks
            bfloat16) or ``"fp32"``; CPU always runs float32.
        channels_last, jit_optimize
            As for the constructor.

        Returns
        -------
        TorchScriptBackend

        Raises
        ------
        ModelLoadError
            If the file is missing or unreadable, fails its checksum, CUDA is requested but
            missing, metadata is insufficient, or the warm-up fails or disagrees with the labels.
        """
        if not isinstance(name, str) or not name:
            raise ValueError('Argument "name" must be a non-empty string.')
        if precision not in PRECISIONS:
            raise ValueError(f'Argument "precision" must be one of {sorted(PRECISIONS)}.')
        started = time.monotonic()
        file = read_model_file(Path(path), name, expected_sha256)
        torch_device = resolve_device(device)
        meta = file_metadata(file, name)
        module = load_module(file, name, torch_device, channels_last=channels_last)
        precision = supported_precision(precision, torch_device, name)
        identity, label_tuple = describe(
            meta,
            name=name,
            sha256=file.sha256,
            version=version,
            labels=labels,
            task=task,
            body_part=body_part,
        )
        channels = meta.get("input_channels")
        backend = cls(
            module,
            identity=identity,
            labels=label_tuple,
            device=torch_device,
            input_channels=int(channels) if channels else None,
            jit_optimize=jit_optimize,
            precision=precision,
            channels_last=channels_last,
        )
        size = warmup_size or int(meta.get("min_input_size", MIN_INPUT_SIZE))
        backend._warm_up(np.zeros((1, int(channels) if channels else 3, size, size), np.float32))
        logger.info(
            "model loaded",
            extra=log_fields(
                "model.loaded",
                model=name,
                version=identity.version,
                sha256=identity.short_hash,
                device=str(torch_device),
                precision=backend.precision,
                seconds=round(time.monotonic() - started, 2),
            ),
        )
        return backend

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the model on a preprocessed batch.

        On CUDA this runs under autocast in the configured precision (fp16 by default); the
        outputs are float32. On a CUDA out-of-memory error the batch is run
        again in halves, and a second out-of-memory error raises :class:`InferenceError`.

        Parameters
        ----------
        batch
            Float array [B, C, H, W] (converted to float32), B >= 1.

        Returns
        -------
        probabilities : numpy.ndarray
            Sigmoid of the logits, float32 [B, L].
        cams : numpy.ndarray or None
            Class activation maps scaled to [0, 1] per image and label, float32 [B, L, h, w];
            None if the model returns only logits.

        Raises
        ------
        InferenceError
            If the model fails, returns the wrong shape or non-finite values, or runs out of
            memory twice.
        """
        x = _as_batch(batch, self._input_channels)
        with self._lock:
            try:
                return self._run(x, len(x))
            except (RuntimeError, torch.jit.Error) as exc:
                if not is_oom(exc):
                    raise InferenceError(f"model {self._identity.name}: inference failed") from exc
            logger.warning(
                "out of memory, retrying with half the batch",
                extra=log_fields("model.oom", model=self._identity.name, batch=len(x)),
            )
            torch.cuda.empty_cache()  # a no-op unless CUDA was initialised
            try:
                return self._run(x, max(1, (len(x) + 1) // 2))
            except (RuntimeError, torch.jit.Error) as exc:
                if is_oom(exc):
                    torch.cuda.empty_cache()
                    raise InferenceError(
                        f"model {self._identity.name}: out of memory at batch "
                        f"{max(1, (len(x) + 1) // 2)}"
                    ) from exc
                raise InferenceError(f"model {self._identity.name}: inference failed") from exc

    def _warm_up(self, warmup: np.ndarray) -> None:
        """Run ``warmup`` through the model (twice when the JIT optimises: a profiling run,
        then an optimising run), so the first real batch does not pay for it."""
        try:
            for _ in range(2 if self._jit_optimize else 1):
                self.predict(warmup)
        except InferenceError as exc:  # our message: output shape or label count
            raise ModelLoadError(f"warm-up failed: {exc}") from exc
        except Exception as exc:  # whatever the model raises, the file is not usable
            raise ModelLoadError(f"model {self._identity.name}: warm-up inference failed") from exc

    def _run(self, x: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray | None]:
        probs: list[np.ndarray] = []
        cams: list[np.ndarray] = []
        has_cams = True
        for start in range(0, len(x), chunk):
            p, c = self._forward(x[start : start + chunk])
            probs.append(p)
            if c is None:
                has_cams = False
            else:
                cams.append(c)
        prob_array = np.concatenate(probs, axis=0)
        return prob_array, (np.concatenate(cams, axis=0) if has_cams else None)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        on_cuda = self._device.type == "cuda"
        tensor = torch.from_numpy(x).to(self._device, non_blocking=on_cuda)
        if self._channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        autocast = self._autocast_dtype is not None
        logits, cams = self._call(tensor, autocast=autocast)
        if autocast and not bool(torch.isfinite(logits).all()):
            logits, cams = self._call(tensor, autocast=False)  # overflow: redo in fp32
        return _outputs(self._identity.name, logits, cams, (len(x), len(self._labels)))

    def _call(self, tensor: Tensor, *, autocast: bool) -> tuple[Tensor, Tensor | None]:
        with (
            torch.inference_mode(),
            torch.jit.optimized_execution(self._jit_optimize),
            torch.autocast(
                device_type=self._device.type,
                dtype=self._autocast_dtype or torch.float16,
                enabled=autocast,
            ),
        ):
            out = self._module(tensor)
        if isinstance(out, Tensor):
            return out.float(), None
        if isinstance(out, tuple | list) and len(out) >= 1 and isinstance(out[0], Tensor):
            cams = out[1] if len(out) > 1 and isinstance(out[1], Tensor) else None
            return out[0].float(), (None if cams is None else cams.float())
        raise InferenceError(f"model {self._identity.name}: unexpected output type")
