"""The DicomAIError tree: every error dicomai raises on purpose."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeFailed",
    "DecodeOverBudget",
    "DicomAIError",
    "InferenceError",
    "Interrupted",
    "ModelLoadError",
    "PermanentError",
    "RetryableError",
    "SendError",
    "SendRefused",
    "StateConflict",
    "UnsupportedInput",
]


class DicomAIError(Exception):
    """Base class of dicomai's own errors. Messages carry our ids, never dataset values."""


class ConfigError(DicomAIError):
    """The configuration is invalid; the daemon does not start (exit code 3)."""


class StateConflict(DicomAIError):
    """A compare-and-set on a job's state matched no row: somebody else moved it first."""


class Interrupted(DicomAIError):
    """Work stopped because the process is shutting down; it is put back, not failed."""


class RetryableError(DicomAIError):
    """A transient failure (network, 0xA7xx, database busy, CUDA OOM): try again later."""


class DecodeFailed(RetryableError):
    """A decode process died or passed its time budget while decoding an image of the job
    (it is replaced; the job is retried)."""


class SendError(RetryableError):
    """Sending to a destination failed in a way that may succeed later."""


class InferenceError(RetryableError):
    """Running a model failed in a way that may succeed later."""


class PermanentError(DicomAIError):
    """Retrying cannot help."""


class UnsupportedInput(PermanentError):
    """The input cannot be analysed: no pixel data, unsupported syntax or photometric, shape."""


class DecodeOverBudget(PermanentError):
    """Decoding an image needed more memory than a decode process may take
    (``[worker] decode_memory_mb``)."""


class ModelLoadError(PermanentError):
    """A model file is missing, unreadable or fails its checksum."""


class SendRefused(PermanentError):
    """The destination refused permanently (0xA9xx, 0xCxxx, SOP class not accepted)."""
