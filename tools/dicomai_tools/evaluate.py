"""`dicomai models evaluate`: run a configured model on a labelled set of studies and report
AUROC, sensitivity and specificity at the configured thresholds, with bootstrap confidence
intervals, per-subgroup figures, suggested thresholds and an HTML report with ROC curves.

The studies are DICOM files under one directory (any layout; grouped by StudyInstanceUID).
Each study goes through the same series selection (the model's route, see
:mod:`dicomai.routing`), preprocessing and study-level aggregation
(:func:`dicomai.inference.processing.analyse`) as in production, with the model loaded by
:class:`dicomai.inference.worker.ModelPool`.

Labels come from a CSV file in one of two shapes:

- long: columns ``study_instance_uid,label,value`` with value 0 or 1;
- wide: a ``study_instance_uid`` column and one column per label (0, 1, or empty for
  "not labelled").

Nothing here writes patient data: reports carry aggregate figures only (the per-study score
file, when asked for, names studies by StudyInstanceUID).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dicomai.config import RouteSettings, Settings
from dicomai.errors import DicomAIError

__all__ = [
    "SUBGROUP_ATTRIBUTES",
    "EvaluationError",
    "LabelledStudy",
    "age_band",
    "auroc",
    "bootstrap_indices",
    "evaluate",
    "load_labels",
    "render_table",
    "roc_curve",
    "scan_studies",
    "sensitivity_specificity",
    "suggest_threshold",
    "write_html",
]

#: Subgroup attributes: report key -> how it is read from the first analysed image.
SUBGROUP_ATTRIBUTES = ("sex", "age_band", "manufacturer", "view_position")
_AGE_BANDS = (
    (0, 18, "0-17"),
    (18, 40, "18-39"),
    (40, 60, "40-59"),
    (60, 80, "60-79"),
    (80, 200, "80+"),
)
_FALLBACK_RULE = {
    "chest_xray": "xray_frontal",
    "bone_xray": "xray_frontal",
    "head_ct_ich": "ct_axial_most_slices",
}


class EvaluationError(DicomAIError):
    """Bad evaluation input (labels file, directory, model name); the message says which.

    ``usage`` is False when the input was well-formed but led nowhere (no labelled study
    found): the CLI then exits 1 rather than 2.
    """

    def __init__(self, message: str, *, usage: bool = True) -> None:
        super().__init__(message)
        self.usage = usage


# -- labels and studies --------------------------------------------------------------------
def load_labels(path: Path, known_labels: Sequence[str]) -> dict[str, dict[str, int]]:
    """StudyInstanceUID -> label -> 0/1 from a long or wide CSV (see the module docstring).

    Raises
    ------
    EvaluationError
        Missing file, no ``study_instance_uid`` column, a value other than 0/1, a label the
        model does not have, or no label at all.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise EvaluationError(f"labels file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"labels file {path} unreadable: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    if "study_instance_uid" not in columns:
        raise EvaluationError(
            f"labels file {path}: no study_instance_uid column "
            f"(columns: {', '.join(columns) or 'none'})"
        )
    long_form = set(columns) == {"study_instance_uid", "label", "value"}
    label_columns = [] if long_form else [c for c in columns if c != "study_instance_uid"]
    known = set(known_labels)
    unknown = sorted(set(label_columns) - known)
    if unknown:
        raise EvaluationError(
            f"labels file {path}: the model has no label(s) "
            f"{', '.join(unknown)} (it has: {', '.join(known_labels)})"
        )
    out: dict[str, dict[str, int]] = {}
    for line_no, row in enumerate(reader, start=2):
        uid = (row.get("study_instance_uid") or "").strip()
        if not uid:
            continue
        items = (
            [((row.get("label") or "").strip(), row.get("value"))]
            if long_form
            else [(c, row.get(c)) for c in label_columns]
        )
        for label, raw in items:
            value = (raw or "").strip()
            if value == "":
                continue
            if long_form and label not in known:
                raise EvaluationError(
                    f"labels file {path} line {line_no}: the model has no "
                    f"label {label!r} (it has: {', '.join(known_labels)})"
                )
            if value not in ("0", "1", "0.0", "1.0"):
                raise EvaluationError(
                    f"labels file {path} line {line_no}: value {value!r} "
                    f"for {label}: expected 0 or 1"
                )
            out.setdefault(uid, {})[label] = int(float(value))
    if not out:
        raise EvaluationError(f"labels file {path} holds no label")
    return out


def scan_studies(directory: Path) -> tuple[dict[str, list[Path]], int]:
    """StudyInstanceUID -> image files under ``directory`` (recursive), and the number of
    files skipped (not DICOM, or without pixel data)."""
    import pydicom

    if not Path(directory).is_dir():
        raise EvaluationError(f"not a directory: {directory}")
    studies: dict[str, list[Path]] = {}
    skipped = 0
    for path in sorted(Path(directory).rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "Rows"]
            )
            uid = str(ds.StudyInstanceUID)
            if "Rows" not in ds:
                raise ValueError("no image")
        except Exception:  # not DICOM, no study UID, not an image
            skipped += 1
            continue
        studies.setdefault(uid, []).append(path)
    return studies, skipped


def age_band(patient_age: str | None) -> str:
    """``"045Y"`` -> ``"40-59"``; months, weeks and days count as ``0-17``; else unknown."""
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", str(patient_age or ""))
    if not m:
        return "unknown"
    years = int(m.group(1)) if m.group(2) in ("Y", "") else 0
    return (
        next(name for low, high, name in _AGE_BANDS if low <= years < high)
        if years < 200
        else "unknown"
    )


def _attributes(ds: Any) -> dict[str, str]:
    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip()

    sex = text("PatientSex").upper()
    return {
        "sex": sex if sex in ("M", "F", "O") else "unknown",
        "age_band": age_band(text("PatientAge")),
        "manufacturer": text("Manufacturer") or "unknown",
        "view_position": text("ViewPosition").upper() or "unknown",
    }


@dataclass
class LabelledStudy:
    """One study's scores (None when it could not be analysed) and subgroup attributes."""

    study_instance_uid: str
    labels: dict[str, int]
    scores: dict[str, float] | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    routed: bool = True
    error: str | None = None


def _select(
    paths: Sequence[Path],
    headers: Sequence[Any],
    routes: Sequence[RouteSettings],
    fallback_rule: str,
    model: str,
) -> tuple[list[Path], bool]:
    """The files the production route would analyse; else the same series rule without the
    body part and description conditions (``routed`` False)."""
    from dicomai.ingest.record import extract_record
    from dicomai.routing import StudyInfo, select_route, summarise_series

    rows: list[dict[str, Any]] = []
    for path, ds in zip(paths, headers, strict=True):
        rec = extract_record(ds, "", str(ds.get("SOPClassUID", "")))
        rows.append(
            {
                "path": path,
                "series_instance_uid": rec.series_instance_uid,
                "modality": rec.modality,
                "body_part": rec.body_part,
                "series_number": rec.series_number,
                "image_type": rec.image_type,
                "view_position": rec.view_position,
                "study_description": rec.study_description,
                "series_description": rec.series_description,
                "orientation": rec.orientation,
            }
        )
    study = StudyInfo(study_instance_uid="", series=tuple(summarise_series(rows)))
    decision = select_route(study, routes)
    routed = decision is not None
    if decision is None:
        anything = RouteSettings(
            name="evaluate",
            model=model,
            destinations=[],
            modality=sorted({str(r["modality"]) for r in rows}),
            # a series rule name taken from the route; pydantic validates it at run time
            series_rule=fallback_rule,  # type: ignore[arg-type]
        )
        decision = select_route(study, [anything])
    if decision is None:
        return [], False
    chosen = set(decision.series_instance_uids)
    return [r["path"] for r in rows if r["series_instance_uid"] in chosen], routed


def score_studies(
    settings: Settings,
    model: str,
    studies: Mapping[str, Sequence[Path]],
    labels: Mapping[str, dict[str, int]],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[LabelledStudy]:
    """Run ``model`` on every labelled study found; one :class:`LabelledStudy` each."""
    import pydicom

    from dicomai.db import utcnow
    from dicomai.errors import UnsupportedInput
    from dicomai.inference.findings import Task
    from dicomai.inference.processing import analyse
    from dicomai.inference.worker import ModelPool

    spec = settings.models[model]
    backend = ModelPool(settings).get(model)
    routes = [r for r in settings.routes if r.model == model]
    rule = routes[0].series_rule if routes else _FALLBACK_RULE.get(spec.task, "all")
    todo = [uid for uid in labels if uid in studies]
    out = []
    for i, uid in enumerate(todo):
        case = LabelledStudy(study_instance_uid=uid, labels=labels[uid])
        try:
            headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in studies[uid]]
            chosen, case.routed = _select(studies[uid], headers, routes, rule, model)
            if not chosen:
                raise UnsupportedInput("no usable series")
            datasets = [pydicom.dcmread(p) for p in chosen]
            case.attributes = _attributes(datasets[0])
            findings = analyse(Task(spec.task), datasets, backend, spec, utcnow())
            case.scores = {k: float(v) for k, v in findings.study_scores.items()}
        except Exception as exc:  # one unreadable or odd study must not end the evaluation
            case.error = f"{type(exc).__name__}: {exc}"[:200]
        out.append(case)
        if progress is not None:
            progress(i + 1, len(todo))
    return out


# -- statistics ------------------------------------------------------------------------------
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


def _figures(
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
        row = {"label": label, **_figures(y, s, threshold, boot, labelled)}
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
                            **_figures(y, s, threshold, boot, mask),
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


def suggested_thresholds_toml(report: Mapping[str, Any]) -> str | None:
    """``[models.NAME]`` + ``thresholds = {...}`` for the suggested operating points."""
    items = [
        (r["label"], r["suggested"]["threshold"]) for r in report["labels"] if r.get("suggested")
    ]
    if not items:
        return None
    body = ", ".join(
        f"{label} = {t:.4f}" if re.fullmatch(r"[A-Za-z0-9_-]+", label) else f'"{label}" = {t:.4f}'
        for label, t in items
    )
    return f"[models.{report['model']['name']}]\nthresholds = {{ {body} }}"


# -- output ------------------------------------------------------------------------------------
def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def render_table(report: Mapping[str, Any]) -> Any:
    """A rich renderable: per-label table, then subgroups (when computed)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    m, d, b = report["model"], report["data"], report["bootstrap"]
    parts: list[Any] = [
        Text(
            f"{m['name']} {m['version']} on {d['analysed']} studies "
            f"({d['not_analysed']} not analysed, {d['labelled_not_found']} labelled but not "
            f"found, {d['analysed_without_route_match']} analysed without a route match); "
            f"95% CI from {b['resamples']} bootstrap resamples (seed {b['seed']})"
        )
    ]
    t = Table(box=box.SIMPLE, title="per label", title_justify="left")
    cols = [
        "label",
        "n",
        "pos",
        "AUROC (95% CI)",
        "threshold",
        "sensitivity (95% CI)",
        "specificity (95% CI)",
        "PPV",
        "NPV",
    ]
    suggest = report.get("target_sensitivity") is not None
    if suggest:
        cols += [f"suggested @ sens {report['target_sensitivity']:g}", "sens", "spec"]
    for c in cols:
        t.add_column(c, justify="left" if c == "label" else "right")
    for r in report["labels"]:
        row = [
            r["label"],
            str(r["n"]),
            str(r["positives"]),
            _with_ci(r["auroc"], r["auroc_ci"]),
            f"{r['threshold']:g}",
            _with_ci(r["sensitivity"], r["sensitivity_ci"]),
            _with_ci(r["specificity"], r["specificity_ci"]),
            _f(r["ppv"]),
            _f(r["npv"]),
        ]
        if suggest:
            sg = r.get("suggested") or {}
            row += [
                _f(sg.get("threshold"), 4),
                _f(sg.get("sensitivity")),
                _f(sg.get("specificity")),
            ]
        t.add_row(*row)
    parts.append(t)
    if report["subgroups"]:
        st = Table(box=box.SIMPLE, title="subgroups", title_justify="left")
        for c in (
            "attribute",
            "value",
            "label",
            "n",
            "pos",
            "AUROC (95% CI)",
            "sensitivity",
            "specificity",
        ):
            st.add_column(c, justify="right" if c in ("n", "pos") else "left")
        for r in report["subgroups"]:
            st.add_row(
                r["attribute"],
                r["value"],
                r["label"],
                str(r["n"]),
                str(r["positives"]),
                _with_ci(r["auroc"], r["auroc_ci"]),
                _f(r["sensitivity"]),
                _f(r["specificity"]),
            )
        parts.append(st)
    toml = suggested_thresholds_toml(report)
    if toml:
        parts.append(Text("suggested thresholds for the configuration:\n" + toml))
    return Group(*parts)


def _roc_png(label: str, roc: Mapping[str, Sequence[float]], row: Mapping[str, Any]) -> str:
    """Base64 PNG of one label's ROC curve with its operating point(s)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=96)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    ax.plot(
        roc["fpr"],
        roc["tpr"],
        drawstyle="default",
        color="#1f5fa8",
        linewidth=2,
        label=f"AUROC {_f(row['auroc'])}",
    )
    if row["sensitivity"] is not None and row["specificity"] is not None:
        ax.plot(
            [1 - row["specificity"]],
            [row["sensitivity"]],
            "o",
            color="#c0392b",
            label=f"threshold {row['threshold']:g}",
        )
    sg = row.get("suggested")
    if sg and sg.get("sensitivity") is not None and sg.get("specificity") is not None:
        ax.plot(
            [1 - sg["specificity"]],
            [sg["sensitivity"]],
            "s",
            color="#27ae60",
            label=f"suggested {sg['threshold']:.4f}",
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(label)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(report: Mapping[str, Any], path: Path) -> Path:
    """A self-contained HTML report (tables, ROC PNGs embedded as base64)."""
    e = html.escape
    m, d, b = report["model"], report["data"], report["bootstrap"]
    suggest = report.get("target_sensitivity") is not None

    def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    headers = [
        "label",
        "n",
        "positives",
        "AUROC (95% CI)",
        "threshold",
        "sensitivity (95% CI)",
        "specificity (95% CI)",
        "PPV",
        "NPV",
    ]
    if suggest:
        headers += [
            f"suggested threshold (sensitivity {report['target_sensitivity']:g})",
            "sensitivity",
            "specificity",
        ]
    rows = []
    for r in report["labels"]:
        row = [
            r["label"],
            str(r["n"]),
            str(r["positives"]),
            _with_ci(r["auroc"], r["auroc_ci"]),
            f"{r['threshold']:g}",
            _with_ci(r["sensitivity"], r["sensitivity_ci"]),
            _with_ci(r["specificity"], r["specificity_ci"]),
            _f(r["ppv"]),
            _f(r["npv"]),
        ]
        if suggest:
            sg = r.get("suggested") or {}
            row += [
                _f(sg.get("threshold"), 4),
                _f(sg.get("sensitivity")),
                _f(sg.get("specificity")),
            ]
        rows.append(row)
    figures = "".join(
        f'<figure><img alt="ROC curve of {e(r["label"])}" src="data:image/png;base64,'
        f'{_roc_png(r["label"], report["roc"][r["label"]], r)}"></figure>'
        for r in report["labels"]
    )
    sub = ""
    if report["subgroups"]:
        sub = (
            "<h2>Subgroups</h2>"
            + table(
                [
                    "attribute",
                    "value",
                    "label",
                    "n",
                    "positives",
                    "AUROC (95% CI)",
                    "sensitivity (95% CI)",
                    "specificity (95% CI)",
                ],
                [
                    [
                        r["attribute"],
                        r["value"],
                        r["label"],
                        str(r["n"]),
                        str(r["positives"]),
                        _with_ci(r["auroc"], r["auroc_ci"]),
                        _with_ci(r["sensitivity"], r["sensitivity_ci"]),
                        _with_ci(r["specificity"], r["specificity_ci"]),
                    ]
                    for r in report["subgroups"]
                ],
            )
            + "<p>Small subgroups give wide intervals; a dash means the subgroup lacks "
            "positives or negatives for that figure.</p>"
        )
    toml = suggested_thresholds_toml(report)
    toml_html = f"<h2>Suggested thresholds</h2><pre>{e(toml)}</pre>" if toml else ""
    reasons = ", ".join(f"{k}: {v}" for k, v in d["not_analysed_reasons"].items()) or "none"
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>dicomai evaluation: {e(m["name"])} {e(m["version"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f2f2f2; }}
figure {{ display: inline-block; margin: 0.5em; }}
.note {{ color: #555; }}
</style></head><body>
<h1>Evaluation of {e(m["name"])} {e(m["version"])}</h1>
<p class="note">Generated {e(report["generated_at"])} by dicomai. Model file
{e(m["path"])}, SHA-256 {e(str(m["sha256"]))}, device {e(m["device"])}.<br>
{e(str(m["description"] or ""))}</p>
<h2>Data</h2>
<p>{d["analysed"]} studies analysed of {d["labelled"]} labelled ({d["labelled_not_found"]}
labelled but not found under {e(d["directory"])}; {d["not_analysed"]} not analysed: {e(reasons)};
{d["analysed_without_route_match"]} analysed without matching the model's route;
{d["files_skipped"]} files skipped as not DICOM images).</p>
<p>A study is positive for a label when its study-level score reaches the threshold.
95% confidence intervals are percentiles of {b["resamples"]} study-level bootstrap
resamples (seed {b["seed"]}).</p>
<h2>Per label</h2>
{table(headers, rows)}
{toml_html}
<h2>ROC curves</h2>
{figures}
{sub}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


def write_scores_csv(report: Mapping[str, Any], path: Path) -> Path:
    """One row per study: UID, per-label score and label, error."""
    labels = [r["label"] for r in report["labels"]]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "study_instance_uid",
                *(f"score_{x}" for x in labels),
                *(f"label_{x}" for x in labels),
                "error",
            ]
        )
        for s in report["scores"]:
            scores = s["scores"] or {}
            w.writerow(
                [
                    s["study_instance_uid"],
                    *("" if x not in scores else f"{scores[x]:.6f}" for x in labels),
                    *(s["labels"].get(x, "") for x in labels),
                    s["error"] or "",
                ]
            )
    return Path(path)
