"""From a model's coarse class activation map (CAM) to what a radiologist is shown: a smooth
map on the image grid, only where activation is high and only inside the body, in a
perceptually uniform colour ramp; and the region's outline and bounding box.

Pure numpy/scipy/Pillow; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "DEFAULT_CUTOFF",
    "Region",
    "activation_on_grid",
    "body_mask",
    "colour_ramp",
    "hot_region",
]

#: Fraction of the map's peak at or above which activation is shown (CAMs are min-max
#: normalised per image, so every map has a peak at 1.0).
DEFAULT_CUTOFF = 0.6
#: Components of the body mask smaller than this fraction of the largest one are dropped
#: (labels, markers, noise in the air).
_MIN_BODY_PART = 0.05
#: Longest side of the grid on which maps are smoothed and bodies found (then resized).
_WORK_SIDE = 256


@dataclass(frozen=True, slots=True)
class Region:
    """The high-activation region of one image.

    Attributes
    ----------
    mask
        ``(rows, columns)`` bool: activation at or above the cutoff, inside the body.
    box
        ``(col0, row0, col1, row1)`` inclusive pixel indices of the largest connected part.
    peak
        ``(column, row)`` of the highest activation inside the mask.
    """

    mask: np.ndarray
    box: tuple[int, int, int, int]
    peak: tuple[int, int]


def activation_on_grid(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A coarse map (any size, values in [0, 1]) resampled smoothly to ``(rows, columns)``.

    Bicubic interpolation and a Gaussian blur of about half a CAM cell on a working grid of at
    most :data:`_WORK_SIDE` pixels (so that a 7 x 7 map gives round contours, not the blocks of
    a bilinear stretch), rescaled so that its peak is 1 again, then resized bilinearly to
    ``size``.
    """
    cam = np.nan_to_num(np.clip(np.squeeze(np.asarray(cam, dtype=np.float32)), 0.0, 1.0))
    if cam.ndim != 2 or min(cam.shape) < 1:
        raise ValueError('Argument "cam" must be a 2D array.')
    rows, columns = size
    if rows < 1 or columns < 1:
        raise ValueError('Argument "size" must be positive.')
    scale = min(1.0, _WORK_SIDE / max(rows, columns))
    work = (max(1, round(rows * scale)), max(1, round(columns * scale)))
    image = Image.fromarray(cam, mode="F").resize((work[1], work[0]), Image.Resampling.BICUBIC)
    grid = np.asarray(image, dtype=np.float32)
    sigma = 0.5 * max(work[0] / cam.shape[0], work[1] / cam.shape[1])
    grid = ndimage.gaussian_filter(grid, sigma=sigma, mode="nearest")
    low, high = float(grid.min()), float(grid.max())
    if high - low < 1e-6:
        return np.zeros((rows, columns), dtype=np.float32)
    grid = np.clip((grid - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if work != (rows, columns):
        image = Image.fromarray(grid, mode="F").resize((columns, rows), Image.Resampling.BILINEAR)
        grid = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    return grid


def body_mask(grey: np.ndarray) -> np.ndarray:
    """Where the patient is on a displayed greyscale image (uint8, air dark).

    Air outside the body is the darkest part of a displayed radiograph or CT slice (direct
    exposure; below the window). Pixels brighter than a low threshold, closed, with holes
    filled (lungs, ventricles, fat inside the body are enclosed), keeping the large parts.
    """
    grey = np.asarray(grey)
    if grey.ndim == 3:
        grey = grey[..., 0]
    if grey.ndim != 2:
        raise ValueError('Argument "grey" must be a 2D image.')
    rows, columns = grey.shape
    scale = min(1.0, _WORK_SIDE / max(rows, columns))
    if scale < 1.0:  # found on a smaller copy, then resized: the same within a pixel or two
        small = Image.fromarray(grey.astype(np.uint8)).resize(
            (max(1, round(columns * scale)), max(1, round(rows * scale))), Image.Resampling.BOX
        )
        mask = Image.fromarray(body_mask(np.asarray(small))).resize(
            (columns, rows), Image.Resampling.NEAREST
        )
        return np.asarray(mask, dtype=bool)
    values = grey.astype(np.float32)
    low, high = np.percentile(values, [0.5, 99.5])
    if high - low < 1.0:
        return np.ones(grey.shape, dtype=bool)  # a flat image: nothing to tell apart
    mask = values > low + 0.08 * (high - low)
    radius = max(1, round(min(grey.shape) / 100))
    structure = ndimage.generate_binary_structure(2, 1)
    mask = ndimage.binary_closing(mask, structure=structure, iterations=radius)
    mask = ndimage.binary_fill_holes(mask)
    mask = ndimage.binary_opening(mask, structure=structure, iterations=radius)
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(grey.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= _MIN_BODY_PART * sizes.max()) + 1
    return np.isin(labels, keep)


def hot_region(
    activation: np.ndarray, body: np.ndarray | None, cutoff: float = DEFAULT_CUTOFF
) -> Region | None:
    """The part of ``activation`` at or above ``cutoff`` inside ``body``; None if empty."""
    if not 0.0 < cutoff <= 1.0:
        raise ValueError('Argument "cutoff" must be in (0, 1].')
    mask = activation >= cutoff
    if body is not None:
        if body.shape != activation.shape:
            raise ValueError('Arguments "activation" and "body" must have the same shape.')
        mask &= body
    if not mask.any():
        return None
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == int(np.argmax(sizes)) + 1
    rows = np.flatnonzero(largest.any(axis=1))
    cols = np.flatnonzero(largest.any(axis=0))
    masked = np.where(mask, activation, -1.0)
    peak_row, peak_col = np.unravel_index(int(np.argmax(masked)), masked.shape)
    return Region(
        mask=mask,
        box=(int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])),
        peak=(int(peak_col), int(peak_row)),
    )


def _oklab_to_linear_srgb(lab: np.ndarray) -> np.ndarray:
    """OKLab (Ottosson 2020) to linear sRGB, not clipped (values outside [0, 1] are out of
    gamut)."""
    lightness, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    l_ = (lightness + 0.3963377774 * a + 0.2158037573 * b) ** 3
    m_ = (lightness - 0.1055613458 * a - 0.0638541728 * b) ** 3
    s_ = (lightness - 0.0894841775 * a - 1.2914855480 * b) ** 3
    return np.stack(
        [
            4.0767416621 * l_ - 3.3077115913 * m_ + 0.2309699292 * s_,
            -1.2684380046 * l_ + 2.6097574011 * m_ - 0.3413193965 * s_,
            -0.0041960863 * l_ - 0.7034186147 * m_ + 1.7076147010 * s_,
        ],
        axis=-1,
    )


def colour_ramp(steps: int = 256) -> np.ndarray:
    """``(steps, 3)`` uint8 ramp from deep red through orange to pale yellow.

    Lightness rises linearly in OKLab (a perceptually uniform space) and hue turns
    monotonically, so equal steps in activation look like equal steps in colour, and the
    ramp stays readable in greyscale. Chroma is reduced where a colour would leave sRGB.
    """
    t = np.linspace(0.0, 1.0, steps)
    lightness = 0.50 + 0.45 * t
    hue = np.deg2rad(25.0 + 85.0 * t)
    chroma = 0.20 - 0.08 * t
    # Largest chroma (in 2% steps of the wanted one) that keeps each colour inside sRGB.
    linear = np.zeros((steps, 3))
    done = np.zeros(steps, dtype=bool)
    for scale in np.linspace(1.0, 0.0, 51):
        c = chroma * scale
        lab = np.stack([lightness, c * np.cos(hue), c * np.sin(hue)], axis=-1)
        rgb = _oklab_to_linear_srgb(lab)
        fits = ~done & (rgb >= -1e-6).all(axis=1) & (rgb <= 1 + 1e-6).all(axis=1)
        linear[fits] = rgb[fits]
        done |= fits
    linear = np.clip(linear, 0.0, 1.0)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.round(255 * encoded).astype(np.uint8)
