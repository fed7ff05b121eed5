"""`dicomai models evaluate`: run a configured model on a labelled set of studies and report
AUROC, sensitivity and specificity at the configured thresholds, with bootstrap confidence
intervals, per-subgroup figures, suggested thresholds and an HTML report with ROC curves.

The studies are DICOM files under one directory (any layout; grouped by StudyInstanceUID).
Each study goes through the same series selection (the model's route, see
:mod:`dicomai.routing`), preprocessing and study-level aggregation
(:func:`dicomai.inference.processing.analyse`) as in production, with the model loaded by
:class:`dicomai.models.pool.ModelPool`.

Labels come from a CSV file in one of two shapes:

- long: columns ``study_instance_uid,label,value`` with value 0 or 1;
- wide: a ``study_instance_uid`` column and one column per label (0, 1, or empty for
  "not labelled").

Nothing here writes patient data: reports carry aggregate figures only (the per-study score
file, when asked for, names studies by StudyInstanceUID).

Modules: `studies` (labels file, files, scoring), `statistics`, `run` (the report as data),
`tables` (terminal table, CSV), `html_report` (HTML with ROC curves).
"""

from dicomai_tools.evaluate.html_report import write_html
from dicomai_tools.evaluate.run import evaluate
from dicomai_tools.evaluate.statistics import (
    auroc,
    bootstrap_indices,
    roc_curve,
    sensitivity_specificity,
    suggest_threshold,
)
from dicomai_tools.evaluate.studies import (
    SUBGROUP_ATTRIBUTES,
    EvaluationError,
    LabelledStudy,
    age_band,
    load_labels,
    scan_studies,
)
from dicomai_tools.evaluate.tables import render_table, write_scores_csv

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
    "write_scores_csv",
]
