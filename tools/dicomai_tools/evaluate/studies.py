"""The labelled studies: the labels file, the DICOM files under a directory, and each
study scored through the production route, preprocessing and aggregation."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomai.config import RouteSettings, Settings
from dicomai.errors import DicomAIError

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
    from dicomai.models.pool import ModelPool

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
