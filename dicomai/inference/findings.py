"""Values passed from inference to result building: what a model run found and who found it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import numpy as np

__all__ = [
    "DISCLAIMER",
    "UID_ROOT",
    "Findings",
    "ModelIdentity",
    "Task",
    "result_uid",
]

#: UID root for every object dicomai creates. pydicom's documented example root, used as a
#: placeholder until the project registers its own (see README, "Result objects").
UID_ROOT = "1.2.826.0.1.3680043.8.498."

DISCLAIMER = "AI-generated result, not verified by a physician. Not for diagnostic use."


class Task(StrEnum):
    """What a model does; decides the preprocessing, the label codes and the SR layout."""

    CHEST_XRAY = "chest_xray"  # multi-label classification of a frontal chest radiograph
    HEAD_CT_ICH = "head_ct_ich"  # per-slice intracranial haemorrhage, aggregated per study
    BONE_XRAY = "bone_xray"  # abnormality of an extremity radiograph


def result_uid(kind: str, **key: object) -> str:
    """Deterministic UID under :data:`UID_ROOT` for a JSON-serialisable key.

    Parameters
    ----------
    kind
        Object kind, e.g. ``"sr"``, ``"sc-series"``, ``"tracking:pneumonia"``.
    **key
        Content the UID depends on (study UID, sorted source UIDs, model, version, index).

    Returns
    -------
    str
        A UID of at most 64 characters; equal keys give equal UIDs.
    """
    from pydicom.uid import generate_uid

    text = json.dumps({"kind": kind, **key}, sort_keys=True, separators=(",", ":"), default=str)
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=[text]))


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Who produced a result: recorded in every result object.

    ``description`` says plainly what the weights are, e.g. "untrained reference model, not for
    diagnostic use".
    """

    name: str
    version: str
    sha256: str
    task: Task
    architecture: str
    description: str
    vendor: str = "dicomai"
    body_part: str = ""

    @property
    def device_uid(self) -> str:
        """A UID that changes whenever the model file changes (IHE AIR Device UID)."""
        return result_uid("device", model=self.name, version=self.version, sha256=self.sha256)

    @property
    def short_hash(self) -> str:
        """First 12 hex digits of the model file's SHA-256."""
        return self.sha256[:12]


@dataclass(frozen=True, slots=True)
class Findings:
    """Outcome of one model run over one study's selected series.

    Attributes
    ----------
    model
        Identity of the model that ran.
    labels
        Output labels in model order.
    thresholds
        Operating point per label: a score at or above it means "present".
    study_scores
        Score in [0, 1] per label for the whole study (CT: aggregated over slices).
    image_scores
        Per analysed instance (SOP Instance UID): score per label.
    key_image_uids
        Instances to show in the Secondary Capture, most suspicious first.
    heatmaps
        Class activation map in [0, 1] (any size) per key image, for the top label.
    top_label
        Label the heat maps show (highest study score), or ``None``.
    label_heatmaps
        Class activation map in [0, 1] per label present in the study, on each image where that
        label's own score reaches its threshold: where the model found it (SR regions, SEG).
    started
        When inference started (aware UTC); pins ContentDate/Time of the SR.
    """

    model: ModelIdentity
    labels: tuple[str, ...]
    thresholds: Mapping[str, float]
    study_scores: Mapping[str, float]
    image_scores: Mapping[str, Mapping[str, float]]
    key_image_uids: tuple[str, ...]
    started: datetime
    heatmaps: Mapping[str, np.ndarray] = field(default_factory=dict)
    top_label: str | None = None
    label_heatmaps: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)

    def is_present(self, label: str) -> bool:
        """Whether the study-level score of ``label`` reaches its threshold."""
        return self.study_scores[label] >= self.thresholds[label]

    @property
    def positive_labels(self) -> tuple[str, ...]:
        """Labels present at study level, highest score first."""
        hits = [lab for lab in self.labels if self.is_present(lab)]
        return tuple(sorted(hits, key=lambda lab: -self.study_scores[lab]))

    def summary(self) -> dict[str, object]:
        """JSON-ready summary (no patient data) for the database and `dicomai status`."""
        return {
            "model": self.model.name,
            "version": self.model.version,
            "sha256": self.model.sha256,
            "description": self.model.description,
            "positive": list(self.positive_labels),
            "scores": {k: round(float(v), 4) for k, v in self.study_scores.items()},
            "thresholds": {k: float(v) for k, v in self.thresholds.items()},
            "key_images": len(self.key_image_uids),
        }


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
