"""Model architectures, reference models, the TorchScript backend and the model registry."""

from __future__ import annotations

from dicomai.models.architectures import (
    ARCHITECTURES,
    ArchitectureSpec,
    CamClassifier,
    CompatReport,
    densenet121,
    densenet169,
    load_state_dict_compat,
    resnet18,
)
from dicomai.models.backend import ModelBackend, TorchScriptBackend
from dicomai.models.device import resolve_device
from dicomai.models.reference import (
    REFERENCE_MODELS,
    ReferenceModel,
    build_reference,
    ensure_model_file,
    export_state_dict,
    read_metadata,
)
from dicomai.models.registry import ModelRegistry

__all__ = [
    "ARCHITECTURES",
    "REFERENCE_MODELS",
    "ArchitectureSpec",
    "CamClassifier",
    "CompatReport",
    "ModelBackend",
    "ModelRegistry",
    "ReferenceModel",
    "TorchScriptBackend",
    "build_reference",
    "densenet121",
    "densenet169",
    "ensure_model_file",
    "export_state_dict",
    "load_state_dict_compat",
    "read_metadata",
    "resnet18",
    "resolve_device",
]
