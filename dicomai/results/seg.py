"""DICOM Segmentation of where the model found each finding: the viewer overlays it on the
source images, and the radiologist toggles it and sets its opacity.

One binary SEG per source series (and image size) that has a region; one segment per label,
named after the finding. Frames without a region are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomai.inference.findings import Findings, result_uid
from dicomai.results.codes import (
    ABNORMAL,
    NORMALITY,
    PRIVATE_SCHEME,
    LabelCode,
    private_scheme_item,
)
from dicomai.results.common import (
    NOT_FOR_DIAGNOSTIC_USE,
    add_air_equipment,
    clip_text,
    model_line,
    no_name_warnings,
    sentences,
    stamp_series_time,
    uid_key,
    with_type2_defaults,
)
from dicomai.results.heatmap import DEFAULT_CUTOFF
from dicomai.results.regions import SourceRegion

__all__ = ["SEG_SERIES_DESCRIPTION", "build_seg"]

SEG_SERIES_DESCRIPTION = "AI REGIONS - NOT FOR DIAGNOSTIC USE"
#: Segment colours (CIELab), one per label in turn: high-contrast on greyscale.
_COLOURS = ((60.0, 80.0, 60.0), (85.0, -10.0, 80.0), (60.0, -60.0, 50.0), (55.0, 20.0, -60.0))


def build_seg(
    sources: Sequence[Dataset],
    findings: Findings,
    table: Mapping[str, LabelCode],
    regions: Mapping[tuple[str, str], SourceRegion],
    *,
    series_number: int,
) -> list[Dataset]:
    """Segmentations of ``regions`` (from :func:`dicomai.results.regions.locate`).

    Parameters
    ----------
    sources
        Every analysed instance; those with a region need their Rows/Columns (and, for CT,
        their plane position and orientation).
    findings
        The model run.
    table
        Label codes of the task.
    regions
        Regions by ``(sop_uid, label)``; empty: no SEG.
    series_number
        Series Number of the SEG series (every SEG of the run shares the series).

    Returns
    -------
    list[pydicom.dataset.Dataset]
        One SEG per source series and image size with a region, instance numbers 1..N.
    """
    if not regions:
        return []
    model = findings.model
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    # One SEG per series and image size; images without a frame of reference (radiographs) get
    # one each: their SEG frames cannot be placed relative to each other.
    groups: dict[tuple[str, int, int, str], list[Dataset]] = {}
    for uid, _label in regions:
        ds = by_uid[uid]
        if int(ds.get("NumberOfFrames") or 1) > 1:
            continue  # the SEG maps frames of single-frame images only; the SR has the region
        alone = "" if "FrameOfReferenceUID" in ds else uid
        key = (str(ds.SeriesInstanceUID), int(ds.Rows), int(ds.Columns), alone)
        if all(str(other.SOPInstanceUID) != uid for other in groups.get(key, [])):
            groups.setdefault(key, []).append(ds)
    if not groups:
        return []
    labels = [label for label in findings.labels if any(k[1] == label for k in regions)]
    base = uid_key(sources, model)
    series_uid = result_uid("seg-series", **base)
    thresholds = {label: float(findings.thresholds[label]) for label in findings.labels}
    out: list[Dataset] = []
    for index, (key, images) in enumerate(sorted(groups.items())):
        images.sort(key=lambda ds: int(ds.get("InstanceNumber") or 0))
        present = [lab for lab in labels if any((str(ds.SOPInstanceUID), lab) in regions
                                                for ds in images)]  # fmt: skip
        _, rows, columns, _ = key
        masks = np.zeros((len(images), rows, columns, len(present)), dtype=bool)
        for i, ds in enumerate(images):
            for j, label in enumerate(present):
                region = regions.get((str(ds.SOPInstanceUID), label))
                if region is not None:
                    masks[i, :, :, j] = region.on_source_grid(rows, columns)
        descriptions = [
            _segment(findings, table[label], label, number, base)
            for number, label in enumerate(present, start=1)
        ]
        with no_name_warnings():
            seg = hd.seg.Segmentation(
                source_images=[with_type2_defaults(ds) for ds in images],
                pixel_array=masks,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=result_uid(
                    "seg", **base, group=list(key), thresholds=thresholds, cutoff=DEFAULT_CUTOFF
                ),
                instance_number=index + 1,
                manufacturer=model.vendor,
                manufacturer_model_name=model.name,
                software_versions=model.version,
                device_serial_number=model.short_hash,
                content_label="AI_REGIONS",
                content_description="AI regions - not for diagnostic use",
                content_creator_name="dicomai^AI",
                transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
            )
        if "FrameOfReferenceUID" not in images[0]:
            _add_projection_geometry(seg, images[0])
        if any(
            d.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
            for d in descriptions
        ):
            seg.CodingSchemeIdentificationSequence = [private_scheme_item()]
        seg.SeriesDescription = SEG_SERIES_DESCRIPTION
        seg.ContentQualification = "RESEARCH"
        seg.ImageComments = clip_text(
            sentences(
                "AI-generated regions where the model's activation is high", NOT_FOR_DIAGNOSTIC_USE,
                f"Model {model_line(model)}: {model.description}",
            ),
            10240,
        )  # fmt: skip
        stamp_series_time(seg, findings.started)
        seg.ContentDate, seg.ContentTime = (
            seg.SeriesDate,
            seg.SeriesTime,
        )  # not "now": rebuilds agree
        add_air_equipment(seg, model)
        out.append(seg)
    return out


def _segment(
    findings: Findings, row: LabelCode, label: str, number: int, base: Mapping[str, object]
) -> hd.seg.SegmentDescription:
    """One segment: the finding as its property type, its site as the anatomic region."""
    model = findings.model
    finding = ABNORMAL if row.finding == NORMALITY else row.finding
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=f"{row.title} (AI)"[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=finding,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model.name,
            family=codes.DCM.ArtificialIntelligence,
            version=model.version,
            parameters={
                "threshold": f"{findings.thresholds[label]:.4g}",
                "activation_cutoff": f"{DEFAULT_CUTOFF:.2f}",
                "sha256": model.sha256,
            },
        ),
        tracking_uid=result_uid("seg-segment:" + label, **base),
        tracking_id=f"{model.name}:{label}",
        anatomic_regions=[row.site],
        display_color=hd.color.CIELabColor(*_COLOURS[(number - 1) % len(_COLOURS)]),
    )


def _add_projection_geometry(seg: Dataset, src: Dataset) -> None:
    """Pixel Measures and Plane Orientation for a SEG of a projection radiograph.

    highdicom writes neither when the source has no frame of reference (CR, DX), and OHIF 3
    needs both to overlay the SEG: the pixel spacing of the source (Pixel Spacing, else Imager
    Pixel Spacing, else 1 mm) and the image axes as rows and columns, which is how viewers
    place a projection image without a patient coordinate system.
    """
    spacing = None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = src.get(keyword)
        try:
            pair = [float(v) for v in value] if value is not None else []
        except (TypeError, ValueError):
            pair = []
        if len(pair) == 2 and min(pair) > 0:
            spacing = pair
            break
    measures = Dataset()
    measures.PixelSpacing = [f"{v:.6g}" for v in (spacing or [1.0, 1.0])]
    measures.SliceThickness = "1"
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = (seg.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    seg.SharedFunctionalGroupsSequence = [shared]
    value = src.get("PatientOrientation")
    seg.PatientOrientation = list(value) if value is not None and len(value) == 2 else ""
