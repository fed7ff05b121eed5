"""Tests of dicomai.results.heatmap and dicomai.results.regions: from a coarse class activation
map to a smooth map, the body, the high-activation region and its box on the source grid."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomai.inference.findings import Findings, ModelIdentity, Task
from dicomai.results.heatmap import (
    DEFAULT_CUTOFF,
    activation_on_grid,
    body_mask,
    colour_ramp,
    hot_region,
)
from dicomai.results.regions import MAX_REGIONS, image_hits, locate

_ROOT = "1.2.826.0.1.3680043.8.498.999."
STARTED = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


# --------------------------------------------------------------------------- helpers


def _gaussian(shape: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    """A peak of 1 at ``centre`` (row, column, in pixels) on a ``shape`` grid."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))


def _disc_image(size: int = 256, *, hole: bool = True, marker: bool = False) -> np.ndarray:
    """A bright disc (the body) on a dark, noisy background, with a dark hole inside it."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    grey = np.full((size, size), 10.0)
    grey[r < 0.3 * size] = 180.0
    if hole:
        grey[r < 0.08 * size] = 10.0  # as dark as the air outside: a lung, a ventricle
    if marker:  # a small bright label in a corner, 1-2 % of the body's area
        grey[size // 20 : size // 20 + size // 16, size // 20 : size // 20 + size // 16] = 220.0
    grey += rng.normal(0.0, 2.0, grey.shape)
    return np.clip(grey, 0, 255).astype(np.uint8)


def _source(pixels: np.ndarray, name: str) -> Dataset:
    """A minimal single-frame MONOCHROME2 16-bit image (no window: shown 1st-99th percentile)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(prefix=_ROOT, entropy_srcs=[name])
    ds.StudyInstanceUID = generate_uid(prefix=_ROOT, entropy_srcs=["heatmap-study"])
    ds.SeriesInstanceUID = generate_uid(prefix=_ROOT, entropy_srcs=["heatmap-series"])
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def _body_source(rows: int, columns: int, name: str) -> Dataset:
    """An upright bright ellipse (the body) filling most of a dark frame."""
    yy, xx = np.mgrid[:rows, :columns]
    inside = ((yy - rows / 2) / (0.45 * rows)) ** 2 + ((xx - columns / 2) / (0.42 * columns)) ** 2
    pixels = np.where(inside < 1.0, 3000, 100)
    return _source(pixels, name)


def _findings(
    sources: list[Dataset],
    cams: dict[str, dict[str, np.ndarray]],
    image_scores: dict[str, dict[str, float]],
    study_scores: dict[str, float],
    task: Task = Task.CHEST_XRAY,
) -> Findings:
    labels = tuple(study_scores)
    model = ModelIdentity("m", "1", "0" * 64, task, "densenet121", "test model")
    return Findings(
        model=model,
        labels=labels,
        thresholds=dict.fromkeys(labels, 0.5),
        study_scores=study_scores,
        image_scores=image_scores,
        key_image_uids=(),
        started=STARTED,
        label_heatmaps=cams,
    )


def _oklab_lightness(rgb: np.ndarray) -> np.ndarray:
    """OKLab L of uint8 sRGB colours (Ottosson 2020), computed independently of the module."""
    c = rgb.astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lms = lin @ np.array(
        [
            [0.4122214708, 0.2119034982, 0.0883024619],
            [0.5363325363, 0.6806995451, 0.2817188376],
            [0.0514459929, 0.1073969566, 0.6299787005],
        ]
    )
    l_, m_, s_ = np.cbrt(lms).T
    return 0.2104542553 * l_ + 0.7936177850 * m_ - 0.0040720468 * s_


def _second_difference(a: np.ndarray) -> float:
    return float(max(np.abs(np.diff(a, 2, axis=0)).max(), np.abs(np.diff(a, 2, axis=1)).max()))


def _first_difference(a: np.ndarray) -> float:
    return float(max(np.abs(np.diff(a, 1, axis=0)).max(), np.abs(np.diff(a, 1, axis=1)).max()))


# --------------------------------------------------------------------------- activation_on_grid


@pytest.mark.parametrize("size", [(224, 300), (512, 512), (1000, 800)])
def test_activation_on_grid_shape_peak_and_smoothness(size: tuple[int, int]) -> None:
    cam = np.random.default_rng(3).random((7, 7)).astype(np.float32)
    grid = activation_on_grid(cam, size)
    assert grid.shape == size and grid.dtype == np.float32
    assert grid.max() == pytest.approx(1.0, abs=1e-3)  # rescaled: the peak is 1 again
    assert grid.min() == pytest.approx(0.0, abs=1e-3)
    # No blocks: a nearest-neighbour stretch of a 7 x 7 map has 49 values and steps of ~0.9.
    assert len(np.unique(grid)) > 0.1 * size[0] * size[1]
    assert _first_difference(grid) < 0.03
    # No creases either: a bilinear stretch has slope breaks at every cell centre (second
    # differences of 0.01-0.03 at these sizes); the blurred bicubic map stays below 0.005.
    bilinear = np.asarray(
        Image.fromarray(cam, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    )
    bilinear = (bilinear - bilinear.min()) / (bilinear.max() - bilinear.min())
    assert _second_difference(bilinear) > 0.008  # the measure does see creases
    assert _second_difference(grid) < 0.005


def test_activation_on_grid_keeps_the_peak_where_the_cam_has_it() -> None:
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[1, 5] = 1.0  # row 1 of 7, column 5 of 7
    grid = activation_on_grid(cam, (700, 350))
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    assert abs(row - 1.5 * 100) <= 15 and abs(col - 5.5 * 50) <= 10


def test_activation_on_grid_edge_cases() -> None:
    assert not activation_on_grid(np.ones((7, 7)), (10, 12)).any()  # flat: nothing stands out
    assert activation_on_grid(np.full((1, 7, 7, 1), 0.5), (4, 4)).shape == (4, 4)  # squeezed
    nan = np.full((7, 7), np.nan)
    nan[3, 3] = 1.0
    grid = activation_on_grid(nan, (64, 64))
    assert np.isfinite(grid).all() and grid.max() == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="cam"):
        activation_on_grid(np.ones((2, 3, 4)), (8, 8))
    with pytest.raises(ValueError, match="size"):
        activation_on_grid(np.ones((7, 7)), (0, 8))


# --------------------------------------------------------------------------- body_mask


@pytest.mark.parametrize("size", [256, 600])  # on its own grid, and found on a reduced copy
def test_body_mask_excludes_background_and_fills_holes(size: int) -> None:
    grey = _disc_image(size, marker=True)
    mask = body_mask(grey)
    assert mask.shape == grey.shape and mask.dtype == bool
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    assert mask[size // 2, size // 2], "the dark hole inside the body is filled"
    assert mask[r < 0.27 * size].all(), "the whole disc, hole included"
    assert not mask[r > 0.33 * size].any(), "no air outside the body, no corner marker"
    disc = np.pi * (0.3 * size) ** 2
    assert abs(mask.sum() - disc) < 0.05 * disc
    # An RGB image gives the same mask as its grey channel.
    assert np.array_equal(body_mask(np.repeat(grey[..., None], 3, axis=2)), mask)


def test_body_mask_flat_and_invalid() -> None:
    assert body_mask(np.full((40, 50), 90, dtype=np.uint8)).all()
    with pytest.raises(ValueError, match="grey"):
        body_mask(np.zeros((2, 3, 4, 5), dtype=np.uint8))


# --------------------------------------------------------------------------- hot_region


def test_hot_region_inside_the_body() -> None:
    body = body_mask(_disc_image(256, hole=False))
    activation = _gaussian((256, 256), (110.0, 150.0), 20.0).astype(np.float32)
    region = hot_region(activation, body)
    assert region is not None
    expected = (activation >= DEFAULT_CUTOFF) & body
    assert np.array_equal(region.mask, expected)
    c0, r0, c1, r1 = region.box
    rows, cols = np.nonzero(expected)
    assert (c0, r0, c1, r1) == (cols.min(), rows.min(), cols.max(), rows.max())
    assert region.peak == (150, 110)
    assert c0 <= region.peak[0] <= c1 and r0 <= region.peak[1] <= r1


def test_hot_region_none_when_the_high_part_is_outside_the_body() -> None:
    body = body_mask(_disc_image(256, hole=False))  # a disc of radius 77 around (128, 128)
    corner = _gaussian((256, 256), (10.0, 10.0), 25.0).astype(np.float32)
    assert (corner >= DEFAULT_CUTOFF).sum() > 500  # high, but only in the air
    assert hot_region(corner, body) is None
    assert hot_region(corner, None) is not None  # without a body, the air would be shown
    # Where the map is high both outside and inside, only the inside part is kept.
    both = np.maximum(corner, 0.7 * _gaussian((256, 256), (128.0, 128.0), 15.0))
    region = hot_region(both.astype(np.float32), body)
    assert region is not None and not (region.mask & ~body).any()
    assert region.box[0] > 80 and region.box[1] > 80


def test_hot_region_box_is_the_largest_part_and_arguments_checked() -> None:
    activation = np.maximum(
        _gaussian((200, 200), (50.0, 50.0), 10.0), _gaussian((200, 200), (140.0, 140.0), 25.0)
    ).astype(np.float32)
    region = hot_region(activation, None)
    assert region is not None
    assert region.mask[50, 50] and region.mask[140, 140]  # both parts are in the mask
    c0, r0, c1, r1 = region.box
    assert c0 > 100 and r0 > 100 and c1 < 200 and r1 < 200  # the box frames the larger one
    with pytest.raises(ValueError, match="cutoff"):
        hot_region(activation, None, cutoff=0.0)
    with pytest.raises(ValueError, match="body"):
        hot_region(activation, np.ones((10, 10), dtype=bool))


# --------------------------------------------------------------------------- colour_ramp


def test_colour_ramp_is_perceptually_ordered() -> None:
    ramp = colour_ramp()
    assert ramp.shape == (256, 3) and ramp.dtype == np.uint8
    lightness = _oklab_lightness(ramp)
    assert np.diff(lightness).min() >= -1e-3, "lightness never falls (within rounding)"
    assert (np.diff(lightness[::8]) > 0).all(), "and rises steadily"
    assert lightness[0] == pytest.approx(0.50, abs=0.02)
    assert lightness[-1] == pytest.approx(0.95, abs=0.02)
    steps = np.diff(lightness[::16])  # about equal steps: perceptually uniform
    assert steps.max() < 1.5 * steps.min()
    red, yellow = ramp[0].astype(int), ramp[-1].astype(int)
    assert red[0] > 150 and red[0] > 3 * max(red[1], red[2]), "starts deep red"
    assert min(yellow[0], yellow[1]) > 220 and yellow[2] < yellow[1] - 50, "ends pale yellow"
    assert colour_ramp(2).shape == (2, 3)


# --------------------------------------------------------------------------- regions


def test_image_hits_any_hidden_by_a_specific_label_on_its_image() -> None:
    a, b = "1.2.3.1", "1.2.3.2"
    scores = {
        a: {"any": 0.9, "subdural": 0.7, "epidural": 0.1},
        b: {"any": 0.8, "subdural": 0.2, "epidural": 0.1},
    }
    study = {"any": 0.9, "subdural": 0.7, "epidural": 0.1}
    findings = _findings([], {}, scores, study, Task.HEAD_CT_ICH)
    assert image_hits(findings) == [(0.8, b, "any"), (0.7, a, "subdural")]


def test_locate_box_in_source_coordinates_around_the_peak() -> None:
    rows, columns = 900, 700  # larger than the 512-pixel region grid: boxes are scaled back
    src = _body_source(rows, columns, "locate")
    uid = str(src.SOPInstanceUID)
    cam = _gaussian((16, 16), (5.0, 10.0), 1.5)  # peak at 34 % of the height, 66 % of the width
    findings = _findings(
        [src],
        {"mass": {uid: cam}},
        {uid: {"mass": 0.8, "nodule": 0.9}},
        {"mass": 0.8, "nodule": 0.9},
    )
    regions = locate([src], findings)
    assert list(regions) == [(uid, "mass")]  # no CAM for "nodule": no region
    region = regions[(uid, "mass")]
    assert (region.label, region.sop_uid, region.score) == ("mass", uid, 0.8)
    c0, r0, c1, r1 = region.box
    assert 0 <= c0 < c1 <= columns and 0 <= r0 < r1 <= rows
    peak_row, peak_col = (5.5 / 16) * rows, (10.5 / 16) * columns
    assert c0 < peak_col < c1 and r0 < peak_row < r1
    assert (c1 - c0) < 0.5 * columns and (r1 - r0) < 0.5 * rows  # a part, not the image
    mask = region.on_source_grid(rows, columns)
    assert mask.shape == (rows, columns) and mask.dtype == bool
    assert mask[round(peak_row), round(peak_col)]
    ys, xs = np.nonzero(mask)  # one part here: the box frames the whole mask
    assert abs(xs.min() - c0) <= 3 and abs(xs.max() + 1 - c1) <= 3
    assert abs(ys.min() - r0) <= 3 and abs(ys.max() + 1 - r1) <= 3
    # The region grid keeps the source's aspect ratio, longest side 512.
    assert region.mask.shape == (512, round(512 * columns / rows))


def test_locate_skips_maps_outside_the_body_and_images_without_pixels() -> None:
    rows, columns = 300, 300
    src = _body_source(rows, columns, "air")
    uid = str(src.SOPInstanceUID)
    head = copy.deepcopy(src)
    del head.PixelData
    head.SOPInstanceUID = generate_uid(prefix=_ROOT, entropy_srcs=["no-pixels"])
    air = _gaussian((16, 16), (0.0, 0.0), 1.0)  # the top left corner, outside the ellipse
    centre = _gaussian((16, 16), (7.5, 7.5), 2.0)
    findings = _findings(
        [src, head],
        {"mass": {uid: air, str(head.SOPInstanceUID): centre}, "nodule": {uid: centre}},
        {uid: {"mass": 0.9, "nodule": 0.6}, str(head.SOPInstanceUID): {"mass": 0.9, "nodule": 0.1}},
        {"mass": 0.9, "nodule": 0.6},
    )
    regions = locate([src, head], findings)
    assert list(regions) == [(uid, "nodule")]
    assert MAX_REGIONS >= 100


def test_locate_any_where_the_specific_label_is_absent_from_the_study() -> None:
    # With top-3-mean aggregation a subtype can reach its threshold on one slice and still be
    # absent from the study, so inference gives it no CAM. "any" (present, with a CAM on that
    # slice) must then still be located there, not hidden by a subtype that has no region.
    src = _body_source(256, 256, "any-only")
    uid = str(src.SOPInstanceUID)
    centre = _gaussian((16, 16), (7.5, 7.5), 2.0)
    findings = _findings(
        [src],
        {"any": {uid: centre}},  # as inference builds it: CAMs of study-present labels only
        {uid: {"any": 0.9, "subdural": 0.6}},
        {"any": 0.9, "subdural": 0.3},
        Task.HEAD_CT_ICH,
    )
    assert list(locate([src], findings)) == [(uid, "any")]
