"""Basic Text SR: the findings as plain sentences, and the "could not be completed" notice."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime

import highdicom as hd
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomai.inference.findings import DISCLAIMER, Findings, ModelIdentity, Task, result_uid
from dicomai.results.codes import LabelCode
from dicomai.results.common import (
    add_air_equipment,
    check_findings,
    check_sources,
    content_when,
    model_line,
    no_name_warnings,
    stamp_series_time,
    uid_key,
    with_type2_defaults,
)

__all__ = [
    "FAILURE_SERIES_DESCRIPTION",
    "TEXT_SR_SERIES_DESCRIPTION",
    "build_failure_text_sr",
    "build_text_sr",
    "finding_lines",
]

TEXT_SR_SERIES_DESCRIPTION = "AI RESULT TEXT - NOT FOR DIAGNOSTIC USE"
FAILURE_SERIES_DESCRIPTION = "AI NOT COMPLETED - NOT FOR DIAGNOSTIC USE"
FAILURE_TEXT = "AI analysis could not be completed."
_REASON_CODE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")


def build_text_sr(sources: Sequence[Dataset], findings: Findings, *, series_number: int) -> Dataset:
    """Basic Text SR with one sentence per label, for PACS that render nothing else.

    Parameters
    ----------
    sources
        Every instance the model analysed (headers are enough), all of one study.
    findings
        What the model found.
    series_number
        Series Number of the text SR series.

    Returns
    -------
    pydicom.dataset.Dataset
        A Basic Text SR with deterministic UIDs.
    """
    check_sources(sources)
    table = check_findings(sources, findings)
    model = findings.model
    base = uid_key(sources, model)
    thresholds = {label: float(findings.thresholds[label]) for label in findings.labels}
    lines = [
        f"Model: {model_line(model)}.",
        f"Model description: {model.description}.",
        *finding_lines(findings, table),
    ]
    return _text_sr(
        sources,
        model,
        lines,
        series_uid=result_uid("text-sr-series", **base),
        sop_uid=result_uid("text-sr", **base, thresholds=thresholds),
        series_number=series_number,
        series_description=TEXT_SR_SERIES_DESCRIPTION,
        started=findings.started,
    )


def build_failure_text_sr(
    sources: Sequence[Dataset],
    model: ModelIdentity,
    reason_code: str,
    *,
    series_number: int,
    started: datetime | None = None,
) -> Dataset:
    """Basic Text SR saying that the AI analysis of the study could not be completed.

    Parameters
    ----------
    sources
        Instances the model was to analyse (headers are enough), all of one study.
    model
        The model that was to run.
    reason_code
        Our short reason code, e.g. ``"unsupported_input"``; never dataset text.
    series_number
        Series Number of the notice.
    started
        When the attempt started (aware); pins ContentDate/Time. ``None``: now.

    Returns
    -------
    pydicom.dataset.Dataset
        A Basic Text SR with deterministic UIDs.
    """
    if not isinstance(reason_code, str) or not _REASON_CODE.fullmatch(reason_code):
        raise ValueError(
            'Argument "reason_code" must be a short lower-case code, e.g. "unsupported_input".'
        )
    if not isinstance(model, ModelIdentity):
        raise TypeError('Argument "model" must be a ModelIdentity.')
    if started is not None and started.tzinfo is None:
        raise ValueError('Argument "started" must be an aware datetime.')
    check_sources(sources)
    base = uid_key(sources, model)
    lines = [
        FAILURE_TEXT,
        f"Reason: {reason_code}.",
        f"Model: {model_line(model)}.",
        f"Model description: {model.description}.",
    ]
    return _text_sr(
        sources,
        model,
        lines,
        series_uid=result_uid("failure-series", **base),
        sop_uid=result_uid("failure", **base, reason=reason_code),
        series_number=series_number,
        series_description=FAILURE_SERIES_DESCRIPTION,
        started=started,
    )


def finding_lines(findings: Findings, table: Mapping[str, LabelCode]) -> list[str]:
    """``Pneumothorax: PRESENT (score 91%, threshold 50%)``, one per label, in model order."""
    lines = []
    for label in findings.labels:
        row = table[label]
        score, threshold = findings.study_scores[label], findings.thresholds[label]
        value = row.values[0] if score >= threshold else row.values[1]
        lines.append(
            f"{row.title}: {value.meaning.upper()} "
            f"(score {100 * score:.0f}%, threshold {100 * threshold:.0f}%)."
        )
    if findings.model.task == Task.HEAD_CT_ICH and findings.image_scores:
        slices = sum(
            any(score >= findings.thresholds[label] for label, score in scores.items())
            for scores in findings.image_scores.values()
        )
        lines.append(
            f"Slices at or above a threshold: {slices} of {len(findings.image_scores)} scored."
        )
    lines.append("Scores are model outputs, not calibrated probabilities.")
    return lines


def _text_sr(
    sources: Sequence[Dataset],
    model: ModelIdentity,
    lines: Sequence[str],
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    series_description: str,
    started: datetime | None,
) -> Dataset:
    """TID 2000-shaped tree built as an Enhanced SR, then relabelled Basic Text SR (doc §9)."""
    evidence = [with_type2_defaults(ds) for ds in sources]
    findings_item = hd.sr.ContainerContentItem(
        name=codes.DCM.Findings, relationship_type="CONTAINS"
    )  # 121070 DCM: pixelmed warns on the 59776-5 LN heading
    findings_item.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(name=codes.DCM.Finding, value=text, relationship_type="CONTAINS")
            for text in [DISCLAIMER, *lines]
        ]
    )
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence(
        [
            *hd.sr.LanguageOfContentItemAndDescendants(
                hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
            ),
            *hd.sr.ObservationContext(
                observer_device_context=hd.sr.ObserverContext(
                    observer_type=codes.DCM.Device,
                    observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                        uid=model.device_uid,
                        name=model.name,
                        manufacturer_name=model.vendor,
                        model_name=model.name,
                    ),
                )
            ),
            findings_item,
        ]
    )
    with no_name_warnings():
        sr = hd.sr.EnhancedSR(
            evidence=evidence,
            content=root,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=model.vendor,
            manufacturer_model_name=model.name,
            software_versions=model.version,
            series_description=series_description,
            is_complete=True,
            content_qualification="RESEARCH",
            **content_when(started),
        )
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    add_air_equipment(sr, model)
    stamp_series_time(sr, started)
    return sr
