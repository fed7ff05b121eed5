"""Tests of dicomai.results: SR, SC, SEG, KOS, Basic Text SR and failure notice builders."""

from __future__ import annotations

import copy
import io
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr._concepts_dict import concepts
from pydicom.sr.codedict import codes
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    KeyObjectSelectionDocumentStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)

from dicomai.errors import UnsupportedInput
from dicomai.inference.findings import DISCLAIMER, UID_ROOT, Findings, ModelIdentity, Task
from dicomai.results import ResultOptions, build_failure_notice, build_results
from dicomai.results.codes import (
    ICH,
    PRIVATE_SCHEME,
    UNVERIFIED_CANDIDATES,
    CodeStatus,
    bone_site,
    table_for,
)
from dicomai.results.common import comment_text, sentences
from dicomai.results.display import (
    MAX_SIDE,
    MIN_SIDE,
    display_rgb,
    fit_size,
    resize_rgb,
)
from dicomai.results.heatmap import DEFAULT_CUTOFF, activation_on_grid, body_mask
from dicomai.results.regions import analysed_frame, locate
from dicomai.results.sc import caption_lines
from dicomai_tools.synthetic import make_xray, recompress

DATA = Path(__file__).resolve().parent.parent / "data" / "real"
STARTED = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
SHA = "0123456789abcdef" * 4
SENTINEL = "PHI^SENTINEL"
_TEST_ROOT = "1.2.826.0.1.3680043.8.498.999."
#: dicomai.models.reference.REFERENCE_DESCRIPTION (not imported: that module loads torch).
REFERENCE_DESCRIPTION = (
    "Untrained reference model (random weights, fixed seed). Not for diagnostic use."
)
LABELS = {
    Task.CHEST_XRAY: (
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
        "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural_thickening",
        "hernia",
    ),
    Task.HEAD_CT_ICH: (
        "any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural",
    ),
    Task.BONE_XRAY: ("abnormal",),
}  # fmt: skip
MODEL_NAMES = {Task.CHEST_XRAY: "chest-xray", Task.HEAD_CT_ICH: "head-ct-ich",
               Task.BONE_XRAY: "bone-xray"}  # fmt: skip
NO_HEAT_MAP = "No heat map: no finding at or above threshold on this image."
PRESENT, ABSENT = ("52101004", "SCT"), ("272519000", "SCT")
CERTAINTY = ("111012", "DCM")


# --------------------------------------------------------------------------- helpers


def _model(task: Task, **changes: str) -> ModelIdentity:
    model = ModelIdentity(
        name=MODEL_NAMES[task],
        version="0.1.0",
        sha256=SHA,
        task=task,
        architecture="densenet121",
        description="untrained reference model",
    )
    return replace(model, **changes)


def _findings(
    sources: Sequence[Dataset],
    task: Task,
    *,
    model: ModelIdentity | None = None,
    key_uids: Sequence[str] | None = None,
    image_scores: dict[str, dict[str, float]] | None = None,
    study_scores: dict[str, float] | None = None,
) -> Findings:
    """Alternating scores 0.9 / 0.2 (threshold 0.5): labels 0, 2, 4... present.

    As inference builds them: a heat map per key image (top label), and a CAM per label present
    in the study on every image where that label reaches its threshold.
    """
    labels = LABELS[task]
    if study_scores is None:
        study_scores = {label: (0.9 if i % 2 == 0 else 0.2) for i, label in enumerate(labels)}
    scores = study_scores
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    keys = tuple(uids[:1] if key_uids is None else key_uids)
    if image_scores is None:
        image_scores = {uid: dict(scores) for uid in uids}
    heat = np.outer(np.hanning(16), np.hanning(16))
    return Findings(
        model=model or _model(task),
        labels=labels,
        thresholds=dict.fromkeys(labels, 0.5),
        study_scores=scores,
        image_scores=image_scores,
        key_image_uids=keys,
        started=STARTED,
        heatmaps={uid: heat for uid in keys},
        top_label=labels[0],
        label_heatmaps={
            label: {
                uid: heat for uid, image in image_scores.items() if image.get(label, 0.0) >= 0.5
            }
            for label in labels
            if scores[label] >= 0.5
        },
    )


def _roundtrip(ds: Dataset) -> Dataset:
    """Write with writing_validation_mode RAISE (fixture) and read back."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _sr(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return hd.sr.srread(buf)


def _uid(*parts: object) -> str:
    return str(generate_uid(prefix=_TEST_ROOT, entropy_srcs=[repr(parts)]))


def _ct_series(n: int = 6, size: int = 96, *, study: str = "ct-study") -> list[Dataset]:
    """Synthetic axial head CT slices: HU rescale, geometry, a skull ring and a bleed."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    out = []
    for i in range(n):
        hu = np.where(r < 0.8, 35, -1000).astype(np.int16)
        hu[(r >= 0.8) & (r < 0.9)] = 1200
        hu[(np.hypot(yy - size * 0.4, xx - size * 0.6) < size / 10) & (i % 2 == 0)] = 70
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = _uid(study, "sop", i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = _uid(study)
        ds.SeriesInstanceUID = _uid(study, "series")
        ds.FrameOfReferenceUID = _uid(study, "for")
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID = SENTINEL, "PHI-0001"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20250101", "120000", "A1", "1"
        ds.ReferringPhysicianName = "Doe^Jane"
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "Synthetic", "HEAD"
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 2, i + 1, 1
        ds.PositionReferenceIndicator, ds.KVP = "", 120
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-24, -24, 5.0 * i]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 5
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        out.append(ds)
    return out


def _headers(sources: Sequence[Dataset], keep: Sequence[str] = ()) -> list[Dataset]:
    """Header-only copies, except the instances in ``keep``."""
    out = []
    for ds in sources:
        if str(ds.SOPInstanceUID) in keep:
            out.append(ds)
            continue
        head = Dataset()
        for elem in ds:
            if elem.keyword != "PixelData":
                head.add(copy.deepcopy(elem))  # own elements: callers change some
        out.append(head)
    return out


def _read(rel: str) -> Dataset:
    return pydicom.dcmread(DATA / rel)


def _groups(sr: hd.sr.Comprehensive3DSR) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    return list(sr.content.get_image_measurement_groups())


def _evaluation(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: object) -> object:
    (item,) = group.get_qualitative_evaluations(name=name)
    return item.value


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _value(item: Dataset) -> tuple[str, str]:
    code = item.ConceptCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
    """Every content item below ``items``, depth first."""
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _top(ds: Dataset, code_value: str) -> list[Dataset]:
    """Items of the root content sequence named ``code_value``."""
    return [
        item
        for item in ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


def _summary(ds: Dataset) -> list[Dataset]:
    (container,) = [item for item in _top(ds, "C0034375") if item.ValueType == "CONTAINER"]
    return list(container.ContentSequence)


def _whole_image_group(ds: Dataset, *, negative: bool) -> Dataset:
    """Assert that the report's only measurement group is the whole-image group of a study
    where nothing has a location (OHIF 3.13 cannot open a report without a group with
    coordinates): a closed box around the whole key image, and a comment that says why."""
    (container,) = _top(ds, "126010")
    (group,) = container.ContentSequence
    (scoord,) = [i for i in _walk(group.ContentSequence) if i.ValueType == "SCOORD"]
    (image,) = scoord.ContentSequence
    ref = image.ReferencedSOPSequence[0]
    (comment,) = [i for i in group.ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue == "121106"]  # fmt: skip
    if negative:
        assert comment.TextValue.startswith("No finding at or above threshold (highest: ")
    else:
        assert ": Present (no location) - " in comment.TextValue or "(no location)" in (
            comment.TextValue
        )
    assert comment.TextValue.endswith("AI result, not for diagnostic use")
    return ref, [float(v) for v in scoord.GraphicData]


def _group_items(ds: Dataset) -> list[Dataset]:
    """The Measurement Group containers of the (single) Imaging Measurements container."""
    (container,) = _top(ds, "126010")
    return list(container.ContentSequence)


def _texts(item: Dataset, code_value: str) -> list[str]:
    """TextValue of every TEXT item named ``code_value`` below ``item``, depth first."""
    found = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == "TEXT" and child.ConceptNameCodeSequence[0].CodeValue == code_value:
            found.append(str(child.TextValue))
        found += _texts(child, code_value)
    return found


def _all_uids(objs: Sequence[Dataset]) -> list[tuple[str, str]]:
    return [(str(o.SeriesInstanceUID), str(o.SOPInstanceUID)) for o in objs]


def _of(objs: Sequence[Dataset], modality: str) -> list[Dataset]:
    return [o for o in objs if o.Modality == modality]


def _box(graphic_data: Sequence[float]) -> tuple[float, float, float, float]:
    """``(col0, row0, col1, row1)`` of a closed 5-point axis-aligned POLYLINE; asserts its shape."""
    points = np.asarray(graphic_data, dtype=float).reshape(-1, 2)
    assert points.shape == (5, 2), "a box: 4 corners and the first again"
    assert np.array_equal(points[0], points[-1]), "closed"
    (c0, r0), (c1, _), (_, r1) = points[0], points[1], points[2]
    expected = [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]
    assert np.allclose(points, expected), "axis-aligned, corners in order"
    return float(c0), float(r0), float(c1), float(r1)


def _image_part(sc: Dataset, src: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the SC's image area, the source as displayed at that size, the text panel)."""
    rows, columns = fit_size(int(src.Rows), int(src.Columns))
    pixels = sc.pixel_array
    base = resize_rgb(display_rgb(src, max_side=MAX_SIDE), (rows, columns))
    return pixels[:rows, :columns], base, pixels[:, columns + 1 :]  # column `columns`: a rule


def _scale_bar_rows(panel: np.ndarray) -> int:
    """Rows of ``panel`` holding a colour bar: a run of 200+ strongly coloured pixels (text is
    white, grey or one yellow and never makes such runs)."""
    chroma = (panel.max(axis=-1).astype(int) - panel.min(axis=-1)) >= 60
    count = 0
    for row in chroma:
        edges = np.diff(np.concatenate([[0], row.astype(int), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if len(starts) and (ends - starts).max() >= 200:
            count += 1
    return count


def _seg_frames(seg: Dataset) -> list[tuple[str, int]]:
    """``(source SOP Instance UID, segment number)`` of every frame of a SEG."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    out = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        (derivation,) = item.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        identification = item.get("SegmentIdentificationSequence") or (
            shared.SegmentIdentificationSequence  # one segment: shared by every frame
        )
        segment = identification[0].ReferencedSegmentNumber
        out.append((str(source.ReferencedSOPInstanceUID), int(segment)))
    return out


def _segment_labels(seg: Dataset) -> list[str]:
    return [str(s.SegmentLabel) for s in seg.SegmentSequence]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def results_raise_on_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


@pytest.fixture(scope="module")
def results_chest_source() -> Dataset:
    # CR, MONOCHROME1, JPEG 2000, PixelSpacing 0\0, no frame of reference, one-component
    # ReferringPhysicianName (highdicom warning).
    return _read("chest_xray/RG1_J2KI.dcm")


@pytest.fixture(scope="module")
def results_chest(results_chest_source: Dataset) -> tuple[Findings, list[Dataset]]:
    findings = _findings([results_chest_source], Task.CHEST_XRAY)
    options = ResultOptions(emit_text_sr=True, emit_ko=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)
        objs = [_roundtrip(o) for o in build_results([results_chest_source], findings, options)]
    return findings, objs


@pytest.fixture(scope="module")
def results_ct_series() -> list[Dataset]:
    return _ct_series()


@pytest.fixture(scope="module")
def results_small_chest() -> Dataset:
    """A small synthetic DX chest (400 x 320): SC tests that do not need a real image."""
    return make_xray("chest", rows=400, cols=320, seed=3)


# --------------------------------------------------------------------------- chest X-ray


def test_chest_objects_in_order(results_chest: tuple[Findings, list[Dataset]]) -> None:
    _, objs = results_chest
    assert [o.SOPClassUID for o in objs] == [
        Comprehensive3DSRStorage,
        BasicTextSRStorage,
        SecondaryCaptureImageStorage,
        KeyObjectSelectionDocumentStorage,
        SegmentationStorage,
    ]
    assert [o.Modality for o in objs] == ["SR", "SR", "OT", "KO", "SEG"]
    assert [o.SeriesNumber for o in objs] == [9101, 9103, 9102, 9104, 9105]
    assert all(str(o.SOPInstanceUID).startswith(UID_ROOT) for o in objs)
    assert all(str(o.SeriesInstanceUID).startswith(UID_ROOT) for o in objs)
    assert len({o.SeriesInstanceUID for o in objs}) == 5


def test_chest_sr_located_groups(
    results_chest: tuple[Findings, list[Dataset]], results_chest_source: Dataset
) -> None:
    findings, (ds, *_) = results_chest
    src = results_chest_source
    uid = str(src.SOPInstanceUID)
    table = table_for(Task.CHEST_XRAY)
    regions = locate([src], findings)
    present = [label for label in findings.labels if findings.is_present(label)]
    assert {label for _, label in regions} == set(present)  # every present label is located
    groups = _groups(_sr(ds))
    labels = [g.tracking_identifier.rsplit(":", 1)[1] for g in groups]
    assert sorted(labels) == sorted(present), "one group per present label, nothing else"
    tracking_uids = [g.tracking_uid for g in groups]
    assert len(set(tracking_uids)) == len(groups)
    for label, group, item in zip(labels, groups, _group_items(ds), strict=True):
        row = table[label]
        assert group.tracking_identifier == f"chest-xray:image:{src.InstanceNumber}:{label}"
        assert group.finding_type == row.finding
        assert [site.value for site in group.finding_sites] == [row.site]
        assert [r.referenced_sop_instance_uid for r in group.source_images] == [uid]
        assert _texts(group[0], "111001") == ["chest-xray"]  # TID 4019 Algorithm Name
        assert _texts(group[0], "111003") == ["0.1.0"]  # Algorithm Version
        assert _texts(group[0], "111002") == ["threshold=0.5", f"sha256={SHA}"]  # Parameters
        assert _evaluation(group, row.finding) == codes.SCT.Present
        (certainty,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert certainty.value == pytest.approx(90.0)
        assert certainty.unit == codes.UCUM.Percent
        # The NUM is INFERRED FROM a closed POLYLINE box on the image, SELECTED FROM it.
        (num,) = [i for i in item.ContentSequence if _concept(i) == CERTAINTY]
        assert num.ValueType == "NUM"
        (scoord,) = num.ContentSequence
        assert (scoord.RelationshipType, scoord.ValueType) == ("INFERRED FROM", "SCOORD")
        assert scoord.GraphicType == "POLYLINE"
        c0, r0, c1, r1 = _box(scoord.GraphicData)
        assert 0 <= c0 < c1 <= src.Columns and 0 <= r0 < r1 <= src.Rows
        assert (c0, r0, c1, r1) == pytest.approx(regions[(uid, label)].box, rel=1e-5)
        (image,) = scoord.ContentSequence
        assert (image.RelationshipType, image.ValueType) == ("SELECTED FROM", "IMAGE")
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid
        assert image.ReferencedSOPSequence[0].ReferencedSOPClassUID == src.SOPClassUID
        comments = [i.TextValue for i in item.ContentSequence if _concept(i) == ("121106", "DCM")]
        assert comments == [f"{row.title}: Present - AI result, not for diagnostic use"]


def test_chest_sr_summary_lists_every_label_once(
    results_chest: tuple[Findings, list[Dataset]],
) -> None:
    findings, (ds, *_) = results_chest
    table = table_for(Task.CHEST_XRAY)
    *codes_, comment = _summary(ds)
    assert [item.ValueType for item in codes_] == ["CODE"] * len(findings.labels)
    for label, item in zip(findings.labels, codes_, strict=True):
        row = table[label]
        assert _concept(item) == (row.finding.value, row.finding.scheme_designator)
        assert _value(item) == (PRESENT if findings.is_present(label) else ABSENT)
        (num,) = item.ContentSequence
        assert (num.RelationshipType, num.ValueType, _concept(num)) == (
            "HAS PROPERTIES", "NUM", CERTAINTY,
        )  # fmt: skip
        (measured,) = num.MeasuredValueSequence
        assert float(measured.NumericValue) == pytest.approx(100 * findings.study_scores[label])
        assert measured.MeasurementUnitsCodeSequence[0].CodeValue == "%"
    pairs = [(_concept(item), _value(item)) for item in codes_]
    assert len(set(pairs)) == len(pairs)
    assert (comment.ValueType, _concept(comment)) == ("TEXT", ("121106", "DCM"))
    text = comment.TextValue
    assert text == comment_text(findings.model)
    assert text.startswith(DISCLAIMER) and SHA in text and "untrained reference model" in text
    assert ".." not in text and text.lower().count("not for diagnostic use") == 1


def test_chest_sr_header(
    results_chest: tuple[Findings, list[Dataset]], results_chest_source: Dataset
) -> None:
    _, (ds, *_) = results_chest
    src = results_chest_source
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.PatientID == src.PatientID and ds.AccessionNumber == src.AccessionNumber
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.SeriesDescription == "AI RESULT - NOT FOR DIAGNOSTIC USE"
    assert (ds.ContentDate, ds.ContentTime) == ("20250304", "050607")
    assert (ds.SeriesDate, ds.SeriesTime) == ("20250304", "050607")
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert ds.ContentQualification == "RESEARCH"
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions) == (
        "dicomai",
        "chest-xray",
        "0.1.0",
    )
    air = ds.ContributingEquipmentSequence[-1]
    assert air.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    assert air.DeviceUID == _model(Task.CHEST_XRAY).device_uid
    assert SHA in air.ContributionDescription
    assert "untrained reference model" in air.ContributionDescription
    # Private codes are declared.
    assert [i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence] == [
        PRIVATE_SCHEME
    ]
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    refs = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [src.SOPInstanceUID]
    assert "PredecessorDocumentsSequence" not in ds
    # SEPARATE on the root and every container, so dsr2html prints each value's concept name.
    assert ds.ContinuityOfContent == "SEPARATE"
    containers = [item for item in _walk(ds.ContentSequence) if item.ValueType == "CONTAINER"]
    assert len(containers) == 2 + len(_group_items(ds))
    assert all(item.ContinuityOfContent == "SEPARATE" for item in containers)


def test_chest_sc(
    results_chest: tuple[Findings, list[Dataset]], results_chest_source: Dataset
) -> None:
    findings, objs = results_chest
    (sc,) = _of(objs, "OT")
    src = results_chest_source
    assert sc.Modality == "OT" and sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    rows, columns = fit_size(src.Rows, src.Columns)
    assert (rows, columns) == (MAX_SIDE, 964)  # 1955 x 1841 source, downscaled
    assert sc.Rows >= rows and sc.Columns > columns + 300  # a text panel to the right
    assert "PixelSpacing" not in sc  # the canvas is not the source's pixel grid
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.PatientID == src.PatientID
    assert sc.StudyDescription == src.StudyDescription
    assert sc.SeriesDescription == "AI OVERLAY - NOT FOR DIAGNOSTIC USE"
    assert (sc.ContentDate, sc.ContentTime) == ("20250304", "050607")
    assert (sc.SeriesDate, sc.SeriesTime) == ("20250304", "050607")
    assert sc.ConversionType == "WSD" and sc.ContentQualification == "RESEARCH"
    assert SHA in sc.DerivationDescription and "Not for diagnostic use" in sc.ImageComments
    assert "heat map of Atelectasis" in sc.DerivationDescription
    assert "untrained reference model" in sc.ImageComments
    assert sc.ContributingEquipmentSequence[-1].DeviceUID == _model(Task.CHEST_XRAY).device_uid
    (ref,) = sc.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID

    image, base, panel = _image_part(sc, src)
    # The text panel: white text and the yellow title on black, and the colour scale.
    assert (panel == 0).all(axis=-1).mean() > 0.6
    assert (panel == 255).all(axis=-1).any(), "caption text is drawn in white"
    assert (panel == (255, 214, 0)).all(axis=-1).any(), "the title in yellow"
    assert _scale_bar_rows(panel) >= 14, "a colour scale of the heat map"
    if sc.Rows > rows:
        assert not sc.pixel_array[rows:, :columns].any()
    # The heat map: only where the smoothed CAM is at or above 60 % of its peak, inside the
    # body; everything else is the source image as displayed, untouched.
    activation = activation_on_grid(findings.heatmaps[str(src.SOPInstanceUID)], (rows, columns))
    body = body_mask(base)
    changed = (image != base).any(axis=-1)
    assert changed.sum() > 1000
    assert not (changed & (activation < DEFAULT_CUTOFF)).any()
    assert not (changed & ~body).any(), "no colour on air"
    hot = (activation >= DEFAULT_CUTOFF) & body
    assert changed[hot].mean() > 0.9
    assert (image[..., 0] != image[..., 2])[hot].mean() > 0.9, "in colour"
    assert not hot.all() and body[~hot].any()


@pytest.mark.parametrize(
    ("positive", "mode", "drawn"),
    [
        (True, "positive", True),
        (False, "positive", False),
        (True, "always", True),
        (False, "always", True),
        (True, "never", False),
        (False, "never", False),
    ],
)
def test_sc_heatmap_option(
    results_small_chest: Dataset, positive: bool, mode: str, drawn: bool
) -> None:
    src = results_small_chest
    scores = None if positive else dict.fromkeys(LABELS[Task.CHEST_XRAY], 0.2)
    findings = _findings([src], Task.CHEST_XRAY, study_scores=scores)
    options = ResultOptions(sr_sop_class="none", emit_seg=False, sc_heatmap=mode)
    (sc,) = build_results([src], findings, options)
    rows, columns = fit_size(src.Rows, src.Columns)
    assert (rows, columns) == (512, 410)  # enlarged to MIN_SIDE so that the text stays legible
    assert sc.Rows >= rows and sc.Columns > columns
    image, base, panel = _image_part(sc, src)
    assert bool((image != base).any()) is drawn
    assert (_scale_bar_rows(panel) >= 14) is drawn
    assert ("heat map of Atelectasis" in sc.DerivationDescription) is drawn
    assert "PixelSpacing" not in sc


def test_sc_heat_map_never_on_air(results_ct_series: list[Dataset]) -> None:
    # A map whose high part straddles the edge of the head: drawn inside it only.
    src = results_ct_series[1]
    yy, xx = np.mgrid[:16, :16]
    cam = np.exp(-((yy - 2.5) ** 2 + (xx - 2.5) ** 2) / (2 * 2.5**2))
    findings = replace(_findings([src], Task.HEAD_CT_ICH), heatmaps={str(src.SOPInstanceUID): cam})
    options = ResultOptions(sr_sop_class="none", emit_seg=False)
    (sc,) = build_results([src], findings, options)
    image, base, _ = _image_part(sc, src)
    activation = activation_on_grid(cam, base.shape[:2])
    body = body_mask(base)
    high = activation >= DEFAULT_CUTOFF
    assert (high & ~body).sum() > 1000 and (high & body).sum() > 1000  # the case in point
    changed = (image != base).any(axis=-1)
    assert changed[high & body].mean() > 0.9
    assert not (changed & ~body).any()
    assert (image[~body] == image[~body][:, :1]).all(), "air stays grey"


def test_sc_no_heat_map_where_this_image_is_below_threshold(results_small_chest: Dataset) -> None:
    src = results_small_chest
    uid = str(src.SOPInstanceUID)
    image_scores = {uid: {"atelectasis": 0.3}}  # present in the study, not on this image
    findings = _findings([src], Task.CHEST_XRAY, image_scores=image_scores)
    assert findings.is_present("atelectasis")
    (sc,) = build_results([src], findings, ResultOptions(sr_sop_class="none", emit_seg=False))
    image, base, _ = _image_part(sc, src)
    assert np.array_equal(image, base)
    lines = caption_lines(findings, table_for(Task.CHEST_XRAY), uid, False)
    assert NO_HEAT_MAP in lines


def test_sc_background_decoded_at_reduced_resolution_matches_full(
    results_chest_source: Dataset,
) -> None:
    # The real JPEG 2000 sample (1955 x 1841) is too small to reduce for a 1024-pixel SC.
    assert display_rgb(results_chest_source, max_side=MAX_SIDE).shape[:2] == (1955, 1841)
    # A 2500 x 2000 JPEG 2000 radiograph needs only resolution level 1 (1250 x 1000).
    src = recompress(make_xray("chest", rows=2000, cols=2500, seed=5), JPEG2000Lossless)
    reduced = display_rgb(src, max_side=MAX_SIDE)
    full = display_rgb(src)
    assert full.shape[:2] == (src.Rows, src.Columns)
    assert reduced.shape[:2] == (1000, 1250)
    size = fit_size(src.Rows, src.Columns)
    a = resize_rgb(reduced, size).astype(float)
    b = resize_rgb(full, size).astype(float)
    # Grey levels of 255. The wavelet low-pass and the box filter treat the noise texture
    # differently (mean |diff| about 2), but the picture is the same: no bias, and after
    # smoothing out the texture under 1 level.
    assert np.abs(a - b).mean() < 3.0
    assert abs((a - b).mean()) < 0.5
    smooth = (256, 205)
    sa = np.asarray(Image.fromarray(a.astype(np.uint8)).resize(smooth, Image.Resampling.BOX))
    sb = np.asarray(Image.fromarray(b.astype(np.uint8)).resize(smooth, Image.Resampling.BOX))
    assert np.abs(sa.astype(float) - sb.astype(float)).mean() < 1.0
    # Uncompressed or already small sources are decoded as they are.
    assert display_rgb(src, max_side=4096).shape == full.shape


def test_chest_monochrome1_is_not_inverted(results_chest_source: Dataset) -> None:
    # MONOCHROME1: low stored values are white. The lungs (mid image) are darker than the
    # mediastinum/spine column and the collimated border is not black.
    rgb = display_rgb(results_chest_source)[..., 0].astype(float)
    rows, cols = rgb.shape
    lung = rgb[rows // 3 : rows // 2, cols // 5 : cols // 3].mean()
    spine = rgb[rows // 3 : rows // 2, cols // 2 - 40 : cols // 2 + 40].mean()
    assert lung < spine


def test_text_sr(
    results_chest: tuple[Findings, list[Dataset]], results_chest_source: Dataset
) -> None:
    _, (_, text, *_) = results_chest
    assert text.SOPClassUID == BasicTextSRStorage
    assert text.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    (container,) = [i for i in text.ContentSequence if i.ValueType == "CONTAINER"]
    lines = [i.TextValue for i in container.ContentSequence]
    assert lines[0] == DISCLAIMER
    assert any(SHA in line and "chest-xray 0.1.0" in line for line in lines)
    assert "Atelectasis: PRESENT (score 90%, threshold 50%)." in lines
    assert "Cardiomegaly: ABSENT (score 20%, threshold 50%)." in lines
    assert any("untrained reference model" in line for line in lines)
    assert text.StudyInstanceUID == results_chest_source.StudyInstanceUID
    assert (text.ContentDate, text.ContentTime) == ("20250304", "050607")
    assert text.SeriesDescription == "AI RESULT TEXT - NOT FOR DIAGNOSTIC USE"


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4], ids=["sr", "text-sr", "sc", "ko", "seg"])
def test_series_and_content_date_on_every_object(
    results_chest: tuple[Findings, list[Dataset]], index: int
) -> None:
    # Without SeriesDate/Time, Orthanc Explorer and date-sorted PACS lists file a series
    # under "?"; every object of a run is dated when the analysis started (UTC).
    ds = results_chest[1][index]
    assert (ds.get("SeriesDate"), ds.get("SeriesTime")) == ("20250304", "050607")
    assert (ds.get("ContentDate"), ds.get("ContentTime")) == ("20250304", "050607")


def test_failure_notice_is_dated(results_ct_series: list[Dataset]) -> None:
    notice = _roundtrip(
        build_failure_notice(
            _headers(results_ct_series), _model(Task.HEAD_CT_ICH), "inference_failed",
            started=STARTED,
        )
    )  # fmt: skip
    assert (notice.get("ContentDate"), notice.get("ContentTime")) == ("20250304", "050607")
    assert (notice.get("SeriesDate"), notice.get("SeriesTime")) == ("20250304", "050607")


def test_texts_do_not_repeat_the_disclaimer(results_small_chest: Dataset) -> None:
    assert sentences("Untrained model. Not for diagnostic use.", "Not for diagnostic use") == (
        "Untrained model. Not for diagnostic use."
    )
    assert sentences("a.", "", "A", "b") == "a. b."
    model = _model(Task.CHEST_XRAY, description=REFERENCE_DESCRIPTION)
    src = results_small_chest
    objs = build_results(
        [src],
        _findings([src], Task.CHEST_XRAY, model=model),
        ResultOptions(emit_text_sr=False, emit_seg=False),
    )
    sr, sc = objs
    (comment,) = [i for i in _summary(sr) if i.ValueType == "TEXT"]
    texts = {
        "comment": str(comment.TextValue),
        "ImageComments": str(sc.ImageComments),
        "DerivationDescription": str(sc.DerivationDescription),
        "ContributionDescription": str(
            sc.ContributingEquipmentSequence[-1].ContributionDescription
        ),
    }
    for name, text in texts.items():
        assert ".." not in text, name
        assert text.lower().count("not for diagnostic use") == 1, name
        assert "Untrained reference model (random weights, fixed seed)" in text, name
    assert texts["comment"] == (
        f"{DISCLAIMER} Model chest-xray 0.1.0 (sha256 {SHA}): Untrained reference model "
        "(random weights, fixed seed)."
    )


# --------------------------------------------------------------------------- negative study


def test_negative_study_has_no_located_findings(results_small_chest: Dataset) -> None:
    src = results_small_chest
    uid = str(src.SOPInstanceUID)
    negative = dict.fromkeys(LABELS[Task.CHEST_XRAY], 0.2)
    findings = _findings([src], Task.CHEST_XRAY, study_scores=negative)
    assert findings.label_heatmaps == {}
    objs = build_results([src], findings, ResultOptions(emit_ko=True))
    assert [o.Modality for o in objs] == ["SR", "OT", "KO"]  # no SEG: nothing was found
    ds = _roundtrip(objs[0])
    ref, data = _whole_image_group(ds, negative=True)
    assert ref.ReferencedSOPInstanceUID == uid
    cols, rows = float(src.Columns), float(src.Rows)
    assert data == [0, 0, cols, 0, cols, rows, 0, rows, 0, 0]
    assert len(_groups(_sr(ds))) == 1
    *items, comment = _summary(ds)
    assert [_value(i) for i in items] == [ABSENT] * len(LABELS[Task.CHEST_XRAY])
    assert comment.ValueType == "TEXT"
    assert ds.ContinuityOfContent == "SEPARATE"
    image, base, _ = _image_part(objs[1], src)
    assert np.array_equal(image, base)
    lines = caption_lines(findings, table_for(Task.CHEST_XRAY), uid, False)
    assert NO_HEAT_MAP in lines
    assert "No finding at or above threshold (highest: Atelectasis 20%)" in lines


def test_present_finding_without_a_located_region(results_small_chest: Dataset) -> None:
    # A CAM whose high part lies outside the body (or an image without pixels) gives no region:
    # the finding is reported in the summary only.
    src = results_small_chest
    head = _headers([src])
    findings = _findings(head, Task.CHEST_XRAY, key_uids=())
    objs = build_results(head, findings)
    assert [o.Modality for o in objs] == ["SR"]
    ds = _roundtrip(objs[0])
    _whole_image_group(ds, negative=False)
    assert _value(_summary(ds)[0]) == PRESENT


# --------------------------------------------------------------------------- UIDs


def test_uids_deterministic_and_keyed_on_content(results_chest_source: Dataset) -> None:
    nih = _read("chest_xray/nih_cxr14_dx_sc.dcm")  # missing Type 2 attributes
    options = ResultOptions(emit_text_sr=True)
    first = build_results([nih], _findings([nih], Task.CHEST_XRAY), options)
    again = build_results([nih], _findings([nih], Task.CHEST_XRAY), options)
    assert [o.Modality for o in first] == ["SR", "SR", "OT", "SEG"]
    assert _all_uids(first) == _all_uids(again)
    tracking = [g.tracking_uid for g in _groups(_sr(first[0]))]
    assert tracking and tracking == [g.tracking_uid for g in _groups(_sr(again[0]))]
    assert len(set(tracking)) == len(tracking)
    # No InstanceNumber: the image is named by its position among the sources.
    assert _groups(_sr(first[0]))[0].tracking_identifier.startswith("chest-xray:image:1:")
    seg, seg_again = first[-1], again[-1]
    segment_uids = [s.TrackingUID for s in seg.SegmentSequence]
    assert segment_uids == [s.TrackingUID for s in seg_again.SegmentSequence]
    assert len(set(segment_uids)) == len(segment_uids)
    assert np.array_equal(seg.pixel_array, seg_again.pixel_array)
    seen = {uid for pair in _all_uids(first) for uid in pair}

    changed = [
        _findings([nih], Task.CHEST_XRAY, model=_model(Task.CHEST_XRAY, version="0.2.0")),
        _findings([nih], Task.CHEST_XRAY, model=_model(Task.CHEST_XRAY, sha256="f" * 64)),
    ]
    for findings in changed:
        other = build_results([nih], findings, options)
        assert len(other) == len(first)
        assert not seen & {uid for pair in _all_uids(other) for uid in pair}
    # A new input instance (same study) gives new UIDs too.
    extra = _headers([nih])[0]
    extra.SOPInstanceUID = _uid("extra-instance")
    other = build_results([nih, extra], _findings([nih, extra], Task.CHEST_XRAY), options)
    assert not seen & {uid for pair in _all_uids(other) for uid in pair}
    # Same content, another SR SOP class: the SOP Instance UID must differ.
    comp = build_results(
        [nih], _findings([nih], Task.CHEST_XRAY), ResultOptions(sr_sop_class="comprehensive")
    )
    assert comp[0].SOPInstanceUID != first[0].SOPInstanceUID


def test_predecessor_reference(results_chest_source: Dataset) -> None:
    src = results_chest_source
    head = _headers([src])
    findings = _findings(head, Task.CHEST_XRAY, key_uids=())
    (old,) = build_results(head, findings)
    ref = (
        str(old.StudyInstanceUID),
        str(old.SeriesInstanceUID),
        str(old.SOPClassUID),
        str(old.SOPInstanceUID),
    )
    (new,) = build_results(head, findings, previous_sr_refs=[ref])
    new = _roundtrip(new)
    (item,) = new.PredecessorDocumentsSequence
    assert item.StudyInstanceUID == ref[0]
    (series,) = item.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ref[1]
    (sop,) = series.ReferencedSOPSequence
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == ref[2:]
    assert new.SOPInstanceUID != old.SOPInstanceUID
    with pytest.raises(ValueError, match="previous_sr_refs"):
        build_results(head, findings, previous_sr_refs=[("1.2", "x")])  # type: ignore[list-item]


# --------------------------------------------------------------------------- head CT


def test_head_ct_slice_groups_and_seg(results_ct_series: list[Dataset]) -> None:
    series = results_ct_series
    uids = [str(ds.SOPInstanceUID) for ds in series]
    labels = LABELS[Task.HEAD_CT_ICH]
    image_scores = {
        uid: {label: (0.8 - 0.05 * i if label in ("any", "subdural") and i % 2 == 0 else 0.1)
              for label in labels}
        for i, uid in enumerate(uids)
    }  # fmt: skip
    study = {label: (0.8 if label in ("any", "subdural") else 0.1) for label in labels}
    keys = (uids[0], uids[2], uids[4])
    # Only key images carry pixels: everything else is headers.
    sources = _headers(series, keep=keys)
    findings = _findings(
        sources, Task.HEAD_CT_ICH, key_uids=keys, image_scores=image_scores, study_scores=study
    )
    objs = [_roundtrip(o) for o in build_results(sources, findings)]
    assert [o.Modality for o in objs] == ["SR", "OT", "OT", "OT", "SEG"]
    table = table_for(Task.HEAD_CT_ICH)
    groups = _groups(_sr(objs[0]))
    # Slices 0, 2, 4 have "subdural" at or above threshold; there it hides "any".
    assert len(groups) == 3
    assert [g.source_images[0].referenced_sop_instance_uid for g in groups] == list(keys)
    assert [g.tracking_identifier for g in groups] == [
        f"head-ct-ich:image:{n}:subdural" for n in (1, 3, 5)
    ]
    assert all(g.finding_type == table["subdural"].finding for g in groups)
    assert groups[0].finding_type.scheme_designator == PRIVATE_SCHEME  # UNVERIFIED: private
    assert all(g.finding_sites[0].value == codes.SCT.DuraMater for g in groups)
    assert [g.get_measurements()[0].value for g in groups] == [80.0, 70.0, 60.0]
    for group, uid in zip(groups, keys, strict=True):
        (coords,) = group.get_measurements()[0].referenced_coordinates
        (image,) = coords.ContentSequence
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid
        c0, r0, c1, r1 = _box(coords.GraphicData)
        assert 0 <= c0 < 48 < c1 <= 96 and 0 <= r0 < 48 < r1 <= 96  # around the CAM's peak
    summary = _summary(objs[0])[:-1]
    assert [_value(i) for i in summary] == [
        PRESENT if label in ("any", "subdural") else ABSENT for label in labels
    ]
    refs = objs[0].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {r.ReferencedSOPInstanceUID for r in refs.ReferencedSOPSequence} == set(uids)
    scs = objs[1:4]
    assert [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in scs] == list(keys)
    assert [sc.InstanceNumber for sc in scs] == [1, 2, 3]
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1
    assert all(sc.BodyPartExamined == "HEAD" for sc in scs)
    assert all(sc.PatientName == SENTINEL for sc in objs)

    # The SEG: frames only for slices with a region, one segment, on the CT's geometry.
    seg = objs[-1]
    assert seg.SeriesNumber == 9105 and seg.InstanceNumber == 1
    assert _segment_labels(seg) == ["Subdural hemorrhage (AI)"]
    frames = _seg_frames(seg)
    assert sorted(frames) == sorted((uid, 1) for uid in keys)
    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series}
    for (uid, _), item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == [float(v) for v in by_uid[uid].ImagePositionPatient]
    (refd,) = seg.ReferencedSeriesSequence
    assert refd.SeriesInstanceUID == series[0].SeriesInstanceUID
    assert sorted(r.ReferencedSOPInstanceUID for r in refd.ReferencedInstanceSequence) == sorted(
        keys
    )
    regions = locate(sources, findings)
    for frame, (uid, _) in zip(seg.pixel_array, frames, strict=True):
        assert np.array_equal(frame.astype(bool), regions[(uid, "subdural")].on_source_grid(96, 96))

    capped = build_results(
        sources, findings, ResultOptions(max_slice_groups=1, sc_max_images=2, emit_sc=True)
    )
    assert [o.Modality for o in capped] == ["SR", "OT", "OT", "SEG"]
    (top,) = _groups(_sr(capped[0]))
    assert top.source_images[0].referenced_sop_instance_uid == uids[0]  # the highest score
    none = build_results(sources, findings, ResultOptions(max_slice_groups=0, emit_sc=False))
    _whole_image_group(_roundtrip(none[0]), negative=False)
    assert [o.Modality for o in build_results(sources, findings, ResultOptions(emit_sc=False))] == [
        "SR", "SEG",
    ]  # fmt: skip
    plain = build_results(sources, findings, ResultOptions(emit_sc=False, emit_seg=False))
    assert [o.Modality for o in plain] == ["SR"]


def test_head_ct_summary_codes_are_distinct(results_ct_series: list[Dataset]) -> None:
    sources = _headers(results_ct_series)
    everything = dict.fromkeys(LABELS[Task.HEAD_CT_ICH], 0.9)
    findings = _findings(sources, Task.HEAD_CT_ICH, key_uids=(), study_scores=everything)
    ds = _roundtrip(build_results(sources, findings)[0])
    *items, _ = _summary(ds)
    pairs = [(_concept(i), _value(i)) for i in items]
    assert len(pairs) == 6 and len(set(pairs)) == 6
    table = table_for(Task.HEAD_CT_ICH)
    assert _concept(items[0]) == ("1386000", "SCT")  # "any"
    intraventricular = table["intraventricular"].finding
    assert _concept(items[3]) == (intraventricular.value, PRIVATE_SCHEME)  # not 1386000
    assert intraventricular.value.startswith("ICH-")
    assert items[3].ConceptNameCodeSequence[0].CodeMeaning == "Intraventricular hemorrhage"
    assert table["intraventricular"].status == CodeStatus.UNVERIFIED
    assert table["intraventricular"].site == codes.SCT.BrainVentricle
    assert PRIVATE_SCHEME in [
        i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence
    ]


def test_head_ct_real_slice_sc_layout() -> None:
    src = _read("other/transfer_syntaxes/CT2_JLSL.dcm")  # 512 x 512, JPEG-LS, no body part
    options = ResultOptions(sc_heatmap="never")
    sr, sc, seg = build_results([src], _findings([src], Task.HEAD_CT_ICH), options)
    assert (sr.Modality, seg.Modality) == ("SR", "SEG")
    assert sc.Rows >= 512 and sc.Columns > 512 + 300
    # Not on the source's grid any more (a panel beside it): no PixelSpacing.
    assert "PixelSpacing" not in sc
    image, base, _ = _image_part(sc, src)
    assert image.shape == (512, 512, 3)
    assert np.array_equal(image, base), "the image keeps its pixels at the top left"
    assert sc.BodyPartExamined == "HEAD"
    assert tuple(sc.PatientOrientation) == ("L", "P")  # from ImageOrientationPatient


# --------------------------------------------------------------------------- bone X-ray


def test_bone_normality_per_image() -> None:
    src = _read("extremity_xray/RG3_J2KR.dcm")  # EXTREMITY, Laterality R, MONOCHROME1
    wrist = copy.deepcopy(src)
    wrist.SOPInstanceUID = _uid("wrist")
    wrist.InstanceNumber, wrist.BodyPartExamined = 7, "WRIST"
    wrist.SeriesInstanceUID = _uid("wrist-series")  # two CR images of one series: see below
    del wrist.Laterality
    normal = _headers([src])[0]
    normal.SOPInstanceUID = _uid("normal")
    normal.InstanceNumber = 9
    sources = [src, wrist, normal]
    scores = {
        str(src.SOPInstanceUID): {"abnormal": 0.9},
        wrist.SOPInstanceUID: {"abnormal": 0.8},
        normal.SOPInstanceUID: {"abnormal": 0.1},
    }
    findings = _findings(sources, Task.BONE_XRAY, image_scores=scores)
    sr_ds, sc, *segs = (_roundtrip(o) for o in build_results(sources, findings))
    groups = _groups(_sr(sr_ds))
    assert len(groups) == 2  # the normal image has no finding to locate
    first, second = groups
    assert first.finding_type is None and second.finding_type is None
    assert _evaluation(first, codes.DCM.Normality) == codes.SCT.Abnormal
    assert _evaluation(second, codes.DCM.Normality) == codes.SCT.Abnormal
    assert [g.tracking_identifier for g in groups] == [
        f"bone-xray:image:{src.InstanceNumber}:abnormal", "bone-xray:image:7:abnormal",
    ]  # fmt: skip
    site = first.finding_sites[0]
    assert site.value == codes.SCT.Bone  # "EXTREMITY" does not say which limb
    assert site.laterality == codes.SCT.Right
    assert second.finding_sites[0].value == codes.SCT.BoneOfUpperLimb
    assert second.finding_sites[0].laterality is None
    assert first.source_images[0].referenced_sop_instance_uid == src.SOPInstanceUID
    assert second.source_images[0].referenced_sop_instance_uid == wrist.SOPInstanceUID
    assert [g.get_measurements()[0].value for g in groups] == [90.0, 80.0]
    comments = [_texts(item, "121106") for item in _group_items(sr_ds)]
    assert comments == [["Bone radiograph: Abnormal - AI result, not for diagnostic use"]] * 2
    (summary, comment) = _summary(sr_ds)
    assert _concept(summary) == ("121402", "DCM")  # Normality
    assert _value(summary) == ("263654008", "SCT")  # Abnormal: study score 0.9
    assert float(summary.ContentSequence[0].MeasuredValueSequence[0].NumericValue) == 90.0
    assert comment.ValueType == "TEXT"
    assert "CodingSchemeIdentificationSequence" not in sr_ds
    assert sc.Laterality == "R" and sc.BurnedInAnnotation == "YES"
    # One SEG per series, one segment for the Normality row: Abnormal.
    assert [seg.Modality for seg in segs] == ["SEG", "SEG"]
    assert len({seg.SOPInstanceUID for seg in segs}) == 2
    assert len({seg.SeriesInstanceUID for seg in segs}) == 1
    for seg in segs:
        (segment,) = seg.SegmentSequence
        assert segment.SegmentLabel == "Bone radiograph (AI)"
        assert _value_of(segment.SegmentedPropertyTypeCodeSequence) == ("263654008", "SCT")
        assert _value_of(segment.SegmentedPropertyCategoryCodeSequence) == ("49755003", "SCT")
    frames = sorted(frame for seg in segs for frame in _seg_frames(seg))
    assert frames == sorted([(str(src.SOPInstanceUID), 1), (str(wrist.SOPInstanceUID), 1)])


def _value_of(sequence: Sequence[Dataset]) -> tuple[str, str]:
    (code,) = sequence
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def test_bone_negative_study_says_normal() -> None:
    src = _read("extremity_xray/RG3_J2KR.dcm")
    head = _headers([src])
    findings = _findings(head, Task.BONE_XRAY, key_uids=(), study_scores={"abnormal": 0.1})
    (sr,) = build_results(head, findings)
    sr = _roundtrip(sr)
    _whole_image_group(sr, negative=True)
    (item, _) = _summary(sr)
    assert (_concept(item), _value(item)) == (("121402", "DCM"), ("17621005", "SCT"))  # Normal


@pytest.mark.parametrize(
    ("body_part", "expected"),
    [
        ("HAND", codes.SCT.BoneOfUpperLimb),
        ("Upper Extremity", codes.SCT.BoneOfUpperLimb),
        ("KNEE", codes.SCT.BoneOfLowerLimb),
        ("ANKLE", codes.SCT.BoneOfLowerLimb),
        ("HIP", codes.SCT.Bone),
        ("SHOULDER", codes.SCT.Bone),
        ("EXTREMITY", codes.SCT.Bone),
        (None, codes.SCT.Bone),
    ],
)
def test_bone_site(body_part: str | None, expected: object) -> None:
    assert bone_site(body_part) == expected


# --------------------------------------------------------------------------- SEG


def test_seg_of_a_projection_radiograph(
    results_chest: tuple[Findings, list[Dataset]], results_chest_source: Dataset
) -> None:
    findings, objs = results_chest
    (seg,) = _of(objs, "SEG")
    src = results_chest_source
    uid = str(src.SOPInstanceUID)
    table = table_for(Task.CHEST_XRAY)
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == "AI REGIONS - NOT FOR DIAGNOSTIC USE"
    assert seg.SeriesNumber == 9105 and seg.ContentQualification == "RESEARCH"
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == src.PatientID
    assert seg.ContributingEquipmentSequence[-1].DeviceUID == _model(Task.CHEST_XRAY).device_uid
    assert "Not for diagnostic use" in seg.ImageComments
    present = [label for label in findings.labels if findings.is_present(label)]
    assert _segment_labels(seg) == [f"{table[label].title} (AI)" for label in present]
    for number, (label, segment) in enumerate(zip(present, seg.SegmentSequence, strict=True), 1):
        row = table[label]
        assert segment.SegmentNumber == number
        assert _value_of(segment.SegmentedPropertyTypeCodeSequence) == (
            row.finding.value, row.finding.scheme_designator,
        )  # fmt: skip
        assert _value_of(segment.SegmentedPropertyCategoryCodeSequence) == ("49755003", "SCT")
        assert _value_of(segment.AnatomicRegionSequence) == (
            row.site.value, row.site.scheme_designator,
        )  # fmt: skip
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "chest-xray" and algorithm.AlgorithmVersion == "0.1.0"
        assert _value_of(algorithm.AlgorithmFamilyCodeSequence) == ("123110", "DCM")
    # One frame per (image, label) with a region; each references the source image.
    assert sorted(_seg_frames(seg)) == [(uid, n) for n in range(1, len(present) + 1)]
    (refd,) = seg.ReferencedSeriesSequence
    assert refd.SeriesInstanceUID == src.SeriesInstanceUID
    assert [r.ReferencedSOPInstanceUID for r in refd.ReferencedInstanceSequence] == [uid]
    # CR without a frame of reference: the projection geometry OHIF needs to overlay it.
    assert "FrameOfReferenceUID" not in seg
    (shared,) = seg.SharedFunctionalGroupsSequence
    (orientation,) = shared.PlaneOrientationSequence
    assert [float(v) for v in orientation.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    (measures,) = shared.PixelMeasuresSequence
    assert [float(v) for v in measures.PixelSpacing] == [1.0, 1.0]  # the source has 0\0
    # The masks are the located regions on the source grid.
    regions = locate([src], findings)
    for frame, (_, number) in zip(seg.pixel_array, _seg_frames(seg), strict=True):
        expected = regions[(uid, present[number - 1])].on_source_grid(src.Rows, src.Columns)
        assert np.array_equal(frame.astype(bool), expected)
        assert 0 < expected.mean() < 0.5


def test_seg_of_a_dx_keeps_its_pixel_spacing(results_small_chest: Dataset) -> None:
    src = results_small_chest  # DX, PixelSpacing 1.075, no frame of reference
    options = ResultOptions(sr_sop_class="none", emit_sc=False)
    (seg,) = build_results([src], _findings([src], Task.CHEST_XRAY), options)
    (shared,) = seg.SharedFunctionalGroupsSequence
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == [float(v) for v in src.PixelSpacing]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        1, 0, 0, 0, 1, 0,
    ]  # fmt: skip
    _roundtrip(seg)


def test_seg_frames_only_where_a_region_was_found(results_ct_series: list[Dataset]) -> None:
    series = results_ct_series  # every slice has pixels
    uids = [str(ds.SOPInstanceUID) for ds in series]
    labels = LABELS[Task.HEAD_CT_ICH]
    scores = {uid: dict.fromkeys(labels, 0.1) for uid in uids}
    for i, (any_, iph) in {1: (0.9, 0.85), 4: (0.7, 0.6)}.items():
        scores[uids[i]].update({"any": any_, "intraparenchymal": iph})
    study = {label: (0.9 if label in ("any", "intraparenchymal") else 0.1) for label in labels}
    findings = _findings(series, Task.HEAD_CT_ICH, key_uids=(), image_scores=scores,
                         study_scores=study)  # fmt: skip
    sr, seg = build_results(series, findings)
    groups = _groups(_sr(sr))
    assert [g.source_images[0].referenced_sop_instance_uid for g in groups] == [uids[1], uids[4]]
    assert [g.get_measurements()[0].value for g in groups] == [85.0, 60.0]
    assert _segment_labels(seg) == ["Intraparenchymal hemorrhage (AI)"]
    assert sorted(_seg_frames(seg)) == sorted([(uids[1], 1), (uids[4], 1)])
    assert int(seg.NumberOfFrames) == 2
    again = build_results(series, findings)[1]
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (
        seg.SeriesInstanceUID, seg.SOPInstanceUID,
    )  # fmt: skip


def test_seg_one_per_series_and_image_size() -> None:
    series = _ct_series(2, 96, study="mixed")
    small = _ct_series(1, 64, study="mixed")[0]
    small.SOPInstanceUID = small.file_meta.MediaStorageSOPInstanceUID = _uid("mixed", "small")
    small.InstanceNumber = 3
    other = _ct_series(1, 96, study="mixed")[0]  # another series of the study
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = _uid("mixed", "other")
    other.SeriesInstanceUID = _uid("mixed", "other-series")
    sources = [*series, small, other]
    findings = _findings(sources, Task.HEAD_CT_ICH)
    segs = _of(build_results(sources, findings, ResultOptions(emit_sc=False)), "SEG")
    assert len(segs) == 3
    assert len({s.SeriesInstanceUID for s in segs}) == 1  # one SEG series per run
    assert sorted(s.InstanceNumber for s in segs) == [1, 2, 3]
    shapes = sorted((s.Rows, s.ReferencedSeriesSequence[0].SeriesInstanceUID) for s in segs)
    expected = [(96, series[0].SeriesInstanceUID), (64, series[0].SeriesInstanceUID),
                (96, other.SeriesInstanceUID)]  # fmt: skip
    assert shapes == sorted(expected)
    assert len({s.SOPInstanceUID for s in segs}) == 3, "every SEG has its own SOP Instance UID"


def test_seg_of_two_projection_images_of_one_series() -> None:
    # Two views of one extremity series (CR, same size, no frame of reference), both located:
    # the results must still build, and each image must get its overlay.
    study, series = _uid("two-views"), _uid("two-views", "series")
    views = [
        make_xray("wrist", modality="CR", rows=300, cols=240, seed=seed, study_uid=study,
                  series_uid=series)
        for seed in (1, 2)
    ]  # fmt: skip
    views[1].InstanceNumber = 2
    assert "FrameOfReferenceUID" not in views[0]
    findings = _findings(views, Task.BONE_XRAY)
    objs = build_results(views, findings, ResultOptions(emit_sc=False))
    assert len(_groups(_sr(objs[0]))) == 2
    segs = _of(objs, "SEG")
    frames = sorted(uid for seg in segs for uid, _ in _seg_frames(seg))
    assert frames == sorted(str(ds.SOPInstanceUID) for ds in views)
    assert len({seg.SOPInstanceUID for seg in segs}) == len(segs)


def test_seg_none_for_multiframe_or_when_not_asked(results_ct_series: list[Dataset]) -> None:
    findings = _findings(results_ct_series, Task.HEAD_CT_ICH)
    objs = build_results(results_ct_series, findings, ResultOptions(emit_seg=False))
    assert [o.Modality for o in objs] == ["SR", "OT"]
    mf = _multiframe()
    objs = build_results([mf], _findings([mf], Task.CHEST_XRAY))
    assert [o.Modality for o in objs] == ["SR", "OT"]
    assert _groups(_sr(objs[0])), "the SR still locates the findings"


# --------------------------------------------------------------------------- codes


def test_code_tables_cover_the_labels_and_status_is_honest() -> None:
    dicom = {
        (code, scheme)
        for scheme, by_keyword in concepts.items()
        for entries in by_keyword.values()
        for code in entries
    }
    for task, labels in LABELS.items():
        table = table_for(task)
        assert tuple(table) == labels or set(table) == set(labels)
        for label, row in table.items():
            finding, site, status = row.finding, row.site, row.status
            assert finding.value not in UNVERIFIED_CANDIDATES, label
            assert (site.value, site.scheme_designator) in dicom, label
            if status == CodeStatus.DICOM:
                assert (finding.value, finding.scheme_designator) in dicom, label
            elif status == CodeStatus.SCT_PUBLIC:
                assert finding.scheme_designator == "SCT", label
            else:  # UNVERIFIED: a private code, or ICH plus a telling finding site
                assert finding.scheme_designator == PRIVATE_SCHEME or (
                    finding == ICH and site != codes.SCT.Brain
                ), label
        # Code values are SH (16 characters at most), private ones included.
        assert all(len(code.value) <= 16 for code in (finding, site, *row.values)), label
        # Within a task every label has its own finding concept: no two summary rows alike.
        findings = [(row.finding.value, row.finding.scheme_designator) for row in table.values()]
        assert len(set(findings)) == len(findings), task
    emitted = [
        (row.finding.value, row.finding.scheme_designator, row.site.value)
        for task in LABELS
        for row in table_for(task).values()
    ]
    assert len(set(emitted)) == len(emitted), "every label is distinguishable"


# --------------------------------------------------------------------------- options, inputs


@pytest.mark.parametrize(
    ("sr_sop_class", "uid"),
    [("comprehensive", ComprehensiveSRStorage), ("enhanced", EnhancedSRStorage)],
)
def test_sr_sop_class_option(results_ct_series: list[Dataset], sr_sop_class: str, uid: str) -> None:
    findings = _findings(results_ct_series, Task.HEAD_CT_ICH, key_uids=())
    options = ResultOptions(sr_sop_class=sr_sop_class, emit_seg=False)
    (ds,) = build_results(results_ct_series, findings, options)
    ds = _roundtrip(ds)
    assert ds.SOPClassUID == uid
    # 2 subtypes (intraparenchymal, subarachnoid) located on each of 6 slices; "any" hidden.
    groups = _groups(_sr(ds))
    assert len(groups) == 12
    assert {g.tracking_identifier.rsplit(":", 1)[1] for g in groups} == {
        "intraparenchymal", "subarachnoid",
    }  # fmt: skip
    assert len(_summary(ds)) == 6 + 1


def test_sr_none_and_sc_only(results_ct_series: list[Dataset]) -> None:
    findings = _findings(results_ct_series, Task.HEAD_CT_ICH)
    objs = build_results(results_ct_series, findings, ResultOptions(sr_sop_class="none"))
    assert [o.Modality for o in objs] == ["OT", "SEG"]
    only = build_results(
        results_ct_series, findings, ResultOptions(sr_sop_class="none", emit_seg=False)
    )
    assert [o.Modality for o in only] == ["OT"]
    sc = only[0]
    # A 96 x 96 source is enlarged so the caption stays legible; the grid changes.
    assert fit_size(96, 96) == (MIN_SIDE, MIN_SIDE)
    assert sc.Rows >= MIN_SIDE and sc.Columns > MIN_SIDE and "PixelSpacing" not in sc
    assert sc.SOPInstanceUID == objs[0].SOPInstanceUID


@pytest.mark.parametrize(
    ("changes", "argument"),
    [
        ({"sr_sop_class": "basic"}, "sr_sop_class"),
        ({"sc_max_images": -1}, "sc_max_images"),
        ({"max_slice_groups": -1}, "max_slice_groups"),
        ({"series_number_base": -5}, "series_number_base"),
        ({"series_number_base": 2**31 - 1 - 4}, "series_number_base"),
        ({"sc_heatmap": "sometimes"}, "sc_heatmap"),
    ],
)
def test_invalid_options(changes: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        ResultOptions(**changes)  # type: ignore[arg-type]


def test_option_defaults_and_limits(results_ct_series: list[Dataset]) -> None:
    options = ResultOptions()
    assert (options.emit_seg, options.sc_heatmap) == (True, "positive")
    top = 2**31 - 1 - 5
    findings = _findings(results_ct_series, Task.HEAD_CT_ICH)
    objs = build_results(
        results_ct_series,
        findings,
        ResultOptions(series_number_base=top, emit_text_sr=True, emit_ko=True),
    )
    assert [(o.Modality, o.SeriesNumber) for o in objs] == [
        ("SR", top + 1), ("SR", top + 3), ("OT", top + 2), ("KO", top + 4), ("SEG", top + 5),
    ]  # fmt: skip
    assert top + 5 == 2**31 - 1
    for o in objs:
        _roundtrip(o)  # IS range holds


def test_invalid_inputs_name_no_patient_data(results_ct_series: list[Dataset]) -> None:
    series = results_ct_series
    findings = _findings(series, Task.HEAD_CT_ICH)
    other = _ct_series(1, 16, study="other-study")
    cases: list[Callable[[], object]] = [
        lambda: build_results([], findings),
        lambda: build_results([*series, *other], findings),
        lambda: build_results(series[:1], findings),  # scores name unknown instances
        lambda: build_results(series, replace(findings, labels=("any", "bleed"))),
        lambda: build_results(series, replace(findings, study_scores={"any": 2.0})),
    ]
    for case in cases:
        with pytest.raises(ValueError) as info:
            case()
        assert "SENTINEL" not in str(info.value) and "PHI" not in str(info.value)


def test_key_image_without_pixels_or_undecodable() -> None:
    jply = _read("other/transfer_syntaxes/RG3_JPLY.dcm")  # 12-bit JPEG: no decoder
    with pytest.raises(UnsupportedInput) as info:
        build_results([jply], _findings([jply], Task.BONE_XRAY))
    assert "decoded" in str(info.value)
    head = _headers([jply])
    with pytest.raises(UnsupportedInput, match="no pixel data"):
        build_results(head, _findings(head, Task.BONE_XRAY))
    # Without key images the SR still builds (the finding is not located: no SEG).
    (sr,) = build_results(head, _findings(head, Task.BONE_XRAY, key_uids=()))
    assert sr.Modality == "SR"
    # An undecodable image is not located either, but does not stop the SR.
    (sr,) = build_results([jply], _findings([jply], Task.BONE_XRAY, key_uids=()))
    _whole_image_group(sr, negative=False)


def _multiframe() -> Dataset:
    ds = _ct_series(1, 48, study="multiframe")[0]
    frames = np.stack([np.full((48, 48), v, dtype=np.uint16) for v in (100, 2000, 4000)])
    frames[:, 10:20, 10:20] = 0
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = (
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    )
    ds.NumberOfFrames, ds.PixelRepresentation = 3, 0
    ds.BitsStored, ds.HighBit = 12, 11
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter"):
        delattr(ds, keyword)
    del ds.WindowWidth
    ds.PixelData = frames.tobytes()
    return ds


def test_multiframe_source() -> None:
    ds = _multiframe()
    findings = _findings([ds], Task.CHEST_XRAY)
    _, sc = build_results([ds], findings)
    # The SC shows the frame the model analysed: the middle one (inference picks it).
    assert int(ds.NumberOfFrames) == 3 and analysed_frame(ds) == 2
    assert int(sc.SourceImageSequence[0].ReferencedFrameNumber) == 2
    assert display_rgb(ds, frame=2).shape == (48, 48, 3)


def test_multiframe_region_names_its_frame() -> None:
    # The region is found on the analysed (middle) frame only; the SCOORD's image reference
    # must say so (PS3.3 C.18.3: Referenced Frame Number is required when a reference to a
    # multi-frame image does not apply to all its frames).
    ds = _multiframe()
    (sr,) = build_results([ds], _findings([ds], Task.CHEST_XRAY), ResultOptions(emit_sc=False))
    scoords = [i for i in _walk(sr.ContentSequence) if i.ValueType == "SCOORD"]
    assert scoords
    for scoord in scoords:
        (image,) = scoord.ContentSequence
        assert [
            int(v)
            for v in np.atleast_1d(image.ReferencedSOPSequence[0].get("ReferencedFrameNumber", []))
        ] == [analysed_frame(ds)] == [2]


def test_caption_lines(results_ct_series: list[Dataset]) -> None:
    uid = str(results_ct_series[0].SOPInstanceUID)
    bone = _findings(results_ct_series[:1], Task.BONE_XRAY)
    normal = replace(bone, study_scores={"abnormal": 0.1})
    lines = caption_lines(normal, table_for(Task.BONE_XRAY), uid, True)
    assert lines[:3] == [
        "AI RESULT - NOT FOR DIAGNOSTIC USE",
        f"bone-xray 0.1.0 sha256 {SHA[:12]}",
        "untrained reference model.",
    ]
    assert "Bone radiograph: Normal (score 10%, threshold 50%)" in lines
    assert NO_HEAT_MAP not in lines
    chest = _findings(results_ct_series[:1], Task.CHEST_XRAY)
    negative = replace(chest, study_scores=dict.fromkeys(chest.labels, 0.2))
    lines = caption_lines(negative, table_for(Task.CHEST_XRAY), uid, False)
    assert "No finding at or above threshold (highest: Atelectasis 20%)" in lines
    assert lines[-1] == NO_HEAT_MAP
    assert NO_HEAT_MAP not in caption_lines(negative, table_for(Task.CHEST_XRAY), uid, True)
    positive = caption_lines(chest, table_for(Task.CHEST_XRAY), uid, True)
    assert "Atelectasis: Present (score 90%, threshold 50%)" in positive
    assert "Cardiomegaly: Absent (score 20%, threshold 50%)" not in positive  # present only
    ct = _findings(results_ct_series, Task.HEAD_CT_ICH)
    lines = caption_lines(ct, table_for(Task.HEAD_CT_ICH), uid, True)
    assert "Intracranial hemorrhage: Present (score 90%, threshold 50%)" in lines
    assert lines[-1].startswith("This slice: Intracranial hemorrhage 90%")
    assert NO_HEAT_MAP not in lines


def test_fit_size() -> None:
    assert fit_size(2000, 1000) == (1024, 512)
    assert fit_size(600, 800) == (600, 800)
    assert fit_size(16, 8) == (512, 256)
    assert (MIN_SIDE, MAX_SIDE) == (512, 1024)
    with pytest.raises(ValueError, match="rows"):
        fit_size(0, 10)


# --------------------------------------------------------------------------- failure notice


def test_failure_notice(results_ct_series: list[Dataset]) -> None:
    sources = _headers(results_ct_series)
    model = _model(Task.HEAD_CT_ICH)
    notice = _roundtrip(build_failure_notice(sources, model, "unsupported_input", started=STARTED))
    assert notice.SOPClassUID == BasicTextSRStorage
    assert notice.SeriesNumber == 9103
    assert notice.StudyInstanceUID == sources[0].StudyInstanceUID
    (container,) = [i for i in notice.ContentSequence if i.ValueType == "CONTAINER"]
    lines = [i.TextValue for i in container.ContentSequence]
    assert "AI analysis could not be completed." in lines
    assert "Reason: unsupported_input." in lines
    assert any(SHA in line for line in lines) and DISCLAIMER in lines
    again = build_failure_notice(sources, model, "unsupported_input", ResultOptions())
    assert again.SOPInstanceUID == notice.SOPInstanceUID
    other = build_failure_notice(sources, model, "inference_failed")
    assert other.SOPInstanceUID != notice.SOPInstanceUID
    with pytest.raises(ValueError, match="reason_code"):
        build_failure_notice(sources, model, "Patient PHI^SENTINEL crashed us")


# --------------------------------------------------------------------------- KOS


def test_key_object_selection_flags_key_and_positive_slices(
    results_ct_series: list[Dataset],
) -> None:
    series = results_ct_series
    uids = [str(ds.SOPInstanceUID) for ds in series]
    low = {"any": 0.1, "subdural": 0.1}
    image_scores = {uid: dict(low) for uid in uids}
    image_scores[uids[3]] = {"any": 0.95, "subdural": 0.9}  # positive, also the key image
    image_scores[uids[1]] = {"any": 0.7, "subdural": 0.2}  # positive
    findings = _findings(series, Task.HEAD_CT_ICH, key_uids=[uids[3]],
                         image_scores=image_scores)  # fmt: skip
    objs = build_results(series, findings, ResultOptions(emit_sc=False, emit_ko=True))
    assert [o.Modality for o in objs] == ["SR", "KO", "SEG"]
    ko = _roundtrip(objs[1])
    assert ko.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert ko.SeriesNumber == 9104
    assert ko.StudyInstanceUID == series[0].StudyInstanceUID
    assert ko.SeriesDescription.endswith("NOT FOR DIAGNOSTIC USE")
    flagged = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
               for item in ko.ContentSequence if item.ValueType == "IMAGE"]  # fmt: skip
    assert flagged == [uids[3], uids[1]]  # key image first, then the other positive slice
    again = build_results(series, findings, ResultOptions(emit_sc=False, emit_ko=True))[1]
    assert again.SOPInstanceUID == ko.SOPInstanceUID


# --------------------------------------------------------------------------- validators

_DCIODVFY = shutil.which("dciodvfy")
_JAVA = shutil.which("java")
_PIXELMED = Path("/usr/share/java/pixelmed.jar")
_PIXELMED_PROPS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]
_BATCH_VALIDATOR = """
import com.pixelmed.validate.DicomSRValidator;
public class BatchSRValidator {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : args) {
            System.out.println("@@FILE " + path);
            System.out.println(validator.validate(path));
        }
    }
}
"""
# Known pixelmed 20220618 message on valid files (ai-result-objects.md section 10.4): a
# qualitative evaluation (CODE) inside a TID 1501 measurement group is "not in template".
_PIXELMED_KNOWN = (
    re.compile(
        r'^Warning: [\d.]+: /CONTAINER \(126000,DCM,"Imaging Measurement Report"\)'
        r'/CONTAINER \(126010,DCM,"Imaging Measurements"\)'
        r'/CONTAINER \(125007,DCM,"Measurement Group"\)/CODE \(.*\): Content Item not in template$'
    ),
    # Deliberate (what OHIF 3 and dsr2html show): the Comment of each located finding's group,
    # and the study score (NUM, HAS PROPERTIES) under each report-level evaluation. pixelmed
    # 20220618's templates list neither; they are warnings, never errors.
    re.compile(
        r'^Warning: [\d.]+: /CONTAINER \(126000,DCM,"Imaging Measurement Report"\)'
        r'/CONTAINER \(126010,DCM,"Imaging Measurements"\)'
        r'/CONTAINER \(125007,DCM,"Measurement Group"\)/TEXT \(121106,DCM,"Comment"\): '
        r"Content Item not in template$"
    ),
    re.compile(
        r'^Warning: [\d.]+: /CONTAINER \(126000,DCM,"Imaging Measurement Report"\)'
        r'/CONTAINER \(C0034375,UMLS,"Qualitative Evaluations"\)/CODE \([^)]*\)'
        r'/NUM \(111012,DCM,"Certainty of Finding"\): Content Item not in template$'
    ),
)
# Real samples: CR, DX and CT images, with the task that would run on them.
_REAL_TASKS = {
    "chest_xray/RG1_J2KI.dcm": Task.CHEST_XRAY,
    "chest_xray/nih_cxr14_dx_sc.dcm": Task.CHEST_XRAY,
    "other/misc/highdicom_dx_dog_thorax.dcm": Task.CHEST_XRAY,
    "other/transfer_syntaxes/RG1_JLSN.dcm": Task.CHEST_XRAY,
    "extremity_xray/RG2_J2KI.dcm": Task.BONE_XRAY,
    "extremity_xray/RG3_J2KR.dcm": Task.BONE_XRAY,
    "other/misc/pcir_cspine_cr_lat_16x16.dcm": Task.BONE_XRAY,
    "head_ct/CT2_UNC.dcm": Task.HEAD_CT_ICH,
}
for _name in ("RG3_JLSL", "RG3_JPLL", "RG3_JPLY", "RG3_RLE", "RG3_UNC"):
    _REAL_TASKS[f"other/transfer_syntaxes/{_name}.dcm"] = Task.BONE_XRAY
for _name in ("CT2_J2KI", "CT2_J2KR", "CT2_JLSL", "CT2_JLSN", "CT2_JPLL", "CT2_RLE"):
    _REAL_TASKS[f"other/transfer_syntaxes/{_name}.dcm"] = Task.HEAD_CT_ICH
# pixelmed takes about 10 s per TID 1500 SR, so it checks one SR per distinct source image
# (transfer-syntax variants of one image give the same SR tree; dciodvfy checks them all).
_PIXELMED_REAL = {
    "chest_xray/nih_cxr14_dx_sc.dcm",
    "other/misc/highdicom_dx_dog_thorax.dcm",
    "extremity_xray/RG2_J2KI.dcm",
    "other/misc/pcir_cspine_cr_lat_16x16.dcm",
    "head_ct/CT2_UNC.dcm",
}


def _dciodvfy_errors(path: Path) -> list[str]:
    assert _DCIODVFY is not None
    run = subprocess.run(
        [_DCIODVFY, "-new", str(path)], capture_output=True, text=True, timeout=120
    )
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _pixelmed(paths: Sequence[Path], workdir: Path) -> dict[str, list[str]]:
    """Validate SRs in one JVM (the batch class), falling back to one JVM per file."""
    assert _JAVA is not None
    source = workdir / "BatchSRValidator.java"
    source.write_text(_BATCH_VALIDATOR)
    cmd = [_JAVA, *_PIXELMED_PROPS, "-cp", str(_PIXELMED), str(source), *map(str, paths)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out: dict[str, list[str]] = {}
    if run.returncode == 0 and "@@FILE" in run.stdout:
        current = ""
        for line in run.stdout.splitlines():
            if line.startswith("@@FILE "):
                current = line[len("@@FILE ") :]
                out[current] = []
            else:
                out[current].append(line)
        return out
    for path in paths:  # JRE without a compiler: the validator's own main, per file
        cmd = [_JAVA, *_PIXELMED_PROPS, "-cp", str(_PIXELMED),
               "com.pixelmed.validate.DicomSRValidator", str(path)]  # fmt: skip
        single = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        out[str(path)] = (single.stdout + single.stderr).splitlines()
    return out


def _validation_cases(tmp: Path) -> tuple[list[tuple[Path, Path | None]], list[Path]]:
    """Write every object to ``tmp``: (object, its source or None) pairs, and SRs for pixelmed."""
    pairs: list[tuple[Path, Path | None]] = []
    for_pixelmed: list[Path] = []

    def emit(name: str, objs: Sequence[Dataset], source: Path | None, pixelmed: bool) -> None:
        for i, ds in enumerate(objs):
            path = tmp / f"{name}_{i}_{ds.Modality}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            pairs.append((path, source))
            if pixelmed and ds.Modality == "SR":
                for_pixelmed.append(path)

    # One build per task, as in the tests above (SR, text SR, SC, KOS, SEG, failure notice).
    ct_dir = tmp / "ct"
    ct_dir.mkdir()
    series = _ct_series()
    for ds in series:
        pydicom.dcmwrite(ct_dir / f"{ds.InstanceNumber}.dcm", ds, enforce_file_format=True)
    chest, bone = _read("chest_xray/RG1_J2KI.dcm"), _read("extremity_xray/RG3_J2KR.dcm")
    task_cases = [
        ("chest", [chest], DATA / "chest_xray/RG1_J2KI.dcm", Task.CHEST_XRAY),
        ("bone", [bone], DATA / "extremity_xray/RG3_J2KR.dcm", Task.BONE_XRAY),
        ("ct", series, ct_dir / "1.dcm", Task.HEAD_CT_ICH),
    ]
    for name, sources, source_path, task in task_cases:
        findings = _findings(sources, task, key_uids=[str(ds.SOPInstanceUID) for ds in sources[:3]])
        objs = build_results(sources, findings, ResultOptions(emit_text_sr=True, emit_ko=True))
        assert [o.Modality for o in objs][-2:] == ["KO", "SEG"]
        notice = build_failure_notice(sources, findings.model, "inference_failed")
        emit(name, [*objs, notice], source_path, pixelmed=True)
        if task == Task.BONE_XRAY:  # an amending SR: Predecessor Documents Sequence
            first = objs[0]
            ref = (first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPClassUID,
                   first.SOPInstanceUID)  # fmt: skip
            amended = build_results(
                sources, findings, ResultOptions(emit_sc=False, emit_seg=False),
                previous_sr_refs=[ref],
            )  # fmt: skip
            emit("bone-amended", amended, source_path, pixelmed=True)
    for sr_class in ("comprehensive", "enhanced"):
        findings = _findings(series, Task.HEAD_CT_ICH, key_uids=())
        objs = build_results(series, findings, ResultOptions(sr_sop_class=sr_class))
        emit(f"ct-{sr_class}", objs, ct_dir / "1.dcm", pixelmed=True)
    # A chest SR with exactly one located finding, and a negative one (one whole-image group).
    chest_labels = LABELS[Task.CHEST_XRAY]
    one = {label: (0.9 if label == "pneumothorax" else 0.2) for label in chest_labels}
    negative = dict.fromkeys(chest_labels, 0.2)
    for name, scores, groups in (("chest-one", one, 1), ("chest-negative", negative, 0)):
        findings = _findings([chest], Task.CHEST_XRAY, key_uids=(), study_scores=scores)
        objs = build_results([chest], findings, ResultOptions(emit_sc=False))
        assert len(_groups(_sr(objs[0]))) == max(groups, 1)
        assert len(_top(objs[0], "126010")) == 1
        emit(name, objs, DATA / "chest_xray/RG1_J2KI.dcm", pixelmed=True)

    for rel, task in _REAL_TASKS.items():
        src = _read(rel)
        findings = _findings([src], task)
        try:
            objs = build_results([src], findings, ResultOptions(emit_text_sr=True))
        except UnsupportedInput:  # RG3_JPLY: no decoder for 12-bit JPEG, so no SC
            findings = _findings([src], task, key_uids=())
            objs = build_results([src], findings, ResultOptions(emit_text_sr=True))
        notice = build_failure_notice([src], findings.model, "unsupported_input")
        name = rel.replace("/", "_")[:-4]
        emit(name, [*objs[:1]], DATA / rel, pixelmed=rel in _PIXELMED_REAL)
        emit(name + "_rest", [*objs[1:], notice], DATA / rel, pixelmed=False)
    return pairs, for_pixelmed


def _subtract_source_errors(errors: list[str], source_errors: list[str]) -> list[str]:
    """Errors of an object that its source does not have (same message, same attribute)."""
    known = set(source_errors)
    return [line for line in errors if line not in known]


@pytest.mark.validators
@pytest.mark.skipif(
    _DCIODVFY is None or _JAVA is None or not _PIXELMED.exists(),
    reason="needs dciodvfy, java and pixelmed.jar",
)
def test_validators(tmp_path: Path) -> None:
    pairs, for_pixelmed = _validation_cases(tmp_path)
    sources = sorted({src for _, src in pairs if src is not None})
    half = len(for_pixelmed) // 2
    batches = [for_pixelmed[::2], for_pixelmed[1::2]] if half else [for_pixelmed]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with ThreadPoolExecutor(max_workers=4) as pool:
        pixelmed_jobs = [
            pool.submit(_pixelmed, batch, tmp_path / sub)
            for batch, sub in zip(batches, ("a", "b"), strict=False)
        ]
        source_errors = dict(zip(sources, pool.map(_dciodvfy_errors, sources), strict=True))
        object_errors = dict(
            zip([p for p, _ in pairs], pool.map(_dciodvfy_errors, [p for p, _ in pairs]),
                strict=True)
        )  # fmt: skip
        pixelmed = {k: v for job in pixelmed_jobs for k, v in job.result().items()}

    assert any(path.name.endswith("_SEG.dcm") for path, _ in pairs)
    assert any("chest-one" in p.name for p in for_pixelmed)
    assert any("chest-negative" in p.name for p in for_pixelmed)
    problems = []
    for path, source in pairs:
        new = _subtract_source_errors(object_errors[path], source_errors.get(source, []))
        problems += [f"dciodvfy {path.name}: {line}" for line in new]
    assert set(pixelmed) == {str(p) for p in for_pixelmed}
    for path, lines in pixelmed.items():
        assert any("Validation Complete" in line for line in lines), (path, lines[-5:])
        bad = [
            line
            for line in lines
            if line.startswith(("Error", "Warning"))
            and not any(p.search(line) for p in _PIXELMED_KNOWN)
        ]
        problems += [f"pixelmed {Path(path).name}: {line}" for line in bad]
    assert not problems, "\n".join(problems)
