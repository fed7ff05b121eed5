"""Torch devices: a configured device name resolved to a torch device, the precision a
device can run, and CUDA out-of-memory errors recognised whatever form they arrive in."""

from __future__ import annotations

import logging

import torch

from dicomai.errors import ModelLoadError
from dicomai.logs import log_fields

__all__ = ["is_oom", "resolve_device", "supported_precision"]

logger = logging.getLogger(__name__)

_cpu_fallback_logged = False


def resolve_device(device: str) -> torch.device:
    """Turn a configured device into a torch device.

    Parameters
    ----------
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If ``device`` is not one of these forms.
    ModelLoadError
        If CUDA is requested but not available, or ``N`` is not a visible device.
    """
    global _cpu_fallback_logged
    if not isinstance(device, str):
        raise TypeError('Argument "device" must be a string.')
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if not _cpu_fallback_logged:
            _cpu_fallback_logged = True
            logger.info("no GPU available, running on CPU", extra=log_fields("model.cpu_only"))
        return torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        index_text = device[len("cuda:") :] if ":" in device else "0"
        if not index_text.isdigit():
            raise ValueError('Argument "device" must be auto, cpu, cuda or cuda:N.')
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device} requested but CUDA is not available "
                f"(torch {torch.__version__}); use device auto or cpu"
            )
        index = int(index_text)
        count = torch.cuda.device_count()
        if index >= count:
            raise ModelLoadError(f"device {device} requested but only {count} CUDA device(s)")
        return torch.device("cuda", index)
    raise ValueError('Argument "device" must be auto, cpu, cuda or cuda:N.')


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA out-of-memory error."""
    # TorchScript re-raises CUDA OOM as a plain RuntimeError (torch.jit.Error) with the message.
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def supported_precision(precision: str, device: torch.device, model: str) -> str:
    """``precision``, or ``"fp16"`` for ``"bf16"`` on a GPU without bfloat16 (logged)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning(
            "GPU has no bfloat16, using fp16",
            extra=log_fields("model.precision_fallback", model=model, precision=precision),
        )
        return "fp16"
    return precision
