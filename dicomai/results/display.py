"""Render a source image for display and compose the Secondary Capture picture: the image,
its heat map and a text panel beside it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom.pixels
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage

from dicomai.errors import UnsupportedInput
from dicomai.inference.decode import decode_reduced
from dicomai.ingest.pixel_guard import check_frame
from dicomai.results.heatmap import (
    DEFAULT_CUTOFF,
    activation_on_grid,
    body_mask,
    colour_ramp,
    hot_region,
)

__all__ = ["MAX_SIDE", "MIN_SIDE", "HeatLayer", "compose", "display_rgb", "fit_size", "resize_rgb"]

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
        side is still at least ``max_side`` (a 2500 x 2000 radiograph: 1250 x 1000, a fraction
        of a full decode's time).

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
    check_frame(src, frame)  # size limits and the codestream's own header, before decoding
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


@dataclass(frozen=True, slots=True)
class HeatLayer:
    """A heat map to draw on an image: the coarse map and how to show it.

    Attributes
    ----------
    cam
        The model's class activation map, any size, values in [0, 1].
    cutoff
        Fraction of the peak at or above which the map is drawn.
    title
        What the map shows, for the scale, e.g. "Pneumothorax".
    """

    cam: np.ndarray
    cutoff: float = DEFAULT_CUTOFF
    title: str = ""


def compose(rgb: np.ndarray, lines: Sequence[str], heat: HeatLayer | None = None) -> np.ndarray:
    """The Secondary Capture picture: the image, the heat map where it is high and inside the
    body, and a text panel beside the image (never over it) with a labelled colour scale.

    Parameters
    ----------
    rgb
        ``(rows, columns, 3)`` uint8: the source as displayed.
    lines
        Text of the panel; the first line is the title, drawn larger.
    heat
        Heat map to draw, or ``None``.

    Returns
    -------
    numpy.ndarray
        ``(rows', columns + panel, 3)`` uint8, ``rows' >= rows`` (taller only when the text
        needs it); the image keeps its pixels at the top left.
    """
    rows, columns, _ = rgb.shape
    image = rgb
    if heat is not None:
        image = _draw_heat(rgb, heat)
    size = max(14, min(rows, columns) // 40)
    font = ImageFont.load_default(size=size)
    title_font = ImageFont.load_default(size=round(size * 1.25))
    panel_width = max(320, round(columns * 0.42))
    margin = max(8, size // 2)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    blocks = [(_wrap(measure, lines[0], title_font, panel_width - 2 * margin), title_font)]
    blocks += [(_wrap(measure, line, font, panel_width - 2 * margin), font) for line in lines[1:]]
    heights = [
        measure.multiline_textbbox((0, 0), text, font=f, spacing=size // 3)[3] + size // 2
        for text, f in blocks
    ]
    scale_text = ""
    if heat is not None:
        label = f"Heat map: {heat.title}" if heat.title else "Heat map"
        scale_text = _wrap(
            measure,
            f"{label}. Relative activation of the model, drawn from {100 * heat.cutoff:.0f}% "
            "of its peak, inside the body only.",
            font,
            panel_width - 2 * margin,
        )
    scale_height = 0
    if scale_text:
        text_height = measure.multiline_textbbox((0, 0), scale_text, font=font, spacing=size // 3)
        scale_height = text_height[3] + 3 * size
    needed = margin + sum(heights) + scale_height + 2 * margin
    canvas = Image.new("RGB", (columns + panel_width, max(rows, needed)), (0, 0, 0))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.line([(columns, 0), (columns, canvas.height)], fill=(90, 90, 90), width=1)
    y = margin
    for (text, f), height in zip(blocks, heights, strict=True):
        colour = (255, 214, 0) if f is title_font else (255, 255, 255)
        draw.multiline_text((columns + margin, y), text, font=f, fill=colour, spacing=size // 3)
        y += height
    if heat is not None:
        _draw_scale(draw, (columns + margin, y + margin), panel_width - 2 * margin, size, font,
                    heat, scale_text)  # fmt: skip
    return np.asarray(canvas)


def _draw_heat(rgb: np.ndarray, heat: HeatLayer) -> np.ndarray:
    """Blend the ramp into ``rgb`` where the activation is at or above the cutoff inside the
    body, more opaque where it is higher, with a thin outline around the region."""
    rows, columns, _ = rgb.shape
    activation = activation_on_grid(heat.cam, (rows, columns))
    region = hot_region(activation, body_mask(rgb), heat.cutoff)
    if region is None:
        return rgb
    t = np.clip((activation - heat.cutoff) / max(1.0 - heat.cutoff, 1e-6), 0.0, 1.0)
    ramp = colour_ramp()
    colour = ramp[np.round(t * (len(ramp) - 1)).astype(np.intp)].astype(np.float32)
    alpha = np.where(region.mask, 0.35 + 0.30 * t, 0.0)[..., None]
    out = rgb.astype(np.float32) * (1.0 - alpha) + colour * alpha
    width = max(1, min(rows, columns) // 400)
    edge = region.mask & ~ndimage.binary_erosion(region.mask, iterations=width)
    out[edge] = ramp[0]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _draw_scale(
    draw: ImageDraw.ImageDraw,
    origin: tuple[int, int],
    width: int,
    size: int,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    heat: HeatLayer,
    text: str,
) -> None:
    """``text``, then a colour bar from the cutoff to the peak with its end labels."""
    x0, y0 = origin
    draw.multiline_text((x0, y0), text, font=font, fill=(255, 255, 255), spacing=size // 3)
    bar_top = y0 + draw.multiline_textbbox((0, 0), text, font=font, spacing=size // 3)[3]
    bar_top += size // 2
    ramp = colour_ramp(max(width, 2))
    for x in range(width):
        draw.line(
            [(x0 + x, bar_top), (x0 + x, bar_top + size)], fill=tuple(int(v) for v in ramp[x])
        )
    ticks_y = bar_top + size + 2
    draw.text((x0, ticks_y), f"{100 * heat.cutoff:.0f}% of peak", font=font, fill=(200, 200, 200))
    right = "peak"
    draw.text((x0 + width - draw.textlength(right, font=font), ticks_y), right, font=font,
              fill=(200, 200, 200))  # fmt: skip


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
