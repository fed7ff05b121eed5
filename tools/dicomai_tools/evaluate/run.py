"""The evaluation run: labelled studies scored, figures per label and subgroup, the report."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dicomai.config import Settings
from dicomai_tools.evaluate.statistics import (
    bootstrap_indices,
    figures,
    roc_curve,
    suggest_threshold,
)
from dicomai_tools.evaluate.studies import (
    SUBGROUP_ATTRIBUTES,
    EvaluationError,
    load_labels,
    scan_studies,
    score_studies,
)


def evaluate(
    settings: Settings,
    model: str,
    directory: Path,
    labels_csv: Path,
    *,
    subgroups: bool = False,
    target_sensitivity: float | None = None,
    resamples: int = 1000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score the labelled studies under ``directory`` and compute the report (JSON-ready).

    Raises
    ------
    EvaluationError
        Unknown model, bad labels file or directory, or no labelled study found.
    """
    if model not in settings.models:
        raise EvaluationError(
            f"no model named {model!r} in the configuration "
            f"(configured: {', '.join(settings.models) or 'none'})"
        )
    if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
        raise EvaluationError("--target-sensitivity must be in (0, 1]")
    if resamples < 0:
        raise EvaluationError("--bootstrap must not be negative")
    from dicomai.models.reference import read_metadata

    spec = settings.models[model]
    path = settings.model_path(model)
    model_labels = list(spec.labels)
    if not model_labels and path.exists():
        model_labels = [str(x) for x in read_metadata(path).get("labels") or []]
    if not model_labels:
        from dicomai.models.reference import REFERENCE_MODELS

        ref = REFERENCE_MODELS.get(model)  # built on first use by ModelPool
        model_labels = list(ref.labels) if ref else []
    labels = load_labels(labels_csv, model_labels)
    studies, skipped_files = scan_studies(directory)
    found = [uid for uid in labels if uid in studies]
    if not found:
        raise EvaluationError(
            f"none of the {len(labels)} labelled studies is in {directory} "
            f"({len(studies)} studies found there)",
            usage=False,
        )
    cases = score_studies(settings, model, studies, labels, progress=progress)
    analysed = [c for c in cases if c.scores is not None]
    from dicomai.inference.findings import sha256_file

    boot = bootstrap_indices(len(analysed), resamples, seed)
    per_label: list[dict[str, Any]] = []
    roc: dict[str, dict[str, list[float]]] = {}
    subgroup_rows: list[dict[str, Any]] = []
    for label in model_labels:
        labelled = np.array([label in c.labels for c in analysed], dtype=bool)
        if not labelled.any():
            continue
        y = np.array([c.labels.get(label, 0) for c in analysed], dtype=bool)
        s = np.array([c.scores[label] if c.scores else 0.0 for c in analysed])
        threshold = spec.threshold_for(label)
        row = {"label": label, **figures(y, s, threshold, boot, labelled)}
        if target_sensitivity is not None:
            row["suggested"] = suggest_threshold(y[labelled], s[labelled], target_sensitivity)
        per_label.append(row)
        fpr, tpr, _ = roc_curve(y[labelled], s[labelled])
        roc[label] = {"fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}
        if subgroups:
            for attr in SUBGROUP_ATTRIBUTES:
                values = np.array([c.attributes.get(attr, "unknown") for c in analysed])
                for value in sorted(set(values[labelled].tolist())):
                    mask = labelled & (values == value)
                    subgroup_rows.append(
                        {
                            "attribute": attr,
                            "value": value,
                            "label": label,
                            **figures(y, s, threshold, boot, mask),
                        }
                    )
    excluded: dict[str, int] = {}
    for c in cases:
        if c.error:
            key = c.error.split(":", 1)[0]
            excluded[key] = excluded.get(key, 0) + 1
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "name": model,
            "version": spec.version,
            "task": spec.task,
            "path": str(path),
            "sha256": sha256_file(str(path)) if path.exists() else None,
            "device": spec.device,
            "description": _description(path),
        },
        "data": {
            "directory": str(directory),
            "labels_file": str(labels_csv),
            "studies_found": len(studies),
            "labelled": len(labels),
            "labelled_not_found": len(labels) - len(found),
            "analysed": len(analysed),
            "not_analysed": len(cases) - len(analysed),
            "not_analysed_reasons": excluded,
            "analysed_without_route_match": sum(1 for c in analysed if not c.routed),
            "files_skipped": skipped_files,
        },
        "bootstrap": {"resamples": resamples, "seed": seed, "confidence": 0.95},
        "target_sensitivity": target_sensitivity,
        "labels": per_label,
        "subgroups": subgroup_rows,
        "roc": roc,
        "scores": [
            {
                "study_instance_uid": c.study_instance_uid,
                "scores": c.scores,
                "labels": c.labels,
                "error": c.error,
            }
            for c in cases
        ],
    }


def _description(path: Path) -> str | None:
    from dicomai.models.reference import read_metadata

    try:
        return str(read_metadata(path).get("description"))
    except Exception:
        return None
