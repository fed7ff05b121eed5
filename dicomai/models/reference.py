"""Reference models (untrained, seeded) and TorchScript export of user-supplied weights."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dicomai.errors import ModelLoadError
from dicomai.inference.findings import Task
from dicomai.logs import log_fields
from dicomai.models.architectures import (
    ARCHITECTURES,
    BONE_XRAY_LABELS,
    CHEST_XRAY_LABELS,
    HEAD_CT_ICH_LABELS,
    CamClassifier,
    load_state_dict_compat,
)

__all__ = [
    "METADATA_FILE",
    "MIN_INPUT_SIZE",
    "REFERENCE_DESCRIPTION",
    "REFERENCE_MODELS",
    "REFERENCE_PRIOR",
    "REFERENCE_SEED",
    "REFERENCE_VERSION",
    "ReferenceModel",
    "build_reference",
    "ensure_model_file",
    "export_state_dict",
    "read_metadata",
]

logger = logging.getLogger(__name__)

#: Name of the JSON metadata file stored inside every model archive (``_extra_files``).
METADATA_FILE = "dicomai.json"
REFERENCE_VERSION = "0.1.0-reference"
REFERENCE_SEED = 20240501
REFERENCE_DESCRIPTION = (
    "Untrained reference model (random weights, fixed seed). Not for diagnostic use."
)
#: Untrained reference models score about this on average, below the default 0.5 threshold.
REFERENCE_PRIOR = 0.1
#: Smallest height/width the exported architectures accept (global average pooling).
MIN_INPUT_SIZE = 64


@dataclass(frozen=True, slots=True)
class ReferenceModel:
    """A reference model: which architecture, task and labels, and its usual file name."""

    name: str
    architecture: str
    task: Task
    labels: tuple[str, ...]
    filename: str
    version: str = REFERENCE_VERSION


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    ref.name: ref
    for ref in (
        ReferenceModel(
            name="chest-xray",
            architecture="densenet121",
            task=Task.CHEST_XRAY,
            labels=CHEST_XRAY_LABELS,
            filename="chest_xray_densenet121.pt",
        ),
        ReferenceModel(
            name="head-ct-ich",
            architecture="resnet18",
            task=Task.HEAD_CT_ICH,
            labels=HEAD_CT_ICH_LABELS,
            filename="head_ct_ich_resnet18.pt",
        ),
        ReferenceModel(
            name="bone-xray",
            architecture="densenet169",
            task=Task.BONE_XRAY,
            labels=BONE_XRAY_LABELS,
            filename="bone_xray_densenet169.pt",
        ),
    )
}


def _metadata(
    *,
    name: str,
    architecture: str,
    task: Task,
    labels: Sequence[str],
    version: str,
    weights: str,
    description: str,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "architecture": architecture,
        "task": str(task),
        "labels": list(labels),
        "version": version,
        "input_channels": 3,
        "min_input_size": MIN_INPUT_SIZE,
        "weights": weights,
        "description": description,
        "torch": torch.__version__,
        **extra,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)  # mkstemp creates 0600; model files are not secret
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where directories can be opened
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _save_scripted(model: CamClassifier, metadata: Mapping[str, Any], out_path: Path) -> Path:
    """Script ``model``, embed ``metadata`` and write the archive atomically."""
    model.eval()
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    text = json.dumps(metadata, indent=2, sort_keys=True)
    torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: text})
    _write_atomic(out_path, buffer.getvalue())
    return out_path


def _resolve_out(out_path: str | os.PathLike[str], filename: str) -> Path:
    path = Path(out_path)
    return path / filename if path.is_dir() else path


def build_reference(
    name: str, out_path: str | os.PathLike[str], seed: int = REFERENCE_SEED
) -> Path:
    """Build a reference model with untrained, seeded weights and save it as TorchScript.

    The weights are torchvision's random initialisation under ``torch.manual_seed(seed)``.
    Only the classifier bias is then set: per label, so that the mean logit over a seeded
    batch of noise images equals ``logit(REFERENCE_PRIOR)`` (rounded to 1e-4 so that builds on
    other machines give the same bits). The model therefore scores about 0.1, below the
    default threshold, instead of label-dependent values around 0.5; it has learned nothing.

    Parameters
    ----------
    name
        A key of :data:`REFERENCE_MODELS`, e.g. ``"chest-xray"``.
    out_path
        File to write, or an existing directory to write the reference file name into.
    seed
        Seed of the weights; equal seeds give equal parameters.

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    ValueError
        If ``name`` is not a reference model.
    """
    ref = REFERENCE_MODELS.get(name)
    if ref is None:
        raise ValueError(
            f'Argument "name" must be one of {sorted(REFERENCE_MODELS)}, got {name!r}.'
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError('Argument "seed" must be an int.')
    path = _resolve_out(out_path, ref.filename)
    started = time.monotonic()
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = ARCHITECTURES[ref.architecture].build(len(ref.labels))
        noise = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.inference_mode():
        logits, _ = model(noise)
        bias = (
            model.classifier.bias
            - logits.mean(0)
            + math.log(REFERENCE_PRIOR / (1 - REFERENCE_PRIOR))
        )
        bias = torch.round(bias.double() * 1e4) / 1e4
    with torch.no_grad():
        model.classifier.bias.copy_(bias.float())
    metadata = _metadata(
        name=ref.name,
        architecture=ref.architecture,
        task=ref.task,
        labels=ref.labels,
        version=ref.version,
        weights="untrained-reference",
        description=REFERENCE_DESCRIPTION,
        seed=seed,
        bias_prior=REFERENCE_PRIOR,
    )
    _save_scripted(model, metadata, path)
    logger.info(
        "reference model built",
        extra=log_fields(
            "model.reference_built",
            model=ref.name,
            seconds=round(time.monotonic() - started, 2),
            size=path.stat().st_size,
        ),
    )
    return path


def _extract_state_dict(obj: object) -> Mapping[str, Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ModelLoadError("checkpoint holds no state dict")
    return obj


def export_state_dict(
    architecture: str,
    state_dict_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    labels: Sequence[str] | None = None,
    description: str = "User-supplied weights.",
    task: Task | str | None = None,
) -> Path:
    """Wrap a trained state dict (yours or a public checkpoint) into a dicomai TorchScript file.

    Parameters
    ----------
    architecture
        A key of :data:`~dicomai.models.architectures.ARCHITECTURES`.
    state_dict_path
        A ``torch.save`` file of a state dict, or of a dict holding it under ``"state_dict"``
        or ``"model"``; read with ``weights_only=True``. torchvision-style keys are accepted
        (see :func:`~dicomai.models.architectures.load_state_dict_compat`).
    out_path
        File to write (atomically).
    name, version, description
        Recorded in the metadata and, through it, in every result.
    labels
        Output labels in model order; default: the architecture's default labels.
    task
        Default: the architecture's default task.

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    ModelLoadError
        If the checkpoint is missing or unreadable, or does not fit the architecture, or its
        classifier's output count differs from the number of labels.
    """
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        raise ValueError(
            f'Argument "architecture" must be one of {sorted(ARCHITECTURES)}, got {architecture!r}.'
        )
    for arg, value in (("name", name), ("version", version), ("description", description)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'Argument "{arg}" must be a non-empty string.')
    label_tuple = spec.labels if labels is None else tuple(labels)
    if not label_tuple or not all(isinstance(lab, str) and lab for lab in label_tuple):
        raise ValueError('Argument "labels" must be non-empty strings.')
    if len(set(label_tuple)) != len(label_tuple):
        raise ValueError('Argument "labels" must not repeat a label.')
    task_value = spec.task if task is None else Task(task)
    source = Path(state_dict_path)
    if not source.is_file():
        raise ModelLoadError(f"checkpoint for model {name} not found")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable or unsafe pickles
        raise ModelLoadError(f"checkpoint for model {name} is unreadable") from exc
    state_dict = _extract_state_dict(obj)
    model = spec.build(len(label_tuple))
    try:
        report = load_state_dict_compat(model, state_dict)
    except ValueError as exc:
        raise ModelLoadError(f"checkpoint for model {name} does not fit {architecture}") from exc
    if not report.classifier_replaced:
        raise ModelLoadError(
            f"checkpoint for model {name} has no classifier with {len(label_tuple)} outputs"
        )
    metadata = _metadata(
        name=name,
        architecture=architecture,
        task=task_value,
        labels=label_tuple,
        version=version,
        weights="user-supplied",
        description=description,
    )
    return _save_scripted(model, metadata, Path(out_path))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the dicomai metadata of a model file without loading the model.

    Parameters
    ----------
    path
        A TorchScript archive written by this module.

    Returns
    -------
    dict
        The JSON metadata (name, architecture, task, labels, version, weights, description...).

    Raises
    ------
    ModelLoadError
        If the file is missing, not a TorchScript archive, or has no dicomai metadata.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return _metadata_from_zip(archive)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model file {Path(path).name} not found") from exc
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelLoadError(f"model file {Path(path).name} has no readable metadata") from exc


def _metadata_from_zip(archive: zipfile.ZipFile) -> dict[str, Any]:
    suffix = f"/extra/{METADATA_FILE}"
    member = next((n for n in archive.namelist() if n.endswith(suffix)), None)
    if member is None:
        raise ValueError("no dicomai metadata in archive")
    data = json.loads(archive.read(member).decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("dicomai metadata is not a JSON object")
    return data


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` + ``.lock`` (POSIX; elsewhere only atomic rename)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_model_file(name: str, path: str | os.PathLike[str], seed: int = REFERENCE_SEED) -> bool:
    """Build reference model ``name`` at ``path`` if the file is missing.

    Safe across processes: builders take a file lock and re-check, and the file appears only
    complete (atomic rename).

    Parameters
    ----------
    name
        Model name; only keys of :data:`REFERENCE_MODELS` are built.
    path
        Where the model file should be.
    seed
        Seed for a reference build.

    Returns
    -------
    bool
        True if this call built the file; False if it existed or ``name`` is not a reference
        model (loading it then reports the missing file).
    """
    target = Path(path)
    if target.exists() or name not in REFERENCE_MODELS:
        return False
    with _file_lock(target):
        if target.exists():
            return False
        build_reference(name, target, seed=seed)
    return True
