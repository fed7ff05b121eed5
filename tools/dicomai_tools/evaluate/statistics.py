"""Study-level statistics: AUROC, ROC curve, sensitivity/specificity, suggested thresholds,
bootstrap confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2.0)[inverse]


def auroc(y: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U / n1 n0; ties count one half); None when
    positives or negatives are missing."""
    y_arr = np.asarray(y, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n1 = int(y_arr.sum())
    n0 = len(y_arr) - n1
    if n1 == 0 or n0 == 0:
        return None
    r = _ranks(s)
    return float((r[y_arr].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_curve(
    y: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, threshold) at each distinct score, from
    (0, 0) at threshold +inf; "positive" means score >= threshold."""
    y_arr = np.asarray(y, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    thresholds = np.unique(s)[::-1]
    p, n = max(int(y_arr.sum()), 1), max(int((~y_arr).sum()), 1)
    tpr = np.array([0.0] + [float((s[y_arr] >= t).sum()) / p for t in thresholds])
    fpr = np.array([0.0] + [float((s[~y_arr] >= t).sum()) / n for t in thresholds])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def sensitivity_specificity(
    y: np.ndarray, scores: np.ndarray, threshold: float
) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV and NPV with "positive" = score >= threshold."""
    y_arr = np.asarray(y, dtype=bool)
    pred = np.asarray(scores, dtype=np.float64) >= threshold
    tp = int((pred & y_arr).sum())
    fp = int((pred & ~y_arr).sum())
    tn = int((~pred & ~y_arr).sum())
    fn = int((~pred & y_arr).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def suggest_threshold(
    y: np.ndarray, scores: np.ndarray, target_sensitivity: float
) -> dict[str, float | None] | None:
    """The highest threshold whose sensitivity reaches ``target_sensitivity`` (so the best
    specificity there), rounded down to 4 decimals; None without positives."""
    y_arr = np.asarray(y, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if not y_arr.any():
        return None
    for t in np.unique(s)[::-1]:
        if (s[y_arr] >= t).mean() >= target_sensitivity - 1e-12:
            threshold = max(math.floor(float(t) * 1e4 + 1e-9) / 1e4, 1e-4)
            stats = sensitivity_specificity(y_arr, s, threshold)
            return {
                "threshold": threshold,
                "sensitivity": stats["sensitivity"],
                "specificity": stats["specificity"],
            }
    return None  # pragma: no cover - the lowest score always reaches sensitivity 1


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` x ``n`` indices drawn with replacement (seeded, study-level)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n)) if n else np.zeros((resamples, 0), int)


def _ci(values: Iterable[float | None]) -> list[float] | None:
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(vals) < 10:
        return None
    return [round(float(np.percentile(vals, 2.5)), 4), round(float(np.percentile(vals, 97.5)), 4)]


def figures(
    y: np.ndarray, s: np.ndarray, threshold: float, boot: np.ndarray, mask: np.ndarray
) -> dict[str, Any]:
    """Point estimates, and bootstrap CIs over the studies selected by ``mask``.

    ``boot`` holds resampled indices into all analysed studies; each resample keeps the
    drawn studies that ``mask`` selects, so every label and subgroup uses the same draws.
    """
    y_m, s_m = y[mask], s[mask]
    stats = sensitivity_specificity(y_m, s_m, threshold)
    a = auroc(y_m, s_m)
    auc_boot: list[float | None] = []
    sens_boot: list[float | None] = []
    spec_boot: list[float | None] = []
    if mask.any() and boot.size:
        keep = mask[boot]
        yb, pb = y[boot], s[boot] >= threshold
        pos, neg = (keep & yb).sum(axis=1), (keep & ~yb).sum(axis=1)
        tp, tn = (keep & yb & pb).sum(axis=1), (keep & ~yb & ~pb).sum(axis=1)
        sens_boot = [t / p if p else None for t, p in zip(tp, pos, strict=True)]
        spec_boot = [t / n if n else None for t, n in zip(tn, neg, strict=True)]
        for row, k in zip(boot, keep, strict=True):
            idx = row[k]
            auc_boot.append(auroc(y[idx], s[idx]))

    def r4(value: float | None) -> float | None:
        return None if value is None else round(float(value), 4)

    return {
        "n": int(mask.sum()),
        "positives": int(y_m.sum()),
        "negatives": int((~y_m).sum()),
        "auroc": r4(a),
        "auroc_ci": _ci(auc_boot),
        "threshold": threshold,
        "sensitivity": r4(stats["sensitivity"]),
        "sensitivity_ci": _ci(sens_boot),
        "specificity": r4(stats["specificity"]),
        "specificity_ci": _ci(spec_boot),
        "ppv": r4(stats["ppv"]),
        "npv": r4(stats["npv"]),
        "tp": stats["tp"],
        "fp": stats["fp"],
        "tn": stats["tn"],
        "fn": stats["fn"],
    }
