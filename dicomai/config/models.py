"""[models.NAME]: a TorchScript model, its preprocessing and operating points."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from dicomai.config.base import Section, check_device


class PreprocessingSettings(Section):
    """How pixels become a model input."""

    input_size: int = Field(default=224, ge=32, le=2048)
    # CT: (center, width) per channel; default brain, subdural, bone windows.
    windows: list[tuple[float, float]] = Field(
        default_factory=lambda: [(40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)]
    )
    normalize_mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    normalize_std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    batch_size: int = Field(default=8, ge=1, le=512)
    ct_aggregation: Literal["max", "top3_mean"] = "max"


class ModelSettings(Section):
    """A TorchScript model and how to run it."""

    path: Path
    version: str
    sha256: str = ""  # empty: not pinned (dicomai records the actual hash in every result)
    device: str = "auto"
    task: Literal["chest_xray", "head_ct_ich", "bone_xray"]
    labels: list[str] = Field(default_factory=list)  # empty: from the model file's metadata
    threshold: float = Field(default=0.5, gt=0, le=1)
    thresholds: dict[str, float] = Field(default_factory=dict)
    preprocessing: PreprocessingSettings = Field(default_factory=PreprocessingSettings)
    body_part: str = ""
    #: Autocast precision on CUDA (on CPU the model always runs in float32).
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for label, t in value.items():
            if not 0 < t <= 1:
                raise ValueError(f"threshold of {label!r} must be in (0, 1]")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        if value and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("sha256 must be 64 lower-case hex digits or empty")
        return value

    def threshold_for(self, label: str) -> float:
        """Operating point of ``label``."""
        return self.thresholds.get(label, self.threshold)
