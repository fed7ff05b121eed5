"""Secondary Capture images: key images with the heat map and a caption burned in."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomai.inference.findings import Findings, ModelIdentity, Task, result_uid
from dicomai.results.codes import PRESENT, LabelCode
from dicomai.results.common import (
    NOT_FOR_DIAGNOSTIC_USE,
    add_air_equipment,
    check_findings,
    check_sources,
    clip_text,
    content_when,
    model_line,
    no_name_warnings,
    sentences,
    stamp_series_time,
    uid_key,
    with_type2_defaults,
)
from dicomai.results.display import MAX_SIDE, HeatLayer, compose, display_rgb, fit_size, resize_rgb
from dicomai.results.regions import analysed_frame

__all__ = [
    "HEATMAP_CHOICES",
    "SC_SERIES_DESCRIPTION",
    "Renderer",
    "build_sc",
    "build_sc_series",
    "caption_lines",
    "render_key_image",
]

SC_SERIES_DESCRIPTION = "AI OVERLAY - NOT FOR DIAGNOSTIC USE"
_CAPTION_TITLE = "AI RESULT - NOT FOR DIAGNOSTIC USE"
#: When the SC shows a heat map: only for a finding at or above its threshold (default),
#: always (the top-scoring label, even below threshold), or never.
HEATMAP_CHOICES = ("positive", "always", "never")
#: Body parts that dciodvfy treats as paired (PS3.16 Annex L): an SC of one without a known
#: laterality gets an empty Laterality (Type 2C), not none.
_PAIRED = frozenset(
    {
        "ACJOINT", "ADRENAL", "ANKLE", "ARM", "BREAST", "CALCANEUS", "CLAVICLE", "EAR", "ELBOW",
        "EXTREMITY", "EYE", "FEMUR", "FIBULA", "FINGER", "FOOT", "FOREARM", "HAND", "HEEL", "HIP",
        "HUMERUS", "KIDNEY", "KNEE", "LEG", "LOWERLIMB", "LOWLEG", "LUNG", "ORBIT", "OVARY",
        "PATELLA", "RADIUS", "RIB", "SCAPULA", "SCJOINT", "SHOULDER", "SIJOINT", "TESTIS",
        "THIGH", "THUMB", "TIBIA", "TMJ", "TOE", "ULNA", "UPPERARM", "UPPERLIMB", "UPRLIMB",
        "WRIST",
    }
)  # fmt: skip
#: BodyPartExamined when neither the source nor the model names one.
_TASK_BODY_PART = {Task.CHEST_XRAY: "CHEST", Task.HEAD_CT_ICH: "HEAD", Task.BONE_XRAY: "EXTREMITY"}


#: Gives the picture of a key image's frame (0-based): uint8 RGB, at most the SC's size.
Renderer = Callable[[Dataset, int], np.ndarray]


def render_key_image(src: Dataset, frame: int) -> np.ndarray:
    """The picture an SC shows of ``src``'s ``frame`` (0-based): as a viewer shows it
    (:func:`~dicomai.results.display.display_rgb`, decoded no larger than needed), scaled to
    the SC's size."""
    rgb = display_rgb(src, frame=frame, max_side=MAX_SIDE)  # no larger than the SC needs
    return resize_rgb(rgb, fit_size(int(src.Rows), int(src.Columns)))


def build_sc_series(
    sources: Sequence[Dataset],
    findings: Findings,
    *,
    series_number: int,
    max_images: int,
    heatmap: str = "positive",
    render: Renderer | None = None,
) -> list[Dataset]:
    """One SC per key image (most suspicious first, at most ``max_images``), in one series.

    Parameters
    ----------
    sources
        Every instance the model analysed; key images must carry pixel data.
    findings
        What the model found; ``key_image_uids`` picks the images.
    series_number
        Series Number of the SC series.
    max_images
        Most SC images.
    heatmap
        One of :data:`HEATMAP_CHOICES`.
    render
        Gives a key image's picture instead of :func:`render_key_image` in this thread (the
        worker renders in its decode processes).

    Returns
    -------
    list[pydicom.dataset.Dataset]
        SC images, instance numbers 1..N.

    Raises
    ------
    UnsupportedInput
        A key image has no pixel data or cannot be decoded.
    """
    if max_images < 0:
        raise ValueError('Argument "max_images" must not be negative.')
    if heatmap not in HEATMAP_CHOICES:
        raise ValueError(f'Argument "heatmap" must be one of {list(HEATMAP_CHOICES)}.')
    check_sources(sources)
    table = check_findings(sources, findings)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    base = uid_key(sources, findings.model)
    series_uid = result_uid("sc-series", **base)
    thresholds = {label: float(findings.thresholds[label]) for label in findings.labels}
    return [
        build_sc(
            by_uid[uid],
            findings,
            table,
            base={**base, "thresholds": thresholds},
            series_uid=series_uid,
            series_number=series_number,
            index=index,
            heatmap=heatmap,
            render=render,
        )
        for index, uid in enumerate(findings.key_image_uids[:max_images])
    ]


def build_sc(
    src: Dataset,
    findings: Findings,
    table: Mapping[str, LabelCode],
    *,
    base: Mapping[str, object],
    series_uid: str,
    series_number: int,
    index: int,
    heatmap: str = "positive",
    render: Renderer | None = None,
) -> Dataset:
    """One SC image of ``src`` (first frame if multi-frame), at most MAX_SIDE pixels a side.

    Parameters
    ----------
    src
        Key image with pixel data.
    findings
        What the model found.
    table
        Label codes of the task.
    base
        UID content key of the run (:func:`~dicomai.results.sr.uid_key`).
    series_uid
        SC series shared by every SC of the run.
    series_number
        Series Number of the SC series.
    index
        0-based position in the series.
    heatmap
        One of :data:`HEATMAP_CHOICES`.
    render
        Gives the picture of ``src`` instead of :func:`render_key_image`.

    Returns
    -------
    pydicom.dataset.Dataset
        An RGB Secondary Capture Image with ``BurnedInAnnotation`` YES.
    """
    model = findings.model
    uid = str(src.SOPInstanceUID)
    frame = analysed_frame(src)
    rgb = (render or render_key_image)(src, frame - 1)
    size = fit_size(int(src.Rows), int(src.Columns))
    heat = _heat_layer(findings, table, uid, heatmap)
    lines = caption_lines(findings, table, uid, heat is not None, heatmap)
    pixels = compose(resize_rgb(rgb, size), lines, heat)
    patient_orientation, known = _orientation(src)
    laterality = str(src.get("ImageLaterality") or src.get("Laterality") or "")
    with no_name_warnings():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=with_type2_defaults(src),
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=result_uid("sc", **base, source_uid=uid, index=index),
            instance_number=index + 1,
            manufacturer=model.vendor,
            manufacturer_model_name=model.name,
            software_versions=model.version,
            patient_orientation=patient_orientation,
            laterality=laterality if laterality in ("L", "R") else None,
            series_description=SC_SERIES_DESCRIPTION,
            content_qualification="RESEARCH",
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
            **content_when(findings.started),
        )
        sc.copy_patient_and_study_information(src)
    if not known:
        sc["PatientOrientation"].value = ""  # Type 2: empty when unknown
    body_part = (
        src.get("BodyPartExamined") or model.body_part.upper() or _TASK_BODY_PART[model.task]
    )
    sc.BodyPartExamined = str(body_part)[:16]
    if "Laterality" not in sc and "".join(sc.BodyPartExamined.split()) in _PAIRED:
        sc.Laterality = ""  # Type 2C: paired part, laterality actually unknown
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    sc.ImageComments = clip_text(
        sentences(
            "AI-generated image", NOT_FOR_DIAGNOSTIC_USE,
            f"Model {model_line(model)}: {model.description}",
        ),
        10240,
    )  # fmt: skip
    what = f"heat map of {heat.title} and text" if heat is not None else "text"
    sc.DerivationDescription = clip_text(
        sentences(
            f"{model_line(model)}: {what} beside the source image, burned in",
            model.description, NOT_FOR_DIAGNOSTIC_USE,
        ),
        1024,
    )  # fmt: skip
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    if int(src.get("NumberOfFrames") or 1) > 1:
        ref.ReferencedFrameNumber = frame
    ref.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [ref]
    add_air_equipment(sc, model)
    stamp_series_time(sc, findings.started)
    return sc


def _heat_layer(
    findings: Findings, table: Mapping[str, LabelCode], uid: str, heatmap: str
) -> HeatLayer | None:
    """The heat map of the top label on image ``uid``, if there is one and it is to be shown:
    by default only when the label is present in the study and, where the model scored
    images, on this image too."""
    label = findings.top_label
    cam = findings.heatmaps.get(uid)
    if heatmap == "never" or cam is None or label is None or label not in table:
        return None
    if heatmap == "positive":
        image_score = findings.image_scores.get(uid, {}).get(label)
        if not findings.is_present(label) or (
            image_score is not None and image_score < findings.thresholds[label]
        ):
            return None
    return HeatLayer(cam=cam, title=table[label].title)


def caption_lines(
    findings: Findings,
    table: Mapping[str, LabelCode],
    uid: str,
    with_heat: bool,
    heatmap: str = "positive",
) -> list[str]:
    """Text beside the SC image: disclaimer, model, description, findings, what the map is."""
    model: ModelIdentity = findings.model
    lines = [_CAPTION_TITLE, f"{model.name} {model.version} sha256 {model.short_hash}"]
    lines.append(sentences(model.description))
    positives = findings.positive_labels
    # Positive labels, and the verdict of abnormal-vs-normal rows either way.
    verdicts = [lab for lab in findings.labels if table[lab].values[0] != PRESENT]
    shown = [*positives, *(lab for lab in verdicts if lab not in positives)]
    for label in shown:
        row = table[label]
        value = row.values[0] if label in positives else row.values[1]
        lines.append(
            f"{row.title}: {value.meaning} (score {_pct(findings.study_scores[label])}, "
            f"threshold {_pct(findings.thresholds[label])})"
        )
    if not positives:
        top = max(findings.labels, key=lambda lab: findings.study_scores[lab])
        lines.append(
            f"No finding at or above threshold (highest: {table[top].title} "
            f"{_pct(findings.study_scores[top])})"
        )
    image_scores = findings.image_scores.get(uid, {})
    if model.task == Task.HEAD_CT_ICH and image_scores:
        hits = [
            f"{table[label].title} {_pct(score)}"
            for label, score in sorted(image_scores.items(), key=lambda kv: -kv[1])
            if score >= findings.thresholds[label]
        ]
        lines.append("This slice: " + (", ".join(hits) if hits else "below threshold"))
    if not with_heat and heatmap == "positive" and findings.heatmaps.get(uid) is not None:
        lines.append("No heat map: no finding at or above threshold on this image.")
    return lines


def _pct(value: float) -> str:
    return f"{100.0 * float(value):.0f}%"


def _orientation(src: Dataset) -> tuple[tuple[str, str], bool]:
    """PatientOrientation of ``src``, else derived from ImageOrientationPatient; known or not."""
    value = src.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2:
        return (str(value[0]), str(value[1])), True
    if "ImageOrientationPatient" in src and len(src.ImageOrientationPatient) == 6:
        iop = [float(v) for v in src.ImageOrientationPatient]

        def letter(v: list[float]) -> str:
            i = max(range(3), key=lambda k: abs(v[k]))
            return "LPH"[i] if v[i] > 0 else "RAF"[i]

        return (letter(iop[:3]), letter(iop[3:])), True
    return ("L", "F"), False  # placeholder for the constructor; emptied by the caller
