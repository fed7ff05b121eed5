"""Structured Report (TID 1500 Measurement Report) from a model's findings, plus shared helpers."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from dicomai.findings import DISCLAIMER, Findings, ModelIdentity, Task, result_uid
from dicomai.results.codes import (
    PRIVATE_SCHEME,
    PROCEDURE_CT,
    PROCEDURE_XR,
    QUALITATIVE_EVALUATIONS,
    LabelCode,
    bone_site,
    private_scheme_item,
    table_for,
)

__all__ = [
    "SR_CLASSES",
    "SR_SERIES_DESCRIPTION",
    "add_air_equipment",
    "air_contributing_equipment",
    "build_sr",
    "check_findings",
    "check_sources",
    "clip_text",
    "comment_text",
    "content_when",
    "model_line",
    "no_name_warnings",
    "uid_key",
    "with_type2_defaults",
]

SR_CLASSES: Mapping[str, type[hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR]]
SR_CLASSES = {
    "comprehensive3d": hd.sr.Comprehensive3DSR,
    "comprehensive": hd.sr.ComprehensiveSR,
    "enhanced": hd.sr.EnhancedSR,
}
SR_SERIES_DESCRIPTION = "AI RESULT - NOT FOR DIAGNOSTIC USE"
#: IHE AIR Rev 1.1 purpose of the "Processing Algorithm" Contributing Equipment item.
PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@contextmanager
def no_name_warnings() -> Iterator[None]:
    """Silence highdicom's person-name warning, which quotes the name (PHI) in its text."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The string .* person name", category=UserWarning)
        yield


def with_type2_defaults(ds: Dataset) -> Dataset:
    """Copy of ``ds`` with the attributes highdicom reads from evidence present (maybe empty)."""
    out = Dataset()
    out.update(ds)  # new container; Dataset(ds) and ds.copy() would share ds's elements
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in out:
            setattr(out, keyword, None)
    return out


def check_sources(sources: Sequence[Dataset]) -> None:
    """Check that ``sources`` is a non-empty list of distinct instances of one study.

    Raises
    ------
    ValueError
        If not; the message names the argument, never a value.
    """
    if len(sources) == 0:
        raise ValueError('Argument "sources" must not be empty.')
    for ds in sources:
        if not isinstance(ds, Dataset):
            raise TypeError('Argument "sources" must contain pydicom Datasets.')
        for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not ds.get(keyword):
                raise ValueError(f'Argument "sources" has an instance without {keyword}.')
    if len({str(ds.StudyInstanceUID) for ds in sources}) != 1:
        raise ValueError('Argument "sources" must all belong to one study.')
    if len({str(ds.SOPInstanceUID) for ds in sources}) != len(sources):
        raise ValueError('Argument "sources" must not repeat an instance.')


def check_findings(sources: Sequence[Dataset], findings: Findings) -> Mapping[str, LabelCode]:
    """Check ``findings`` against its task's code table and ``sources``; return the table.

    Raises
    ------
    ValueError
        If a label has no code, a score or threshold is missing or outside [0, 1], or an image
        score or key image names an instance that is not in ``sources``.
    """
    if not isinstance(findings, Findings):
        raise TypeError('Argument "findings" must be a Findings.')
    table = table_for(findings.model.task)
    if not findings.labels:
        raise ValueError('Argument "findings" has no labels.')
    for label in findings.labels:
        if label not in table:
            raise ValueError(f'Argument "findings" has label "{label}", which has no code.')
        for what, values in (("score", findings.study_scores), ("threshold", findings.thresholds)):
            value = values.get(label)
            if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f'Argument "findings" needs a {what} in [0, 1] for "{label}".')
    known = {str(ds.SOPInstanceUID) for ds in sources}
    for uid, scores in findings.image_scores.items():
        if uid not in known:
            raise ValueError('Argument "findings" scores an instance that is not in "sources".')
        for label, value in scores.items():
            if label not in table or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError('Argument "findings" has an invalid image score.')
    if any(uid not in known for uid in findings.key_image_uids):
        raise ValueError('Argument "findings" has a key image that is not in "sources".')
    if findings.started.tzinfo is None:
        raise ValueError('Argument "findings" must have an aware "started" time.')
    return table


def uid_key(sources: Sequence[Dataset], model: ModelIdentity) -> dict[str, object]:
    """Content key of a result: study, sorted input instances, model name, version and hash."""
    return {
        "study_uid": str(sources[0].StudyInstanceUID),
        "source_uids": sorted(str(ds.SOPInstanceUID) for ds in sources),
        "model": model.name,
        "version": model.version,
        "sha256": model.sha256,
    }


def model_line(model: ModelIdentity) -> str:
    """``name version (sha256 …)``: the model as every object records it."""
    return f"{model.name} {model.version} (sha256 {model.sha256})"


def content_when(started: datetime | None) -> dict[str, Any]:
    """``content_date``/``content_time`` keyword arguments pinned to ``started``, in UTC."""
    if started is None:
        return {}
    utc = started.astimezone(UTC)
    return {"content_date": utc.date(), "content_time": utc.time()}


def air_contributing_equipment(model: ModelIdentity) -> Dataset:
    """IHE AIR "Processing Algorithm" Contributing Equipment item (a plain Dataset: highdicom's
    ContributingEquipment takes only DCM purposes)."""
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PROCESSING_ALGORITHM
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = model.vendor
    item.ManufacturerModelName = model.name
    item.SoftwareVersions = model.version
    item.DeviceUID = model.device_uid  # dciodvfy: "not present in standard DICOM IOD" (warning)
    item.ContributionDescription = clip_text(
        f"{model_line(model)}: {model.description}. Not for diagnostic use.", 1024
    )
    return item


def add_air_equipment(ds: Dataset, model: ModelIdentity) -> None:
    """Append the AIR item to the Contributing Equipment Sequence of ``ds``."""
    if "ContributingEquipmentSequence" not in ds:
        ds.ContributingEquipmentSequence = []
    ds.ContributingEquipmentSequence.append(air_contributing_equipment(model))


def build_sr(
    sources: Sequence[Dataset],
    findings: Findings,
    *,
    sr_class: str = "comprehensive3d",
    series_number: int,
    max_slice_groups: int = 50,
    previous_sr_refs: Sequence[tuple[str, str, str, str]] = (),
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

    if model.task == Task.HEAD_CT_ICH:
        groups = _label_groups(evidence, findings, table, base, image_refs=False)
        groups += _slice_groups(evidence, findings, table, base, limit=max_slice_groups)
        procedure = PROCEDURE_CT
    elif model.task == Task.BONE_XRAY:
        groups = _image_groups(evidence, findings, table, base)
        procedure = PROCEDURE_XR
    else:
        groups = _label_groups(evidence, findings, table, base, image_refs=True)
        procedure = PROCEDURE_XR

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
    qualitative.ContentSequence = hd.sr.ContentSequence(
        [
            *(
                hd.sr.CodeContentItem(
                    name=table[label].finding,
                    value=_evaluation(
                        table[label], findings.study_scores[label], thresholds[label]
                    ),
                    relationship_type="CONTAINS",
                )
                for label in findings.labels
            ),
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=comment_text(model), relationship_type="CONTAINS"
            ),
        ]
    )
    report[0].ContentSequence.append(qualitative)

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
    return sr


def comment_text(model: ModelIdentity) -> str:
    """Report-level comment: the disclaimer, the model and its description."""
    return f"{DISCLAIMER} Model {model_line(model)}: {model.description}."


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _certainty(score: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=codes.DCM.CertaintyOfFinding,
        value=round(100.0 * float(score), 1),
        unit=codes.UCUM.Percent,
    )


def _tracking(model: ModelIdentity, base: Mapping[str, object], name: str,
              **extra: object) -> hd.sr.TrackingIdentifier:  # fmt: skip
    uid = result_uid("tracking:" + name, **base, **extra)
    return hd.sr.TrackingIdentifier(uid=uid, identifier=f"{model.name}:{name}")


def _laterality(ds: Dataset) -> Code | None:
    value = ds.get("ImageLaterality") or ds.get("Laterality")
    return {"L": codes.SCT.Left, "R": codes.SCT.Right}.get(str(value or ""))


def _group(
    findings: Findings,
    row: LabelCode,
    *,
    tracking: hd.sr.TrackingIdentifier,
    score: float,
    threshold: float,
    images: Sequence[Dataset] | None,
    site: hd.sr.FindingSite,
    evaluate: bool = True,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group. A Normality row has no finding type: the evaluation says it all."""
    presence = row.finding != codes.DCM.Normality
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=row.finding if presence else None,
        finding_sites=[site],
        algorithm_id=_algorithm(findings.model, threshold),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in images]
        if images
        else None,
        measurements=[_certainty(score)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(row.finding, _evaluation(row, score, threshold))
        ]
        if evaluate
        else None,
    )


def _label_groups(
    evidence: Sequence[Dataset],
    findings: Findings,
    table: Mapping[str, LabelCode],
    base: Mapping[str, object],
    *,
    image_refs: bool,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One study-level group per label; ``image_refs=False`` relies on the evidence list (CT)."""
    return [
        _group(
            findings,
            table[label],
            tracking=_tracking(findings.model, base, label),
            score=findings.study_scores[label],
            threshold=findings.thresholds[label],
            images=evidence if image_refs else None,
            site=hd.sr.FindingSite(table[label].site),
        )
        for label in findings.labels
    ]


def _slice_groups(
    evidence: Sequence[Dataset],
    findings: Findings,
    table: Mapping[str, LabelCode],
    base: Mapping[str, object],
    *,
    limit: int,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per slice and subtype at or above threshold, highest first, capped.

    "any" is reported for a slice only when no subtype of that slice reaches its threshold.
    """
    position = {str(ds.SOPInstanceUID): i for i, ds in enumerate(evidence)}
    hits: list[tuple[float, int, str, str]] = []
    for uid, scores in findings.image_scores.items():
        above = [
            label
            for label in findings.labels
            if label in scores and scores[label] >= findings.thresholds[label]
        ]
        subtypes = [label for label in above if label != "any"]
        for label in subtypes or above:
            hits.append((float(scores[label]), position[uid], uid, label))
    hits.sort(key=lambda hit: (-hit[0], hit[1], hit[3]))
    groups = []
    for score, index, uid, label in hits[:limit]:
        ds = evidence[index]
        number = ds.get("InstanceNumber")
        slice_name = f"slice:{number if number is not None else index + 1}:{label}"
        groups.append(
            _group(
                findings,
                table[label],
                tracking=_tracking(findings.model, base, slice_name, sop_uid=uid),
                score=score,
                threshold=findings.thresholds[label],
                images=[ds],
                site=hd.sr.FindingSite(table[label].site),
                evaluate=False,
            )
        )
    return groups


def _image_groups(
    evidence: Sequence[Dataset],
    findings: Findings,
    table: Mapping[str, LabelCode],
    base: Mapping[str, object],
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """Bone X-ray: one group per image and label with that image's score and finding site.

    An image without its own scores gets the study score; a run without image scores at all
    gives one group per label over every image.
    """
    if not findings.image_scores:
        return _label_groups(evidence, findings, table, base, image_refs=True)
    groups = []
    for index, ds in enumerate(evidence):
        uid = str(ds.SOPInstanceUID)
        number = ds.get("InstanceNumber")
        image_name = f"image:{number if number is not None else index + 1}"
        scores = findings.image_scores.get(uid, {})
        for label in findings.labels:
            row = table[label]
            site = bone_site(ds.get("BodyPartExamined")) if row.site == codes.SCT.Bone else row.site
            groups.append(
                _group(
                    findings,
                    row,
                    tracking=_tracking(findings.model, base, f"{image_name}:{label}", sop_uid=uid),
                    score=scores.get(label, findings.study_scores[label]),
                    threshold=findings.thresholds[label],
                    images=[ds],
                    site=hd.sr.FindingSite(site, laterality=_laterality(ds)),
                )
            )
    return groups
