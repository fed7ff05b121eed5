"""Tests for the synthetic DICOM generators and the bundled demo samples."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale
from pydicom.pixels.encoders import (
    JPEG2000Encoder,
    JPEG2000LosslessEncoder,
    JPEGLSLosslessEncoder,
    JPEGLSNearLosslessEncoder,
    RLELosslessEncoder,
)
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
)

from dicomai_tools import samples

from dicomai_tools import synthetic
from dicomai_tools.synthetic import PatientInfo, make_head_ct, make_mr, make_xray

SENTINELS = ("PHI^SENTINEL", "PHI-SENTINEL-ID", "19010101", "PHISENTINELACC")


@pytest.fixture(autouse=True)
def strict_validation() -> Iterator[None]:
    """Raise on any invalid value written or read, as the result-object tests do."""
    settings = config.settings
    old = settings.writing_validation_mode, settings.reading_validation_mode
    settings.writing_validation_mode = config.RAISE
    settings.reading_validation_mode = config.RAISE
    yield
    settings.writing_validation_mode, settings.reading_validation_mode = old


def round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def hu(ds: Dataset) -> np.ndarray:
    return np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# PatientInfo
# --------------------------------------------------------------------------------------------


def test_patient_defaults_are_sentinels() -> None:
    p = PatientInfo()
    assert (p.name, p.patient_id, p.birth_date, p.accession) == SENTINELS
    ds = make_xray("chest", rows=32, cols=32)
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber) == (
        SENTINELS
    )


def test_patient_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match='"accession"'):
        PatientInfo(accession="X" * 17)
    with pytest.raises(ValueError, match='"sex"'):
        PatientInfo(sex="X")


# --------------------------------------------------------------------------------------------
# Head CT
# --------------------------------------------------------------------------------------------


def test_head_ct_round_trips_with_realistic_headers() -> None:
    slices = make_head_ct(6, rows=64, cols=64, seed=3)
    assert len(slices) == 6
    read = [round_trip(ds) for ds in slices]
    for number, ds in enumerate(read, start=1):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT"
        assert ds.BodyPartExamined == "HEAD"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.SeriesDescription == "HEAD WO"
        assert ds.StudyDescription == "CT HEAD WITHOUT CONTRAST"
        assert ds.PatientPosition == "HFS"
        assert ds.InstanceNumber == number
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 80.0)
        assert ds.pixel_array.shape == (64, 64)
        assert int(ds.pixel_array.max()) <= 4095
    assert len({ds.StudyInstanceUID for ds in read}) == 1
    assert len({ds.SeriesInstanceUID for ds in read}) == 1
    assert len({ds.FrameOfReferenceUID for ds in read}) == 1
    assert len({ds.SOPInstanceUID for ds in read}) == 6


def test_head_ct_geometry_is_monotonic_axial() -> None:
    slices = make_head_ct(10, rows=32, cols=32, slice_thickness=2.5)
    z = [float(ds.ImagePositionPatient[2]) for ds in slices]
    assert np.allclose(np.diff(z), 2.5)
    assert [float(ds.SliceLocation) for ds in slices] == z
    for ds in slices:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceThickness) == 2.5
        assert float(ds.PixelSpacing[0]) == pytest.approx(250 / 32)


def test_head_ct_phantom_hounsfield_units() -> None:
    slices = make_head_ct(24, rows=128, cols=128)
    mid = hu(slices[12])
    assert np.median(mid[:8, :8]) < -900  # air in the corner
    assert mid.max() > 500  # skull
    brain_roi = mid[58:70, 80:88]  # right of the ventricles, inside the skull
    assert 25 < brain_roi.mean() < 45
    # Ventricles (about 5 HU) exist on the middle slices.
    assert np.count_nonzero((mid > -10) & (mid < 15)) > 20


def test_head_ct_bleed_is_hyperdense_on_a_few_slices() -> None:
    plain = make_head_ct(24, rows=128, cols=128, seed=1)
    bleed = make_head_ct(24, rows=128, cols=128, seed=1, bleed=True)
    counts = []
    for clean_ds, bleed_ds in zip(plain, bleed, strict=True):
        clean_hu, bleed_hu = hu(clean_ds), hu(bleed_ds)
        assert np.count_nonzero((clean_hu > 60) & (clean_hu < 85)) < 5
        counts.append(np.count_nonzero((bleed_hu > 60) & (bleed_hu < 85)))
    positive = [i for i, n in enumerate(counts) if n > 20]
    assert 3 <= len(positive) <= 8
    # Patient's right is image left (-x): the crescent lies in the left half.
    first = hu(bleed[positive[0]])
    left, right = first[:, :64], first[:, 64:]
    assert np.count_nonzero((left > 60) & (left < 85)) > np.count_nonzero(
        (right > 60) & (right < 85)
    )


def test_head_ct_is_deterministic_for_a_seed() -> None:
    a = make_head_ct(3, rows=32, cols=32, seed=7)
    b = make_head_ct(3, rows=32, cols=32, seed=7)
    c = make_head_ct(3, rows=32, cols=32, seed=8)
    for x, y in zip(a, b, strict=True):
        assert x.SOPInstanceUID == y.SOPInstanceUID
        assert x.StudyDate == y.StudyDate and x.StudyTime == y.StudyTime
        assert x.PixelData == y.PixelData
    assert a[0].StudyInstanceUID != c[0].StudyInstanceUID
    assert a[0].PixelData != c[0].PixelData


def test_head_ct_given_study_uid_renews_every_uid() -> None:
    a = make_head_ct(2, rows=32, cols=32, study_uid="1.2.3.4")
    b = make_head_ct(2, rows=32, cols=32, study_uid="1.2.3.5")
    assert a[0].StudyInstanceUID == "1.2.3.4"
    assert a[0].SeriesInstanceUID != b[0].SeriesInstanceUID
    assert a[0].SOPInstanceUID != b[0].SOPInstanceUID
    assert a[0].FrameOfReferenceUID != b[0].FrameOfReferenceUID


def test_head_ct_localizer_is_a_separate_series() -> None:
    out = make_head_ct(8, rows=64, cols=64, with_localizer=True)
    assert len(out) == 9
    scout, axial = round_trip(out[0]), out[1:]
    assert list(scout.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert all(ds.ImageType[2] == "AXIAL" for ds in axial)
    assert scout.SeriesInstanceUID != axial[0].SeriesInstanceUID
    assert scout.StudyInstanceUID == axial[0].StudyInstanceUID
    assert scout.FrameOfReferenceUID == axial[0].FrameOfReferenceUID
    assert scout.SeriesNumber == 1 and axial[0].SeriesNumber == 2
    assert scout.pixel_array.shape == (64, 64)


def test_head_ct_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match='"n_slices"'):
        make_head_ct(0)
    with pytest.raises(ValueError, match='"study_uid"'):
        make_head_ct(2, study_uid="not a uid")
    with pytest.raises(ValueError, match='"seed"'):
        make_head_ct(2, seed=-1)


@pytest.mark.parametrize(
    "transfer_syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
)
def test_head_ct_native_transfer_syntaxes(transfer_syntax: UID) -> None:
    ds = round_trip(make_head_ct(1, rows=32, cols=32, transfer_syntax=transfer_syntax)[0])
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    assert ds.pixel_array.shape == (32, 32)


# --------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------

_ENCODERS = {
    RLELossless: RLELosslessEncoder,
    JPEGLSLossless: JPEGLSLosslessEncoder,
    JPEGLSNearLossless: JPEGLSNearLosslessEncoder,
    JPEG2000Lossless: JPEG2000LosslessEncoder,
    JPEG2000: JPEG2000Encoder,
}


@pytest.mark.parametrize("transfer_syntax", list(_ENCODERS))
def test_recompress(transfer_syntax: UID) -> None:
    if not _ENCODERS[transfer_syntax].is_available:
        pytest.skip(f"no encoder for {transfer_syntax.name}")
    original = make_head_ct(1, rows=64, cols=64)[0]
    out = round_trip(synthetic.recompress(original, transfer_syntax))
    assert out.file_meta.TransferSyntaxUID == transfer_syntax
    assert out.SOPInstanceUID == original.SOPInstanceUID
    assert original.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # copy, not in place
    diff = np.abs(out.pixel_array.astype(int) - original.pixel_array.astype(int))
    if transfer_syntax in {JPEG2000, JPEGLSNearLossless}:
        assert out.LossyImageCompression == "01"
        assert diff.mean() < 0.02 * 4095  # lossy, but close
    else:
        assert diff.max() == 0


def test_head_ct_compressed_series() -> None:
    slices = make_head_ct(2, rows=32, cols=32, transfer_syntax=RLELossless)
    plain = make_head_ct(2, rows=32, cols=32)
    for ds, ref in zip(slices, plain, strict=True):
        assert ds.SOPInstanceUID == ref.SOPInstanceUID
        assert np.array_equal(round_trip(ds).pixel_array, ref.pixel_array)


# --------------------------------------------------------------------------------------------
# Radiographs and MR
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(synthetic.XRAY_KINDS))
@pytest.mark.parametrize("modality", ["DX", "CR"])
def test_xray_round_trips(kind: str, modality: str) -> None:
    ds = round_trip(make_xray(kind, modality=modality, rows=96, cols=80))
    dx_class, cr_class = DigitalXRayImageStorageForPresentation, ComputedRadiographyImageStorage
    expected_class = dx_class if modality == "DX" else cr_class
    assert ds.SOPClassUID == expected_class
    assert ds.Modality == modality
    assert ds.BodyPartExamined == synthetic.XRAY_KINDS[kind]
    assert ds.pixel_array.shape == (96, 80)
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert float(ds.WindowWidth) > 0
    if modality == "DX":
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.PresentationLUTShape == "IDENTITY"
        assert ds.ImageLaterality == ("U" if kind == "chest" else "R")
        assert ds.AnatomicRegionSequence[0].CodingSchemeDesignator == "SCT"
    if kind != "chest":
        assert ds.Laterality == "R"


def test_chest_lungs_are_darker_than_mediastinum() -> None:
    ds = make_xray("chest", rows=256, cols=256)
    image = ds.pixel_array.astype(float)
    lung = image[110:130, 70:90].mean()  # image left lung
    mediastinum = image[90:110, 122:134].mean()
    assert lung < mediastinum - 300
    assert ds.ViewPosition == "PA"

    inverted = make_xray("chest", rows=256, cols=256, monochrome1=True)
    assert inverted.PhotometricInterpretation == "MONOCHROME1"
    assert inverted.PresentationLUTShape == "INVERSE"
    flipped = inverted.pixel_array.astype(float)
    assert flipped[110:130, 70:90].mean() > flipped[90:110, 122:134].mean() + 300


def test_hand_has_bone_brighter_than_soft_tissue() -> None:
    image = make_xray("hand", rows=256, cols=256).pixel_array
    assert np.percentile(image, 99.5) > 3000  # cortical bone
    assert np.median(image) < 800  # mostly air around the hand
    assert np.count_nonzero((image > 1000) & (image < 1800)) > 500  # soft tissue


def test_xray_options_and_validation() -> None:
    ds = make_xray("knee", view_position="LAT", laterality="L", body_part="")
    assert ds.ViewPosition == "LAT"
    assert ds.ImageLaterality == "L"
    assert ds.BodyPartExamined == ""
    round_trip(ds)
    with pytest.raises(ValueError, match='"kind"'):
        make_xray("skull")
    with pytest.raises(ValueError, match='"modality"'):
        make_xray("chest", modality="CT")
    with pytest.raises(ValueError, match='"laterality"'):
        make_xray("hand", laterality="X")


def test_xray_is_deterministic() -> None:
    a, b = make_xray("hand", seed=5, rows=64, cols=64), make_xray("hand", seed=5, rows=64, cols=64)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.PixelData == b.PixelData
    assert make_xray("hand", seed=6, rows=64, cols=64).StudyInstanceUID != a.StudyInstanceUID


def test_mr_knee() -> None:
    series = make_mr("KNEE", 3, rows=64, cols=64)
    assert len(series) == 3
    for ds in map(round_trip, series):
        assert ds.SOPClassUID == MRImageStorage
        assert ds.Modality == "MR"
        assert ds.BodyPartExamined == "KNEE"
        assert ds.pixel_array.shape == (64, 64)
    x = [float(ds.ImagePositionPatient[0]) for ds in series]
    assert np.all(np.diff(x) > 0)


def test_write_study(tmp_path: Path) -> None:
    datasets = make_head_ct(3, rows=32, cols=32, with_localizer=True)
    paths = synthetic.write_study(datasets, tmp_path / "study")
    assert [p.name for p in paths] == [f"{ds.SOPInstanceUID}.dcm" for ds in datasets]
    for path, ds in zip(paths, datasets, strict=True):
        read = dcmread(path)
        assert read.SOPInstanceUID == ds.SOPInstanceUID
        assert np.array_equal(read.pixel_array, ds.pixel_array)


# --------------------------------------------------------------------------------------------
# Bundled samples and demo studies
# --------------------------------------------------------------------------------------------


def test_real_samples_match_provenance() -> None:
    provenance = (samples.SAMPLES_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    for relpath in samples.REAL_SAMPLES:
        path = samples.real_sample(relpath)
        assert f"### `{relpath}`" in provenance
        assert hashlib.sha256(path.read_bytes()).hexdigest() in provenance


def test_real_sample_rejects_bad_paths() -> None:
    with pytest.raises(ValueError, match='"relpath"'):
        samples.real_sample("../synthetic.py")
    with pytest.raises(ValueError, match='"relpath"'):
        samples.real_sample("/etc/passwd")
    with pytest.raises(FileNotFoundError):
        samples.real_sample("chest_xray/missing.dcm")


def test_demo_studies(tmp_path: Path) -> None:
    studies = samples.demo_studies(tmp_path, "run-1", include_unroutable=True)
    assert [s.kind for s in studies] == ["chest-xray", "bone-xray", "head-ct", "unroutable"]
    headers = {s.kind: [dcmread(p, stop_before_pixels=True) for p in s.files] for s in studies}
    for study in studies:
        assert study.files and all(p.is_file() for p in study.files)
        assert all(p.is_relative_to(tmp_path) for p in study.files)
        assert {ds.StudyInstanceUID for ds in headers[study.kind]} == {study.study_instance_uid}

    chest = headers["chest-xray"][0]
    assert (chest.Modality, chest.BodyPartExamined) == ("CR", "CHEST")
    bone = headers["bone-xray"][0]
    assert (bone.Modality, bone.BodyPartExamined) == ("CR", "EXTREMITY")
    assert len(headers["head-ct"]) == 24
    assert {ds.BodyPartExamined for ds in headers["head-ct"]} == {"HEAD"}
    assert {ds.Modality for ds in headers["unroutable"]} == {"MR"}

    # Copies of real samples: new UIDs, pixel data untouched.
    for kind, relpath in (
        ("chest-xray", "chest_xray/RG1_J2KI.dcm"),
        ("bone-xray", "extremity_xray/RG3_J2KR.dcm"),
    ):
        source = dcmread(samples.real_sample(relpath))
        copy = dcmread(next(s for s in studies if s.kind == kind).files[0])
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert copy[keyword].value != source[keyword].value
        assert copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID
        assert copy.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert copy.PixelData == source.PixelData
    assert dcmread(studies[2].files[0]).pixel_array.shape == (256, 256)

    uids = [ds.StudyInstanceUID for group in headers.values() for ds in group[:1]]
    assert len(set(uids)) == 4


def test_demo_studies_uids_follow_the_seed(tmp_path: Path) -> None:
    first = samples.demo_studies(tmp_path, "seed-a")
    again = samples.demo_studies(tmp_path, "seed-a")
    other = samples.demo_studies(tmp_path, "seed-b")
    assert [s.study_instance_uid for s in first] == [s.study_instance_uid for s in again]
    assert [s.files for s in first] == [s.files for s in again]
    first_uids = {s.study_instance_uid for s in first}
    assert first_uids.isdisjoint(s.study_instance_uid for s in other)
    sop_first = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for s in first for p in s.files}
    sop_other = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for s in other for p in s.files}
    assert sop_first.isdisjoint(sop_other)


def test_demo_studies_bone_body_part_override(tmp_path: Path) -> None:
    studies = samples.demo_studies(tmp_path, "x", bone_body_part="ANKLE")
    bone = next(s for s in studies if s.kind == "bone-xray")
    assert dcmread(bone.files[0], stop_before_pixels=True).BodyPartExamined == "ANKLE"
    assert "changed from EXTREMITY to ANKLE" in bone.description
    with pytest.raises(ValueError, match='"uid_seed"'):
        samples.demo_studies(tmp_path, "")
    with pytest.raises(ValueError, match='"bone_body_part"'):
        samples.demo_studies(tmp_path, "x", bone_body_part="ankle")
