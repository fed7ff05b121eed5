"""Tests of dicomai.results: SR, SC, Basic Text SR and failure notice builders."""

from __future__ import annotations

import copy
import io
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
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
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomai.errors import UnsupportedInput
from dicomai.findings import DISCLAIMER, UID_ROOT, Findings, ModelIdentity, Task
from dicomai.results import ResultOptions, build_failure_notice, build_results
from dicomai.results.codes import (
    ICH,
    PRIVATE_SCHEME,
    UNVERIFIED_CANDIDATES,
    CodeStatus,
    bone_site,
    table_for,
)
from dicomai.results.display import MAX_SIDE, display_rgb, fit_size, resize_rgb
from dicomai.results.sc import caption_text
from dicomai.synthetic import make_xray, recompress

DATA = Path(__file__).resolve().parent.parent / "data" / "real"
STARTED = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
SHA = "0123456789abcdef" * 4
SENTINEL = "PHI^SENTINEL"
_TEST_ROOT = "1.2.826.0.1.3680043.8.498.999."
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
) -> Findings:
    """Alternating scores 0.9 / 0.2 (threshold 0.5): labels 0, 2, 4... present."""
    labels = LABELS[task]
    scores = {label: (0.9 if i % 2 == 0 else 0.2) for i, label in enumerate(labels)}
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


def _summary(ds: Dataset) -> list[Dataset]:
    (container,) = [
        item
        for item in ds.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
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


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def results_raise_on_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


@pytest.fixture(scope="module")
def results_chest_source() -> Dataset:
    # CR, MONOCHROME1, JPEG 2000, one-component ReferringPhysicianName (highdicom warning).
    return _read("chest_xray/RG1_J2KI.dcm")


@pytest.fixture(scope="module")
def results_chest(results_chest_source: Dataset) -> tuple[Findings, list[Dataset]]:
    findings = _findings([results_chest_source], Task.CHEST_XRAY)
    options = ResultOptions(emit_text_sr=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)
        objs = [_roundtrip(o) for o in build_results([results_chest_source], findings, options)]
    return findings, objs


@pytest.fixture(scope="module")
def results_ct_series() -> list[Dataset]:
    return _ct_series()


# --------------------------------------------------------------------------- chest X-ray


def test_chest_objects_in_order(results_chest: tuple[Findings, list[Dataset]]) -> None:
    _, objs = results_chest
    assert [o.SOPClassUID for o in objs] == [
        Comprehensive3DSRStorage,
        BasicTextSRStorage,
        SecondaryCaptureImageStorage,
    ]
    assert [o.SeriesNumber for o in objs] == [9101, 9103, 9102]
    assert all(str(o.SOPInstanceUID).startswith(UID_ROOT) for o in objs)


def test_chest_sr_codes_values_and_references(
    results_chest: tuple[Findings, list[Dataset]], results_chest_source: Dataset
) -> None:
    findings, (ds, *_) = results_chest
    sr = _sr(ds)
    table = table_for(Task.CHEST_XRAY)
    groups = _groups(sr)
    assert len(groups) == 14
    for label, group in zip(findings.labels, groups, strict=True):
        row = table[label]
        assert group.finding_type == row.finding
        assert [site.value for site in group.finding_sites] == [row.site]
        expected = codes.SCT.Present if findings.study_scores[label] >= 0.5 else codes.SCT.Absent
        assert _evaluation(group, row.finding) == expected
        (certainty,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert certainty.value == pytest.approx(100 * findings.study_scores[label])
        assert certainty.unit == codes.UCUM.Percent
        refs = group.source_images
        assert [r.referenced_sop_instance_uid for r in refs] == [
            results_chest_source.SOPInstanceUID
        ]
        assert group.tracking_identifier == f"chest-xray:{label}"
        params = _texts(group[0], "111002")  # TID 4019 Algorithm Parameters
        assert _texts(group[0], "111001") == ["chest-xray"]
        assert _texts(group[0], "111003") == ["0.1.0"]
        assert params == ["threshold=0.5", f"sha256={SHA}"]
    summary = _summary(ds)
    assert [item.ConceptCodeSequence[0].CodeValue for item in summary[:-1]] == [
        ("52101004" if findings.is_present(label) else "272519000") for label in findings.labels
    ]
    comment = summary[-1].TextValue
    assert DISCLAIMER in comment and "untrained reference model" in comment and SHA in comment


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


def test_chest_sc(
    results_chest: tuple[Findings, list[Dataset]], results_chest_source: Dataset
) -> None:
    _, (*_, sc) = results_chest
    src = results_chest_source
    assert sc.Modality == "OT" and sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert max(sc.Rows, sc.Columns) == MAX_SIDE  # 1955 x 1841 source, downscaled
    assert "PixelSpacing" not in sc
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.PatientID == src.PatientID
    assert sc.StudyDescription == src.StudyDescription
    assert sc.SeriesDescription == "AI OVERLAY - NOT FOR DIAGNOSTIC USE"
    assert (sc.ContentDate, sc.ContentTime) == ("20250304", "050607")
    assert sc.ConversionType == "WSD" and sc.ContentQualification == "RESEARCH"
    assert SHA in sc.DerivationDescription and "Not for diagnostic use" in sc.ImageComments
    assert "untrained reference model" in sc.ImageComments
    assert sc.ContributingEquipmentSequence[-1].DeviceUID == _model(Task.CHEST_XRAY).device_uid
    (ref,) = sc.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    pixels = sc.pixel_array
    caption = pixels[: sc.Rows // 10, : sc.Columns // 3]
    assert (caption == 255).all(axis=-1).any(), "caption text is drawn in white"
    assert (caption == 0).all(axis=-1).any(), "on a black box"
    background = display_rgb(src)
    small = np.asarray(Image.fromarray(background).resize((sc.Columns, sc.Rows)))
    assert not np.array_equal(caption, small[: sc.Rows // 10, : sc.Columns // 3])
    centre = pixels[sc.Rows // 3 : 2 * sc.Rows // 3, sc.Columns // 3 : 2 * sc.Columns // 3]
    assert (centre[..., 0] != centre[..., 2]).any(), "heat map colours the grey image"


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
    _, (_, text, _) = results_chest
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


# --------------------------------------------------------------------------- UIDs


def test_uids_deterministic_and_keyed_on_content(results_chest_source: Dataset) -> None:
    nih = _read("chest_xray/nih_cxr14_dx_sc.dcm")  # missing Type 2 attributes
    options = ResultOptions(emit_text_sr=True)
    first = build_results([nih], _findings([nih], Task.CHEST_XRAY), options)
    again = build_results([nih], _findings([nih], Task.CHEST_XRAY), options)
    assert _all_uids(first) == _all_uids(again)
    tracking = [g.tracking_uid for g in _groups(_sr(first[0]))]
    assert tracking == [g.tracking_uid for g in _groups(_sr(again[0]))]
    assert len(set(tracking)) == len(tracking)
    seen = {uid for pair in _all_uids(first) for uid in pair}

    changed = [
        _findings([nih], Task.CHEST_XRAY, model=_model(Task.CHEST_XRAY, version="0.2.0")),
        _findings([nih], Task.CHEST_XRAY, model=_model(Task.CHEST_XRAY, sha256="f" * 64)),
    ]
    for findings in changed:
        other = build_results([nih], findings, options)
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


def test_head_ct_study_and_slice_groups(results_ct_series: list[Dataset]) -> None:
    series = results_ct_series
    uids = [str(ds.SOPInstanceUID) for ds in series]
    labels = LABELS[Task.HEAD_CT_ICH]
    image_scores = {
        uid: {label: (0.8 - 0.05 * i if label in ("any", "subdural") and i % 2 == 0 else 0.1)
              for label in labels}
        for i, uid in enumerate(uids)
    }  # fmt: skip
    keys = (uids[0], uids[2], uids[4])
    # Only key images carry pixels: everything else is headers.
    sources = _headers(series, keep=keys)
    findings = _findings(sources, Task.HEAD_CT_ICH, key_uids=keys, image_scores=image_scores)
    objs = [_roundtrip(o) for o in build_results(sources, findings)]
    assert [o.Modality for o in objs] == ["SR", "OT", "OT", "OT"]
    sr = _sr(objs[0])
    groups = _groups(sr)
    table = table_for(Task.HEAD_CT_ICH)
    study_groups, slice_groups = groups[:6], groups[6:]
    for label, group in zip(labels, study_groups, strict=True):
        assert group.finding_type == table[label].finding
        assert group.source_images == []  # the evidence lists the series
    # Subdural is UNVERIFIED: private code, never an SCT code.
    assert study_groups[5].finding_type.scheme_designator == PRIVATE_SCHEME
    assert study_groups[3].finding_type == ICH  # intraventricular fallback
    assert study_groups[3].finding_sites[0].value == codes.SCT.BrainVentricle
    # Slices 0, 2, 4 have "subdural" above threshold; "any" is not repeated per slice.
    assert len(slice_groups) == 3
    assert [g.source_images[0].referenced_sop_instance_uid for g in slice_groups] == list(keys)
    assert all(g.finding_type == table["subdural"].finding for g in slice_groups)
    assert [g.get_measurements()[0].value for g in slice_groups] == [80.0, 70.0, 60.0]
    assert slice_groups[0].tracking_identifier == "head-ct-ich:slice:1:subdural"
    refs = objs[0].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {r.ReferencedSOPInstanceUID for r in refs.ReferencedSOPSequence} == set(uids)
    assert [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in objs[1:]] == list(keys)
    assert [sc.InstanceNumber for sc in objs[1:]] == [1, 2, 3]
    assert len({sc.SeriesInstanceUID for sc in objs[1:]}) == 1
    assert all(sc.BodyPartExamined == "HEAD" for sc in objs[1:])
    assert all(sc.PatientName == SENTINEL for sc in objs)

    capped = build_results(
        sources, findings, ResultOptions(max_slice_groups=1, sc_max_images=2, emit_sc=True)
    )
    assert len(_groups(_sr(capped[0]))) == 7
    assert len(capped) == 3
    assert [o.Modality for o in build_results(sources, findings, ResultOptions(emit_sc=False))] == [
        "SR"
    ]


def test_head_ct_real_slice_keeps_pixel_spacing() -> None:
    src = _read("other/transfer_syntaxes/CT2_JLSL.dcm")  # 512 x 512, JPEG-LS, no body part
    (_, sc) = build_results([src], _findings([src], Task.HEAD_CT_ICH))
    assert (sc.Rows, sc.Columns) == (512, 512)
    assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in src.PixelSpacing]
    assert sc.BodyPartExamined == "HEAD"
    assert tuple(sc.PatientOrientation) == ("L", "P")  # from ImageOrientationPatient


# --------------------------------------------------------------------------- bone X-ray


def test_bone_normality_per_image() -> None:
    src = _read("extremity_xray/RG3_J2KR.dcm")  # EXTREMITY, Laterality R, MONOCHROME1
    wrist = _headers([src])[0]
    wrist.SOPInstanceUID = _uid("wrist")
    wrist.BodyPartExamined = "WRIST"
    del wrist.Laterality
    sources = [src, wrist]
    scores = {str(src.SOPInstanceUID): {"abnormal": 0.9}, wrist.SOPInstanceUID: {"abnormal": 0.1}}
    findings = _findings(sources, Task.BONE_XRAY, image_scores=scores)
    sr_ds, sc = (_roundtrip(o) for o in build_results(sources, findings))
    groups = _groups(_sr(sr_ds))
    assert len(groups) == 2
    first, second = groups
    assert first.finding_type is None and second.finding_type is None
    assert _evaluation(first, codes.DCM.Normality) == codes.SCT.Abnormal
    assert _evaluation(second, codes.DCM.Normality) == codes.SCT.Normal
    site = first.finding_sites[0]
    assert site.value == codes.SCT.Bone  # "EXTREMITY" does not say which limb
    assert site.laterality == codes.SCT.Right
    assert second.finding_sites[0].value == codes.SCT.BoneOfUpperLimb
    assert second.finding_sites[0].laterality is None
    assert first.source_images[0].referenced_sop_instance_uid == src.SOPInstanceUID
    assert second.source_images[0].referenced_sop_instance_uid == wrist.SOPInstanceUID
    summary = _summary(sr_ds)
    assert summary[0].ConceptNameCodeSequence[0].CodeValue == "121402"
    assert summary[0].ConceptCodeSequence[0].CodeValue == "263654008"  # study score 0.9
    assert "CodingSchemeIdentificationSequence" not in sr_ds
    assert sc.Laterality == "R" and sc.BurnedInAnnotation == "YES"


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
    sources = _headers(results_ct_series)
    findings = _findings(sources, Task.HEAD_CT_ICH, key_uids=())
    (ds,) = build_results(sources, findings, ResultOptions(sr_sop_class=sr_sop_class))
    ds = _roundtrip(ds)
    assert ds.SOPClassUID == uid
    # 6 study-level groups + 2 subtypes (intraparenchymal, subarachnoid) on each of 6 slices.
    assert len(_groups(_sr(ds))) == 6 + 12


def test_sr_none_and_sc_only(results_ct_series: list[Dataset]) -> None:
    findings = _findings(results_ct_series, Task.HEAD_CT_ICH)
    objs = build_results(results_ct_series, findings, ResultOptions(sr_sop_class="none"))
    assert [o.Modality for o in objs] == ["OT"]
    # A 96 x 96 source is enlarged so the caption stays legible; the grid changes.
    assert max(objs[0].Rows, objs[0].Columns) == 512 and "PixelSpacing" not in objs[0]


@pytest.mark.parametrize(
    ("changes", "argument"),
    [
        ({"sr_sop_class": "basic"}, "sr_sop_class"),
        ({"sc_max_images": -1}, "sc_max_images"),
        ({"max_slice_groups": -1}, "max_slice_groups"),
        ({"series_number_base": -5}, "series_number_base"),
    ],
)
def test_invalid_options(changes: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        ResultOptions(**changes)  # type: ignore[arg-type]


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
    # Without key images the SR still builds.
    (sr,) = build_results(head, _findings(head, Task.BONE_XRAY, key_uids=()))
    assert sr.Modality == "SR"


def test_multiframe_source() -> None:
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
    findings = _findings([ds], Task.CHEST_XRAY)
    _, sc = build_results([ds], findings)
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 1
    assert display_rgb(ds, frame=2).shape == (48, 48, 3)


def test_caption_text(results_ct_series: list[Dataset]) -> None:
    uid = str(results_ct_series[0].SOPInstanceUID)
    bone = _findings(results_ct_series[:1], Task.BONE_XRAY)
    normal = replace(bone, study_scores={"abnormal": 0.1})
    text = caption_text(normal, table_for(Task.BONE_XRAY), uid, True)
    assert text.splitlines()[:3] == [
        "AI RESULT - NOT FOR DIAGNOSTIC USE",
        f"bone-xray 0.1.0 sha256 {SHA[:12]}",
        "untrained reference model",
    ]
    assert "Bone radiograph: Normal (score 10%, threshold 50%)" in text
    chest = _findings(results_ct_series[:1], Task.CHEST_XRAY)
    negative = replace(chest, study_scores=dict.fromkeys(chest.labels, 0.2))
    text = caption_text(negative, table_for(Task.CHEST_XRAY), uid, False)
    assert "No finding at or above threshold (highest: Atelectasis 20%)" in text
    assert "Heat map" not in text
    ct = _findings(results_ct_series, Task.HEAD_CT_ICH)
    text = caption_text(ct, table_for(Task.HEAD_CT_ICH), uid, True)
    assert "Intracranial hemorrhage: Present (score 90%, threshold 50%)" in text
    assert "This slice: " in text and "Heat map: Intracranial hemorrhage" in text


def test_fit_size() -> None:
    assert fit_size(2000, 1000) == (1024, 512)
    assert fit_size(600, 800) == (600, 800)
    assert fit_size(16, 8) == (512, 256)


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

    # One build per task, as in the tests above (SR, text SR, SC, failure notice).
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
        assert objs[-1].Modality == "KO"
        notice = build_failure_notice(sources, findings.model, "inference_failed")
        emit(name, [*objs, notice], source_path, pixelmed=True)
        if task == Task.BONE_XRAY:  # an amending SR: Predecessor Documents Sequence
            first = objs[0]
            ref = (first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPClassUID,
                   first.SOPInstanceUID)  # fmt: skip
            amended = build_results(
                sources, findings, ResultOptions(emit_sc=False), previous_sr_refs=[ref]
            )
            emit("bone-amended", amended, source_path, pixelmed=True)
    for sr_class in ("comprehensive", "enhanced"):
        findings = _findings(series, Task.HEAD_CT_ICH, key_uids=())
        objs = build_results(series, findings, ResultOptions(sr_sop_class=sr_class))
        emit(f"ct-{sr_class}", objs, ct_dir / "1.dcm", pixelmed=True)

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


def test_key_object_selection_flags_key_and_positive_slices(results_ct_series) -> None:
    series = results_ct_series
    uids = [str(ds.SOPInstanceUID) for ds in series]
    low = {"any": 0.1, "subdural": 0.1}
    image_scores = {uid: dict(low) for uid in uids}
    image_scores[uids[3]] = {"any": 0.95, "subdural": 0.9}  # positive, also the key image
    image_scores[uids[1]] = {"any": 0.7, "subdural": 0.2}  # positive
    findings = _findings(series, Task.HEAD_CT_ICH, key_uids=[uids[3]],
                         image_scores=image_scores)
    objs = build_results(series, findings, ResultOptions(emit_sc=False, emit_ko=True))
    ko = _roundtrip(objs[-1])
    assert ko.Modality == "KO"
    assert ko.StudyInstanceUID == series[0].StudyInstanceUID
    assert ko.SeriesDescription.endswith("NOT FOR DIAGNOSTIC USE")
    flagged = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
               for item in ko.ContentSequence if item.ValueType == "IMAGE"]
    assert flagged == [uids[3], uids[1]]  # key image first, then the other positive slice
    again = build_results(series, findings, ResultOptions(emit_sc=False, emit_ko=True))[-1]
    assert again.SOPInstanceUID == ko.SOPInstanceUID
