"""A TorchScript model file: read once, checked against its pinned SHA-256, its dicomai
metadata read, the module loaded onto a device, and the model's identity (labels, task,
version) settled between the configuration and the file."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dicomai.errors import ModelLoadError
from dicomai.inference.findings import ModelIdentity, Task
from dicomai.logs import log_fields
from dicomai.models.reference import METADATA_FILE

__all__ = ["ModelFile", "describe", "file_metadata", "load_module", "read_model_file"]

logger = logging.getLogger(__name__)

_DEFAULT_DESCRIPTION = "TorchScript model without dicomai metadata."


@dataclass(frozen=True, slots=True)
class ModelFile:
    """The bytes of a model file and their SHA-256."""

    data: bytes
    sha256: str


def read_model_file(path: Path, name: str, expected_sha256: str | None) -> ModelFile:
    """Read ``path`` once and check it against ``expected_sha256`` (None or ``""``: any); the
    hash is of the bytes that will be loaded.

    Raises
    ------
    ModelLoadError
        The file is missing or unreadable, or fails its checksum.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model {name}: file not found") from exc
    except OSError as exc:
        raise ModelLoadError(f"model {name}: file unreadable") from exc
    sha256 = hashlib.sha256(data).hexdigest()
    expected = (expected_sha256 or "").strip().lower()
    if expected and expected != sha256:
        raise ModelLoadError(
            f"model {name}: checksum mismatch (expected {expected[:12]}, file {sha256[:12]})"
        )
    return ModelFile(data=data, sha256=sha256)


def file_metadata(file: ModelFile, name: str) -> dict[str, Any]:
    """The dicomai metadata stored in the archive; empty when it has none.

    Raises
    ------
    ModelLoadError
        The bytes are not a zip archive (so not a TorchScript model).
    """
    try:
        return _metadata_from_bytes(file.data)
    except ValueError as exc:
        raise ModelLoadError(f"model {name}: not a TorchScript archive") from exc


def _metadata_from_bytes(data: bytes) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            suffix = f"/extra/{METADATA_FILE}"
            member = next((n for n in archive.namelist() if n.endswith(suffix)), None)
            if member is None:
                return {}
            meta = json.loads(archive.read(member).decode("utf-8"))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise ValueError("unreadable model archive") from exc
    return meta if isinstance(meta, dict) else {}


def load_module(
    file: ModelFile, name: str, device: torch.device, *, channels_last: bool
) -> torch.jit.ScriptModule:
    """The TorchScript module of ``file`` on ``device``, in eval mode (and channels-last when
    asked for).

    Raises
    ------
    ModelLoadError
        The bytes are not a loadable TorchScript model.
    """
    try:
        module = torch.jit.load(io.BytesIO(file.data), map_location=device)
    except Exception as exc:  # torch raises RuntimeError and others for bad archives
        raise ModelLoadError(f"model {name}: not a loadable TorchScript model") from exc
    module.eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def describe(
    meta: Mapping[str, Any],
    *,
    name: str,
    sha256: str,
    version: str | None,
    labels: Sequence[str] | None,
    task: Task | str | None,
    body_part: str,
) -> tuple[ModelIdentity, tuple[str, ...]]:
    """The model's identity and output labels: the configured values where given, else the
    file's metadata.

    Raises
    ------
    ModelLoadError
        No labels, task or version either way, or a configured task the file contradicts.
    """
    label_tuple = tuple(labels) if labels else tuple(meta.get("labels") or ())
    if not label_tuple:
        raise ModelLoadError(f"model {name}: no labels given and none in the file")
    meta_task = meta.get("task")
    try:
        task_value = Task(task if task is not None else str(meta_task))
    except ValueError as exc:
        raise ModelLoadError(f"model {name}: unknown or missing task") from exc
    if task is not None and meta_task is not None and Task(task) != meta_task:
        raise ModelLoadError(
            f"model {name}: configured task {Task(task)} but the file is for {meta_task}"
        )
    meta_version = meta.get("version")
    if version is None:
        if not meta_version:
            raise ModelLoadError(f"model {name}: no version given and none in the file")
        version = str(meta_version)
    elif meta_version and meta_version != version:
        logger.warning(
            "configured model version differs from the file's",
            extra=log_fields(
                "model.version_mismatch", model=name, version=version, file=meta_version
            ),
        )
    identity = ModelIdentity(
        name=name,
        version=version,
        sha256=sha256,
        task=task_value,
        architecture=str(meta.get("architecture", "unknown")),
        description=str(meta.get("description", _DEFAULT_DESCRIPTION)),
        body_part=body_part,
    )
    return identity, label_tuple
