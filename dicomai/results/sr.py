"""Structured Report (TID 1500 Measurement Report) from a model's findings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from dicomai.inference.findings import Findings, ModelIdentity, Task, result_uid
from dicomai.results.codes import (
    PRIVATE_SCHEME,
    PROCEDURE_CT,
    PROCEDURE_XR,
    QUALITATIVE_EVALUATIONS,
    LabelCode,
    bone_site,
    private_scheme_item,
)
from dicomai.results.common import (
    add_air_equipment,
    check_findings,
    check_sources,
    comment_text,
    content_when,
    no_name_warnings,
    stamp_series_time,
    uid_key,
    with_type2_defaults,
)
from dicomai.results.regions import SourceRegion, analysed_frame, image_hits, locate

__all__ = ["SR_CLASSES", "SR_SERIES_DESCRIPTION", "build_sr"]


SR_CLASSES: Mapping[str, type[hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR]]
SR_CLASSES = {
    "comprehensive3d": hd.sr.Comprehensive3DSR,
    "comprehensive": hd.sr.ComprehensiveSR,
    "enhanced": hd.sr.EnhancedSR,
}
SR_SERIES_DESCRIPTION = "AI RESULT - NOT FOR DIAGNOSTIC USE"


def build_sr(
    sources: Sequence[Dataset],
    findings: Findings,
    *,
    sr_class: str = "comprehensive3d",
    series_number: int,
    max_slice_groups: int = 50,
    previous_sr_refs: Sequence[tuple[str, str, str, str]] = (),
    regions: Mapping[tuple[str, str], SourceRegion] | None = None,
) -> Dataset:
    """TID 1500 Measurement Report of one model run.

    Parameters
    ----------
    sources
        Every instance the model analysed (headers are enough), all of one study.
    findings
        What the model found.
    sr_class
        ``"comprehensive3d"``, ``"comprehensive"`` or ``"enhanced"``.
    series_number
        Series Number of the SR series.
    max_slice_groups
        Most per-slice groups (CT) in the report.
    previous_sr_refs
        ``(study_uid, series_uid, sop_class_uid, sop_instance_uid)`` of SRs this one amends.
    regions
        Where present findings were found, by ``(sop_uid, label)``
        (:func:`dicomai.results.regions.locate`); ``None``: located here.

    Returns
    -------
    pydicom.dataset.Dataset
        The SR, with deterministic Series and SOP Instance UIDs.

    Raises
    ------
    ValueError
        If an argument is invalid.
    """
    if sr_class not in SR_CLASSES:
        raise ValueError(f'Argument "sr_class" must be one of {sorted(SR_CLASSES)}.')
    if max_slice_groups < 0:
        raise ValueError('Argument "max_slice_groups" must not be negative.')
    check_sources(sources)
    table = check_findings(sources, findings)
    predecessors = _predecessors(previous_sr_refs)
    model = findings.model
    evidence = [with_type2_defaults(ds) for ds in sources]
    base = uid_key(sources, model)
    thresholds = {label: float(findings.thresholds[label]) for label in findings.labels}

    if regions is None:
        regions = locate(sources, findings)

    if model.task == Task.HEAD_CT_ICH:
        procedure = PROCEDURE_CT
    else:
        procedure = PROCEDURE_XR
    groups = _located_groups(evidence, findings, table, base, regions, limit=max_slice_groups)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
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
        procedure_reported=procedure,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    qualitative = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS"
    )
    qualitative.ContentSequence = hd.sr.ContentSequence(_summary(findings, table, thresholds))
    report[0].ContentSequence.append(qualitative)
    report[0].ContinuityOfContent = "SEPARATE"
    _separate(report[0].ContentSequence)

    uses_private = any(
        table[label].finding.scheme_designator == PRIVATE_SCHEME for label in findings.labels
    )
    sop_class = SR_CLASSES[sr_class]
    sop_key = {
        **base,
        "sop_class": sr_class,
        "thresholds": thresholds,
        "max_slice_groups": max_slice_groups,
        "predecessors": sorted(tuple(ref) for ref in previous_sr_refs),
    }
    with no_name_warnings():
        sr = sop_class(
            evidence=evidence,
            content=report,
            series_instance_uid=result_uid("sr-series", **base),
            series_number=series_number,
            sop_instance_uid=result_uid("sr", **sop_key),
            instance_number=1,
            manufacturer=model.vendor,
            manufacturer_model_name=model.name,
            software_versions=model.version,
            series_description=SR_SERIES_DESCRIPTION,
            is_complete=True,
            is_final=False,
            is_verified=False,
            content_qualification="RESEARCH",
            coding_schemes=[private_scheme_item()] if uses_private else None,
            previous_versions=predecessors or None,
            **content_when(findings.started),
        )
    add_air_equipment(sr, model)
    stamp_series_time(sr, findings.started)
    return sr


def _predecessors(refs: Sequence[tuple[str, str, str, str]]) -> list[Dataset]:
    """Minimal datasets for highdicom's ``previous_versions`` from UID 4-tuples."""
    out = []
    for ref in refs:
        if len(ref) != 4 or not all(isinstance(v, str) and UID(v).is_valid for v in ref):
            raise ValueError(
                'Argument "previous_sr_refs" must hold (study_uid, series_uid, sop_class_uid, '
                "sop_instance_uid) tuples of valid UIDs."
            )
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID = ref
        out.append(ds)
    return out


def _evaluation(row: LabelCode, score: float, threshold: float) -> Code:
    return row.values[0] if score >= threshold else row.values[1]


def _algorithm(model: ModelIdentity, threshold: float) -> hd.sr.AlgorithmIdentification:
    """TID 4019; the manufacturer is left out (pixelmed warns; the device observer has it)."""
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        family=codes.DCM.ArtificialIntelligence,
        parameters=[f"threshold={threshold:.4g}", f"sha256={model.sha256}"],
    )


def _tracking(model: ModelIdentity, base: Mapping[str, object], name: str,
              **extra: object) -> hd.sr.TrackingIdentifier:  # fmt: skip
    uid = result_uid("tracking:" + name, **base, **extra)
    return hd.sr.TrackingIdentifier(uid=uid, identifier=f"{model.name}:{name}")


def _laterality(ds: Dataset) -> Code | None:
    value = ds.get("ImageLaterality") or ds.get("Laterality")
    return {"L": codes.SCT.Left, "R": codes.SCT.Right}.get(str(value or ""))


def _located_groups(
    evidence: Sequence[Dataset],
    findings: Findings,
    table: Mapping[str, LabelCode],
    base: Mapping[str, object],
    regions: Mapping[tuple[str, str], SourceRegion],
    *,
    limit: int,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 group per finding at a location (a present label's region on one image),
    highest score first, at most ``limit``; when there is none, one group for the whole key
    image (:func:`_whole_image_group`).

    The score (TID 300 NUM "Certainty of Finding") is INFERRED FROM the region's outline, a
    closed POLYLINE box (SCOORD) on the image it was computed from; a Comment names the finding
    and says it is not for diagnostic use. This is the shape OHIF 3 draws with its text, and
    every group references its image (the group's source image and the SCOORD's image).
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for score, uid, label in image_hits(findings):
        region = regions.get((uid, label))
        if region is None:
            continue
        if len(groups) == limit:
            break
        ds, row = by_uid[uid], table[label]
        value = _evaluation(row, score, findings.thresholds[label])
        comment = f"{row.title}: {value.meaning} - AI result, not for diagnostic use"
        name = f"{_image_name(ds, evidence)}:{label}"
        groups.append(
            _group(findings, row, label, ds, score, region.box, comment,
                   _tracking(findings.model, base, name, sop_uid=uid))
        )  # fmt: skip
    if not groups:
        groups.append(_whole_image_group(evidence, findings, table, base))
    return groups


def _whole_image_group(
    evidence: Sequence[Dataset],
    findings: Findings,
    table: Mapping[str, LabelCode],
    base: Mapping[str, object],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """No finding has a location (nothing is present, or the model gives no maps): one group
    for the label with the highest score on the key image, over the whole image the model
    assessed. A report needs at least one group with coordinates: OHIF 3.13 cannot open a
    report without one, and highdicom cannot build one."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    uid = next((u for u in findings.key_image_uids if u in by_uid), str(evidence[0].SOPInstanceUID))
    ds = by_uid[uid]
    label = max(findings.labels, key=lambda lab: findings.study_scores[lab])
    score = findings.image_scores.get(uid, {}).get(label, findings.study_scores[label])
    row = table[label]
    value = _evaluation(row, findings.study_scores[label], findings.thresholds[label])
    if findings.positive_labels:
        comment = f"{row.title}: {value.meaning} (no location) - AI result, not for diagnostic use"
    else:
        comment = (
            f"No finding at or above threshold (highest: {row.title} "
            f"{100.0 * findings.study_scores[label]:.0f}%) - AI result, not for diagnostic use"
        )
    box = (0.0, 0.0, float(ds.Columns), float(ds.Rows))
    name = f"{_image_name(ds, evidence)}:{label}:whole-image"
    return _group(findings, row, label, ds, score, box, comment,
                  _tracking(findings.model, base, name, sop_uid=uid))  # fmt: skip


def _group(
    findings: Findings,
    row: LabelCode,
    label: str,
    ds: Dataset,
    score: float,
    box: tuple[float, float, float, float],
    comment: str,
    tracking: hd.sr.TrackingIdentifier,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group on image ``ds``: its score INFERRED FROM the closed POLYLINE ``box``
    (image coordinates), its evaluation, and ``comment``."""
    site = bone_site(ds.get("BodyPartExamined")) if row.site == codes.SCT.Bone else row.site
    threshold = findings.thresholds[label]
    c0, r0, c1, r1 = box
    outline = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=float)
    certainty = hd.sr.Measurement(
        name=codes.DCM.CertaintyOfFinding,
        value=round(100.0 * float(score), 1),
        unit=codes.UCUM.Percent,
        referenced_coordinates=[
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=outline,
                source_image=hd.sr.SourceImageForRegion.from_source_image(
                    ds, referenced_frame_numbers=_frames(ds)
                ),
            )
        ],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=row.finding if row.finding != codes.DCM.Normality else None,
        finding_sites=[hd.sr.FindingSite(site, laterality=_laterality(ds))],
        algorithm_id=_algorithm(findings.model, threshold),
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(
                ds, referenced_frame_numbers=_frames(ds)
            )
        ],
        measurements=[certainty],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(row.finding, _evaluation(row, score, threshold))
        ],
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(name=codes.DCM.Comment, value=comment, relationship_type="CONTAINS")
    )
    return group


def _summary(
    findings: Findings, table: Mapping[str, LabelCode], thresholds: Mapping[str, float]
) -> list[hd.sr.ContentItem]:
    """Report-level Qualitative Evaluations (TID 1500 row 12): every label once, its
    evaluation with its study score as a property, then the disclaimer.

    Findings without a location live here only: a measurement group without coordinates
    stops OHIF 3 from showing the report at all.
    """
    items: list[hd.sr.ContentItem] = []
    for label in findings.labels:
        row = table[label]
        score = findings.study_scores[label]
        item = hd.sr.CodeContentItem(
            name=row.finding,
            value=_evaluation(row, score, thresholds[label]),
            relationship_type="CONTAINS",
        )
        item.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.NumContentItem(
                    name=codes.DCM.CertaintyOfFinding,
                    value=round(100.0 * float(score), 1),
                    unit=codes.UCUM.Percent,
                    relationship_type="HAS PROPERTIES",
                )
            ]
        )
        items.append(item)
    items.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=comment_text(findings.model),
            relationship_type="CONTAINS",
        )
    )
    return items


def _frames(ds: Dataset) -> list[int] | None:
    """The analysed frame of a multi-frame image (a region lies on that frame only)."""
    return [analysed_frame(ds)] if int(ds.get("NumberOfFrames") or 1) > 1 else None


def _image_name(ds: Dataset, evidence: Sequence[Dataset]) -> str:
    """``image:<InstanceNumber>`` (else its 1-based position): part of tracking identifiers."""
    number = ds.get("InstanceNumber")
    if number is None:
        number = next(i for i, other in enumerate(evidence, start=1) if other is ds)
    return f"image:{number}"


def _separate(items: Sequence[Dataset]) -> None:
    """Every CONTAINER below ``items`` SEPARATE: DCMTK's dsr2html and text views print a
    CONTINUOUS container's values as one sentence, without their concept names."""
    for item in items:
        if item.get("ValueType") == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        if "ContentSequence" in item:
            _separate(item.ContentSequence)
