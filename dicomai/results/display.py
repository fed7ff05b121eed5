"""Render a source image for display and burn a heat map and a caption into it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom.pixels
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from dicomai.decode import decode_reduced
from dicomai.errors import UnsupportedInput

__all__ = ["MAX_SIDE", "MIN_SIDE", "display_rgb", "fit_size", "overlay", "resize_rgb"]

#: Longest side of a Secondary Capture at most (a 2k x 2k RGB SC would be 12 MB).
MAX_SIDE = 1024
#: Longest side at least: tiny sources are enlarged so that the caption stays legible.
MIN_SIDE = 512

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GREY = ("MONOCHROME1", "MONOCHROME2")
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_VIEW_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "BitsAllocated",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)


def display_rgb(src: Dataset, *, frame: int = 0, max_side: int | None = None) -> np.ndarray:
    """One frame as the viewer would show it: modality LUT, first VOI window, MONOCHROME1
    inverted, as uint8 RGB.

    Parameters
    ----------
    src
        Source instance with pixel data; compressed transfer syntaxes decode through the
        installed pylibjpeg plugins.
    frame
        0-based frame of a multi-frame instance.
    max_side
        The image will be shown with its longest side at most this long: a greyscale JPEG 2000
        or JPEG baseline frame is then decoded at the smallest resolution level whose longest
        side is still at least ``max_side`` (a 2500×2000 radiograph: 1250×1000, about 4×
        faster than a full decode).

    Returns
    -------
    numpy.ndarray
        ``(rows, columns, 3)`` uint8; smaller than the source when decoded at reduced
        resolution.

    Raises
    ------
    UnsupportedInput
        No pixel data, a photometric interpretation we do not render, or undecodable data.
    """
    if not any(keyword in src for keyword in _PIXEL_KEYWORDS):
        raise UnsupportedInput("Key image has no pixel data.")
    photometric = str(src.get("PhotometricInterpretation", ""))
    frames = int(src.get("NumberOfFrames") or 1)
    if not 0 <= frame < frames:
        raise ValueError('Argument "frame" is out of range.')
    arr = _reduced(src, frame, max_side) if max_side and photometric in _GREY else None
    try:
        if arr is None:
            arr = pydicom.pixels.pixel_array(src, index=frame if frames > 1 else None)
    except Exception as exc:  # the decoders raise many types; none of them is retryable
        raise UnsupportedInput("Key image pixel data cannot be decoded.") from exc
    if photometric in _GREY:
        if arr.ndim != 2:
            raise UnsupportedInput("Key image is not a 2D greyscale frame.")
        grey = _grey(arr, _frame_view(src, frame), invert=photometric == "MONOCHROME1")
        return np.repeat(grey[..., None], 3, axis=2)
    if photometric == "PALETTE COLOR":
        arr = pydicom.pixels.apply_color_lut(arr, src)
    elif int(src.get("SamplesPerPixel", 1)) != 3:
        raise UnsupportedInput("Key image photometric interpretation is not supported.")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise UnsupportedInput("Key image is not a 2D colour frame.")
    top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else float(arr.max() or 1.0)
    return np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).astype(np.uint8)


def _reduced(src: Dataset, frame: int, max_side: int) -> np.ndarray | None:
    """Stored values decoded at reduced resolution with the longest side ≥ ``max_side``."""
    try:
        rows, columns = int(src.Rows), int(src.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    if max(rows, columns) <= max_side:
        return None
    min_side = math.ceil(max_side * min(rows, columns) / max(rows, columns))
    reduced = decode_reduced(src, min_side, frame=frame)
    return None if reduced is None else reduced.pixels


def fit_size(rows: int, columns: int) -> tuple[int, int]:
    """``(rows, columns)`` scaled so the longest side is within [MIN_SIDE, MAX_SIDE]."""
    if rows < 1 or columns < 1:
        raise ValueError('Arguments "rows" and "columns" must be positive.')
    longest = max(rows, columns)
    target = min(max(longest, MIN_SIDE), MAX_SIDE)
    if target == longest:
        return rows, columns
    scale = target / longest
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 RGB array to ``(rows, columns)``: area averaging down, bilinear up."""
    rows, columns = size
    if rgb.shape[:2] == (rows, columns):
        return rgb
    shrink = rows < rgb.shape[0]
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize((columns, rows), method))


def overlay(
    rgb: np.ndarray,
    heat: np.ndarray | None = None,
    boxes: Sequence[tuple[int, int, int, int]] = (),
    caption: str = "",
) -> np.ndarray:
    """Burn a heat map, boxes and a caption into a uint8 RGB image.

    Parameters
    ----------
    rgb
        ``(rows, columns, 3)`` uint8.
    heat
        2D map in [0, 1] at any size (stretched to the image); values under 0.3 stay clear.
    boxes
        ``(col0, row0, col1, row1)`` in the image's pixels, drawn in yellow.
    caption
        Text drawn white on black at the top left, wrapped to the image width.

    Returns
    -------
    numpy.ndarray
        A new ``(rows, columns, 3)`` uint8 array.
    """
    rows, columns, _ = rgb.shape
    out = rgb.astype(np.float64)
    if heat is not None:
        heat = np.squeeze(np.asarray(heat, dtype=np.float64))
        if heat.ndim != 2:
            raise ValueError('Argument "heat" must be a 2D array.')
        heat = np.nan_to_num(np.clip(heat, 0.0, 1.0))
        h = (
            np.asarray(
                Image.fromarray(np.uint8(np.round(255 * heat))).resize(
                    (columns, rows), Image.Resampling.BILINEAR
                )
            )
            / 255.0
        )
        colour = np.stack([np.clip(1.5 - abs(4 * h - c), 0, 1) for c in (3, 2, 1)], -1) * 255
        alpha = 0.4 * (h > 0.3)[..., None]
        out = out * (1 - alpha) + colour * alpha
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for box in boxes:
        draw.rectangle(tuple(box), outline=(255, 255, 0), width=max(2, columns // 400))
    if caption:
        font = ImageFont.load_default(size=max(12, min(rows, columns) // 40))
        text = _wrap(draw, caption, font, columns - 16)
        *_, right, bottom = draw.multiline_textbbox((8, 8), text, font=font)
        draw.rectangle((0, 0, min(right + 8, columns - 1), min(bottom + 8, rows - 1)), fill=0)
        draw.multiline_text((8, 8), text, font=font, fill=(255, 255, 255))
    return np.asarray(img)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
          width: int) -> str:  # fmt: skip
    """Wrap each line of ``text`` at spaces so that it fits ``width`` pixels."""
    lines: list[str] = []
    for paragraph in text.splitlines():
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return "\n".join(lines)


def _frame_view(src: Dataset, frame: int) -> Dataset:
    """Flat dataset with the LUT attributes of one frame (functional groups included)."""
    view = Dataset()
    for keyword in _VIEW_KEYWORDS:
        if keyword in src:
            view[keyword] = src[keyword]
    shared = src.get("SharedFunctionalGroupsSequence") or []
    per_frame = src.get("PerFrameFunctionalGroupsSequence") or []
    items = [shared[0] if shared else None, per_frame[frame] if frame < len(per_frame) else None]
    for item in items:
        for macro in _FRAME_MACROS:
            if item is not None and item.get(macro):
                view.update(item[macro][0])
    return view


def _grey(arr: np.ndarray, view: Dataset, *, invert: bool) -> np.ndarray:
    """Modality LUT, then the first VOI window (else the 1st-99th percentile), to uint8."""
    values = pydicom.pixels.apply_modality_lut(arr, view).astype(np.float64)
    center, width = _window(view)
    if width is None or center is None:
        low, high = np.percentile(values, [1, 99])
        center, width = (low + high) / 2, max(float(high - low), 1.0)
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR")
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    grey = hd.pixels.apply_voi_window(
        values,
        window_center=center,
        window_width=width,
        voi_lut_function=function,
        output_range=(0.0, 255.0),
    )
    if invert:
        grey = 255.0 - grey
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)


def _window(view: Dataset) -> tuple[float | None, float | None]:
    if "WindowCenter" not in view or "WindowWidth" not in view:
        return None, None
    try:
        center = float(np.atleast_1d(view.WindowCenter)[0])
        width = float(np.atleast_1d(view.WindowWidth)[0])
    except (TypeError, ValueError, IndexError):
        return None, None
    if not np.isfinite(center) or not np.isfinite(width) or width < 1.0:
        return None, None
    return center, width
