"""Read the report-level summary of dicomai's SR back in tests: every label once, its
evaluation (Present/Absent, Abnormal/Normal) and its study score in %."""

from __future__ import annotations

import pydicom

from dicomai.results.codes import table_for

QUALITATIVE_EVALUATIONS = "C0034375"
_TASKS = {"chest-xray": "chest_xray", "head-ct-ich": "head_ct_ich", "bone-xray": "bone_xray"}


def summary(sr_ds: pydicom.Dataset, model: str) -> dict[str, tuple[str, float]]:
    """Label -> (code value of its evaluation, certainty in %), from the Qualitative
    Evaluations container: one CODE item per label with a HAS PROPERTIES NUM.

    Raises AssertionError when a label is listed twice or an item is shaped otherwise.
    """
    by_code = {row.finding.value: label for label, row in table_for(_TASKS[model]).items()}
    (container,) = [item for item in sr_ds.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == QUALITATIVE_EVALUATIONS]
    out: dict[str, tuple[str, float]] = {}
    for item in container.ContentSequence:
        if item.ValueType != "CODE":
            continue
        (num,) = item.ContentSequence
        assert num.RelationshipType == "HAS PROPERTIES" and num.ValueType == "NUM"
        label = by_code[item.ConceptNameCodeSequence[0].CodeValue]
        assert label not in out, f"{label} listed twice"
        out[label] = (str(item.ConceptCodeSequence[0].CodeValue),
                      float(num.MeasuredValueSequence[0].NumericValue))
    return out


def summary_scores(sr_ds: pydicom.Dataset, model: str) -> dict[str, float]:
    """Label -> certainty in % (see :func:`summary`)."""
    return {label: score for label, (_, score) in summary(sr_ds, model).items()}
