"""Tests of dicomai.inference.processing: preprocessing (numpy) and analyse() with a tiny predictor."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from dicomai.config import ModelSettings, PreprocessingSettings
from dicomai.errors import UnsupportedInput
from dicomai.inference.findings import ModelIdentity, Task
from dicomai.inference.processing import (
    analyse,
    ct_windows,
    order_slices,
    preprocess_ct_slice,
    preprocess_xray,
    resize,
)
from dicomai_tools.synthetic import make_head_ct, make_xray

PRE = PreprocessingSettings(input_size=32, batch_size=4)
MEAN = np.asarray(PRE.normalize_mean, dtype=np.float32)[:, None, None]
STD = np.asarray(PRE.normalize_std, dtype=np.float32)[:, None, None]
STARTED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def grey(out: np.ndarray) -> np.ndarray:
    """Undo the ImageNet normalisation: back to the [0, 1] image."""
    return out * STD + MEAN


def image(
    pixels: np.ndarray,
    *,
    uid: str = "1.2.3.4",
    sop_class: str = DigitalXRayImageStorageForPresentation,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    position: Sequence[float] | None = None,
    orientation: Sequence[float] | None = None,
    instance_number: int | None = None,
) -> Dataset:
    """A minimal greyscale dataset with unsigned 16-bit native pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    if slope is not None:
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept or 0:g}"
    if window is not None:
        ds.WindowCenter = f"{window[0]:g}"
        ds.WindowWidth = f"{window[1]:g}"
    if position is not None:
        ds.ImagePositionPatient = [f"{v:g}" for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    return ds


def ramp(rows: int = 64, cols: int = 64, top: int = 4000) -> np.ndarray:
    """Left-to-right ramp from 0 to ``top``."""
    return np.broadcast_to(np.linspace(0, top, cols), (rows, cols)).round().astype(np.uint16)


def ct_slice(hu: float, uid: str, z: float, instance_number: int, size: int = 16) -> Dataset:
    """A uniform axial CT slice of ``hu`` HU at height ``z`` (stored = HU + 1024)."""
    stored = np.full((size, size), hu + 1024, dtype=np.uint16)
    return image(stored, uid=uid, sop_class=CTImageStorage, slope=1, intercept=-1024,
                 position=(-100, -100, z), orientation=(1, 0, 0, 0, 1, 0),
                 instance_number=instance_number)


# -- X-ray preprocessing ----------------------------------------------------------------------


def test_preprocess_xray_shape_and_dtype() -> None:
    ds = make_xray("chest", rows=96, cols=80)
    out = preprocess_xray(ds, PRE)
    assert out.shape == (3, 32, 32)
    assert out.dtype == np.float32
    g = grey(out)
    assert np.allclose(g[0], g[1], atol=1e-6) and np.allclose(g[0], g[2], atol=1e-6)
    assert g.min() >= -1e-5 and g.max() <= 1 + 1e-5
    assert g.max() - g.min() > 0.5  # not a flat image


def test_preprocess_xray_input_size() -> None:
    ds = make_xray("hand", rows=64, cols=64)
    out = preprocess_xray(ds, PreprocessingSettings(input_size=48))
    assert out.shape == (3, 48, 48)


@pytest.mark.parametrize("with_window", [True, False])
def test_monochrome1_is_inverted(with_window: bool) -> None:
    mono2 = make_xray("chest", rows=64, cols=64)
    if not with_window:
        del mono2.WindowCenter
        del mono2.WindowWidth
    mono1 = copy.deepcopy(mono2)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    g2, g1 = grey(preprocess_xray(mono2, PRE)), grey(preprocess_xray(mono1, PRE))
    assert np.allclose(g1 + g2, 1.0, atol=1e-5)
    assert not np.allclose(g1, g2, atol=0.1)


def test_rescale_slope_and_intercept_are_applied() -> None:
    raw = ramp(top=1000)
    window = (1100.0, 600.0)  # in output units: 800 .. 1400
    rescaled = image(raw, slope=2, intercept=100, window=window)
    baked = image((raw.astype(np.int32) * 2 + 100).astype(np.uint16), window=window)
    ignored = image(raw, window=window)
    a, b, c = (grey(preprocess_xray(d, PRE))[0] for d in (rescaled, baked, ignored))
    assert np.allclose(a, b, atol=1e-5)
    assert not np.allclose(a, c, atol=0.05)


def test_voi_window_is_used_when_present() -> None:
    # A 0..4000 ramp with window 2000/2000: below 1000 is black, above 3000 white.
    with_window = grey(preprocess_xray(image(ramp(), window=(2000, 2000)), PRE))[0]
    without = grey(preprocess_xray(image(ramp()), PRE))[0]
    row_w, row_n = with_window[16], without[16]
    # without a window the ramp stays a ramp (1-99 percentile stretch)
    assert np.all(np.diff(row_n) > 0)
    assert row_n[16] == pytest.approx(0.5, abs=0.05)
    assert np.all(row_n[1:6] > 0.02) and np.all(row_n[-6:-1] < 0.98)
    # with it, the outer quarters saturate and the middle is mid-grey
    assert np.allclose(row_w[:6], 0.0, atol=1e-4)
    assert np.allclose(row_w[-6:], 1.0, atol=1e-4)
    assert row_w[16] == pytest.approx(0.5, abs=0.05)
    assert np.all(np.diff(row_w[8:24]) > 0)


def test_voi_window_sets_the_grey_scale_not_only_the_clip() -> None:
    # Window 2000/4000 displays 0..4000 as black..white. An image whose values all lie inside
    # the window must keep the window's grey levels, not be stretched to its own min..max:
    # a flat image at the window centre is mid-grey on a viewer.
    flat = grey(preprocess_xray(image(np.full((32, 32), 2000, np.uint16), window=(2000, 4000)),
                                PRE))[0]
    assert np.allclose(flat, 0.5, atol=0.01)
    narrow = np.broadcast_to(np.linspace(1000, 3000, 64), (64, 64)).round().astype(np.uint16)
    row = grey(preprocess_xray(image(narrow, window=(2000, 4000)), PRE))[0][16]
    assert row.min() == pytest.approx(0.25, abs=0.02)
    assert row.max() == pytest.approx(0.75, abs=0.02)


def test_xray_without_pixel_data_is_unsupported() -> None:
    ds = make_xray("chest", rows=32, cols=32)
    del ds.PixelData
    with pytest.raises(UnsupportedInput, match="no pixel data"):
        preprocess_xray(ds, PRE)


def test_tiny_or_colour_images_are_unsupported() -> None:
    with pytest.raises(UnsupportedInput, match="shape"):
        preprocess_xray(image(np.zeros((4, 64), dtype=np.uint16)), PRE)
    ds = image(np.zeros((16, 16), dtype=np.uint16))
    ds.SamplesPerPixel = 3
    with pytest.raises(UnsupportedInput):
        preprocess_xray(ds, PRE)


# -- CT preprocessing -------------------------------------------------------------------------


def test_ct_windows_values() -> None:
    hu = np.array([[-1000.0, 0.0, 40.0], [60.0, 80.0, 3000.0]], dtype=np.float32)
    out = ct_windows(hu, [(40, 80), (80, 200), (600, 2800)])
    assert out.shape == (3, 2, 3)
    assert out.dtype == np.float32
    assert out[0].tolist() == [[0.0, 0.0, 0.5], [0.75, 1.0, 1.0]]
    assert out[1, 0, 2] == pytest.approx((40 - (-20)) / 200)
    assert out[2, 1, 2] == pytest.approx(1.0)
    assert out[2, 0, 1] == pytest.approx((0 - (-800)) / 2800)


@pytest.mark.parametrize(("slope", "intercept"), [(None, None), (1, -1024), (0.5, 3.25),
                                                   (-2, 100)])
def test_float32_rescale_matches_pydicom(slope: float | None, intercept: float | None) -> None:
    import pydicom.pixels

    from dicomai.inference.processing import _modality

    pixels = np.random.default_rng(2).integers(0, 4096, (32, 32)).astype(np.uint16)
    ds = image(pixels, slope=slope, intercept=intercept)
    expected = pydicom.pixels.apply_modality_lut(pixels.astype(np.float64), ds)
    out = _modality(pixels, ds)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-3)
    ds.RescaleSlope = "1e36"  # overflows float32: left to the float64 path, which refuses
    if slope is not None:
        with pytest.raises(UnsupportedInput):
            _modality(pixels, ds)


@pytest.mark.parametrize("shape", [(64, 64), (3, 512, 512), (2, 8, 8)])
def test_resize_by_half_matches_torch_antialias(shape: tuple[int, ...]) -> None:
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(1).random(shape, dtype=np.float32) * 3000
    t = torch.from_numpy(x)
    t = t[None] if t.ndim == 2 else t
    half = shape[-1] // 2
    ref = F.interpolate(t[None], size=(half, half), mode="bilinear", antialias=True,
                        align_corners=False)[0].numpy()
    out = resize(x, half)
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-3)


def test_preprocess_ct_slice_shape_and_windows() -> None:
    (ds,) = make_head_ct(1, rows=32, cols=32)
    out = preprocess_ct_slice(ds, PreprocessingSettings(input_size=64))
    assert out.shape == (3, 64, 64)
    assert out.dtype == np.float32
    uniform = grey(preprocess_ct_slice(ct_slice(40, "1.1", 0, 1), PRE))
    assert np.allclose(uniform[0], 0.5, atol=1e-5)  # brain window (40, 80)
    assert np.allclose(uniform[1], 0.3, atol=1e-5)  # subdural (80, 200)
    assert np.allclose(uniform[2], (40 + 800) / 2800, atol=1e-5)  # bone (600, 2800)


def test_order_slices_by_position_not_instance_number() -> None:
    slices = make_head_ct(8, rows=16, cols=16)
    numbers = list(range(1, 9))
    random.Random(3).shuffle(numbers)
    for ds, n in zip(slices, numbers, strict=True):
        ds.InstanceNumber = n
    shuffled = slices[:]
    random.Random(5).shuffle(shuffled)
    ordered = order_slices(shuffled)
    assert [d.SOPInstanceUID for d in ordered] == [d.SOPInstanceUID for d in slices]
    z = [float(d.ImagePositionPatient[2]) for d in ordered]
    assert z == sorted(z)


def test_order_slices_along_a_sagittal_normal() -> None:
    # sagittal: rows along y, columns along -z; the normal row x column is -x
    iop = (0, 1, 0, 0, 0, -1)
    slices = [
        image(np.zeros((8, 8), np.uint16), uid=f"1.{i}", position=(x, 0, 0), orientation=iop,
              instance_number=i)
        for i, x in enumerate([30.0, -10.0, 10.0, 0.0], start=1)
    ]
    assert [d.SOPInstanceUID for d in order_slices(slices)] == ["1.1", "1.3", "1.4", "1.2"]


def test_order_slices_falls_back_to_instance_number() -> None:
    slices = [image(np.zeros((8, 8), np.uint16), uid=f"1.{n}", instance_number=n)
              for n in (3, 1, 2)]
    assert [d.InstanceNumber for d in order_slices(slices)] == [1, 2, 3]


# -- analyse ----------------------------------------------------------------------------------


class MeanBrightness:
    """A tiny deterministic stand-in for a model: the score is the mean grey of channel 0.

    Labels: ``bright`` = mean grey, ``dark`` = 1 - mean grey. The class activation map is the
    channel-0 grey image itself, per label.
    """

    def __init__(self, task: Task, *, cams: bool = True) -> None:
        self._identity = ModelIdentity(
            name="mean", version="1", sha256="0" * 64, task=task, architecture="mean",
            description="test double",
        )
        self._cams = cams
        self.batches: list[int] = []

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def labels(self) -> tuple[str, ...]:
        return ("bright", "dark")

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        assert batch.ndim == 4 and batch.shape[1] == 3
        self.batches.append(batch.shape[0])
        g = batch[:, 0] * STD[0] + MEAN[0]
        score = g.mean(axis=(1, 2))
        probs = np.stack([score, 1.0 - score], axis=1).astype(np.float32)
        cams = np.stack([g, 1.0 - g], axis=1) if self._cams else None
        return probs, cams


def model_settings(task: str, **kwargs: object) -> ModelSettings:
    values: dict[str, object] = {
        "path": Path("m.pt"), "version": "1", "task": task, "threshold": 0.5,
        "preprocessing": PRE,
    }
    values.update(kwargs)
    return ModelSettings.model_validate(values)


def test_analyse_ct_takes_max_over_slices() -> None:
    hus = [20, 60, 40, 0, 50, 30, 10]  # brain window: 0.25, 0.75, 0.5, 0, 0.625, 0.375, 0.125
    slices = [ct_slice(hu, f"1.{i}", z=5.0 * i, instance_number=i + 1)
              for i, hu in enumerate(hus)]
    random.Random(1).shuffle(slices)
    predictor = MeanBrightness(Task.HEAD_CT_ICH)
    settings = model_settings("head_ct_ich", thresholds={"bright": 0.7, "dark": 0.9})
    f = analyse(Task.HEAD_CT_ICH, slices, predictor, settings, STARTED)

    assert predictor.batches == [4, 3]  # batch_size 4
    assert f.labels == ("bright", "dark")
    assert f.study_scores["bright"] == pytest.approx(0.75, abs=1e-5)
    assert f.study_scores["dark"] == pytest.approx(1.0, abs=1e-5)
    assert set(f.image_scores) == {f"1.{i}" for i in range(7)}
    assert f.image_scores["1.2"]["bright"] == pytest.approx(0.5, abs=1e-5)
    assert f.thresholds == {"bright": 0.7, "dark": 0.9}
    assert f.positive_labels == ("dark", "bright")
    # top label: highest score relative to its threshold (1.0/0.9 > 0.75/0.7)
    assert f.top_label == "dark"
    # five key slices, most suspicious for the top label first
    assert f.key_image_uids == ("1.3", "1.6", "1.0", "1.5", "1.2")
    assert set(f.heatmaps) == set(f.key_image_uids)
    assert np.allclose(f.heatmaps["1.3"], 1.0, atol=1e-5)  # dark map of a 0 HU slice
    assert f.started == STARTED
    assert f.model.name == "mean"


def test_analyse_ct_thresholds_and_top3_mean() -> None:
    hus = [20, 60, 40, 0, 50]
    slices = [ct_slice(hu, f"1.{i}", z=float(i), instance_number=i + 1)
              for i, hu in enumerate(hus)]
    pre = PRE.model_copy(update={"ct_aggregation": "top3_mean"})
    settings = model_settings("head_ct_ich", preprocessing=pre, threshold=0.7)
    f = analyse(Task.HEAD_CT_ICH, slices, MeanBrightness(Task.HEAD_CT_ICH), settings, STARTED)
    assert f.study_scores["bright"] == pytest.approx((0.75 + 0.625 + 0.5) / 3, abs=1e-5)
    assert f.study_scores["dark"] == pytest.approx((1.0 + 0.75 + 0.5) / 3, abs=1e-5)
    assert f.positive_labels == ("dark",)
    assert not f.is_present("bright")


def test_analyse_ct_skips_slices_without_pixels() -> None:
    slices = [ct_slice(60, "1.1", 0, 1), ct_slice(20, "1.2", 5, 2)]
    del slices[0].PixelData
    settings = model_settings("head_ct_ich")
    f = analyse(Task.HEAD_CT_ICH, slices, MeanBrightness(Task.HEAD_CT_ICH), settings, STARTED)
    assert list(f.image_scores) == ["1.2"]
    assert f.study_scores["bright"] == pytest.approx(0.25, abs=1e-5)
    del slices[1].PixelData
    with pytest.raises(UnsupportedInput):
        analyse(Task.HEAD_CT_ICH, slices, MeanBrightness(Task.HEAD_CT_ICH), settings, STARTED)


def test_analyse_xray_single_key_image_and_max_score() -> None:
    # window 400/800 maps 0..800 to 0..1: 200 is grey 0.25, 600 is 0.75. One black and one
    # white pixel put the window's whole output range in each image.
    dim = image(np.zeros((32, 32), np.uint16), uid="1.1", window=(400, 800))
    bright = image(np.zeros((32, 32), np.uint16), uid="1.2", window=(400, 800))
    for ds, value in ((dim, 200), (bright, 600)):
        arr = np.full((32, 32), value, np.uint16)
        arr[0, 0], arr[0, 1] = 0, 800
        ds.PixelData = arr.tobytes()
    settings = model_settings("chest_xray", labels=["bright", "dark"],
                              thresholds={"bright": 0.6})
    predictor = MeanBrightness(Task.CHEST_XRAY, cams=False)
    f = analyse(Task.CHEST_XRAY, [dim, bright], predictor, settings, STARTED)
    assert f.study_scores["bright"] == pytest.approx(0.75, abs=0.02)
    assert f.study_scores["dark"] == pytest.approx(0.75, abs=0.02)
    assert f.image_scores["1.1"]["bright"] == pytest.approx(0.25, abs=0.02)
    assert f.thresholds == {"bright": 0.6, "dark": 0.5}
    assert f.top_label == "dark"  # 0.75/0.5 beats 0.75/0.6
    assert f.key_image_uids == ("1.1",)
    assert f.heatmaps == {}
    assert set(f.positive_labels) == {"bright", "dark"}


def test_analyse_xray_without_pixel_data_is_unsupported() -> None:
    ds = make_xray("chest", rows=32, cols=32)
    del ds.PixelData
    settings = model_settings("chest_xray")
    with pytest.raises(UnsupportedInput, match="no pixel data"):
        analyse(Task.CHEST_XRAY, [ds], MeanBrightness(Task.CHEST_XRAY), settings, STARTED)
    with pytest.raises(UnsupportedInput):
        analyse(Task.CHEST_XRAY, [], MeanBrightness(Task.CHEST_XRAY), settings, STARTED)


def test_analyse_label_count_mismatch() -> None:
    settings = model_settings("chest_xray", labels=["a", "b", "c"])
    with pytest.raises(UnsupportedInput, match="labels"):
        analyse(Task.CHEST_XRAY, [make_xray("chest", rows=32, cols=32)],
                MeanBrightness(Task.CHEST_XRAY), settings, STARTED)


def test_analyse_real_head_ct_phantom_with_bleed() -> None:
    slices = make_head_ct(12, rows=32, cols=32, bleed=True)
    settings = model_settings("head_ct_ich")
    f = analyse(Task.HEAD_CT_ICH, slices[::-1], MeanBrightness(Task.HEAD_CT_ICH), settings,
                STARTED)
    assert len(f.image_scores) == 12
    assert len(f.key_image_uids) == 5
    top = f.top_label
    assert top is not None
    scores = [f.image_scores[uid][top] for uid in f.key_image_uids]
    assert scores == sorted(scores, reverse=True)
    assert max(s[top] for s in f.image_scores.values()) == pytest.approx(f.study_scores[top])
