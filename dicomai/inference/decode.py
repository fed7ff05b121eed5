"""Reduced-resolution decoding: decode only the detail a model input needs.

A model that sees 224² pixels gains nothing from a 2500x2000 radiograph decoded in full. Two
compressed transfer syntaxes can be decoded at a fraction of the size for a fraction of the
cost:

* **JPEG 2000** (lossless and lossy): the codestream is a wavelet pyramid. Decoding stops at
  resolution level ``r`` (OpenJPEG's ``reduce``, through Pillow), which gives the image
  low-pass filtered and halved ``r`` times — about 1/50 of the work at ``r = 3``.
* **JPEG baseline** (8 bit): libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain (Pillow's
  ``draft``).

:func:`decode_reduced` returns stored values like ``pydicom``'s ``pixel_array`` (same
signedness and range), only smaller, or None whenever it cannot vouch for the result: another
transfer syntax, no level small enough, a codestream whose precision or signedness disagree
with the dataset, any decoder error. The caller then decodes in full, so a None costs only the
header parse.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit

__all__ = ["J2KHeader", "Reduced", "align", "decode_reduced", "j2k_header", "j2k_level"]

logger = logging.getLogger(__name__)

_J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
_SOC_SIZ = b"\xff\x4f\xff\x51"


@dataclass(frozen=True)
class Reduced:
    """A frame decoded at reduced resolution."""

    #: Stored values, 2-D, dtype as ``pixel_array`` would give.
    pixels: np.ndarray
    #: How many full-resolution pixels one pixel spans (2, 4, 8, ...).
    scale: int
    #: Where the samples sit, in reduced pixels, *before* the centres of an area-averaging grid
    #: (pixel ``n`` covering full-resolution pixels ``scale·n .. scale·n + scale - 1``):
    #: JPEG 2000's low-pass band samples full-resolution position ``scale·n``, so its phase is
    #: ``(1 - 1/scale) / 2``; libjpeg's scaled IDCT averages blocks, phase 0. :func:`align`
    #: removes it.
    phase: float


def align(image: np.ndarray, phase: float) -> np.ndarray:
    """Resample a float image by ``phase`` pixels along both axes (linear interpolation), so
    that a reduced decode lines up with what an antialiased resize of the full image sees.

    Without it a resolution-3 JPEG 2000 decode is shifted by 3.5 full-resolution pixels; at
    a model input of 224² from 2500x2000 that is a third of an input pixel.
    """
    if phase <= 0 or min(image.shape) < 2:
        return image
    out = np.array(image, dtype=np.float32)
    out[:, :-1] = (1.0 - phase) * out[:, :-1] + phase * out[:, 1:]
    out[:-1] = (1.0 - phase) * out[:-1] + phase * out[1:]
    return out


class J2KHeader:
    """What the main header of a JPEG 2000 codestream says about its one component."""

    __slots__ = ("columns", "levels", "precision", "rows", "signed", "x_offset", "y_offset")

    def __init__(
        self,
        *,
        columns: int,
        rows: int,
        x_offset: int,
        y_offset: int,
        precision: int,
        signed: bool,
        levels: int,
    ) -> None:
        self.columns, self.rows = columns, rows
        self.x_offset, self.y_offset = x_offset, y_offset
        self.precision, self.signed, self.levels = precision, signed, levels

    def reduced_size(self, level: int) -> tuple[int, int]:
        """``(rows, columns)`` of the image decoded at resolution ``level`` (ISO 15444-1 B.5)."""
        scale = 1 << level
        x1, y1 = self.x_offset + self.columns, self.y_offset + self.rows
        return (
            _ceil_div(y1, scale) - _ceil_div(self.y_offset, scale),
            _ceil_div(x1, scale) - _ceil_div(self.x_offset, scale),
        )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def j2k_header(codestream: bytes) -> J2KHeader | None:
    """Parse the SIZ, COD and COC markers of a raw single-component codestream.

    Returns None for anything else (a JP2 file, several components, a truncated header).
    The number of decomposition levels is the smallest that COD and any COC name.
    """
    if not codestream.startswith(_SOC_SIZ) or len(codestream) < 6:
        return None
    try:
        (lsiz,) = struct.unpack_from(">H", codestream, 4)
        (_, xsiz, ysiz, xosiz, yosiz, _, _, _, _, csiz) = struct.unpack_from(
            ">HIIIIIIIIH", codestream, 6
        )
        if csiz != 1 or lsiz < 41:
            return None
        ssiz, xrsiz, yrsiz = struct.unpack_from(">BBB", codestream, 6 + 36)
        if xrsiz != 1 or yrsiz != 1:
            return None
        levels: int | None = None
        pos = 4 + lsiz
        while pos + 4 <= len(codestream):
            marker, length = struct.unpack_from(">HH", codestream, pos)
            if marker == 0xFF90 or length < 2:  # SOT: end of the main header
                break
            if marker == 0xFF52:  # COD: Scod, SGcod (4 bytes), then the levels
                found = codestream[pos + 4 + 5]
                levels = found if levels is None else min(levels, found)
            elif marker == 0xFF53:  # COC: Ccoc (1 byte: < 257 components), Scoc, levels
                found = codestream[pos + 4 + 2]
                levels = found if levels is None else min(levels, found)
            pos += 2 + length
    except (struct.error, IndexError):
        return None
    if levels is None or xsiz <= xosiz or ysiz <= yosiz:
        return None
    return J2KHeader(
        columns=xsiz - xosiz,
        rows=ysiz - yosiz,
        x_offset=xosiz,
        y_offset=yosiz,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        levels=levels,
    )


def j2k_level(header: J2KHeader, min_side: int) -> int:
    """The largest resolution reduction whose image keeps both sides ≥ ``min_side``.

    Only levels where Pillow's size arithmetic (round half up) agrees with the codestream's
    (ceiling) are used; 0 means "decode in full".
    """
    for level in range(header.levels, 0, -1):
        rows, columns = header.reduced_size(level)
        if min(rows, columns) < min_side:
            continue
        half = 1 << (level - 1)
        pillow = ((header.rows + half) >> level, (header.columns + half) >> level)
        if pillow == (rows, columns):
            return level
    return 0


def decode_reduced(ds: Dataset, min_side: int, *, frame: int = 0) -> Reduced | None:
    """Stored values of one greyscale frame, decoded at reduced resolution when that is cheaper.

    Parameters
    ----------
    ds
        The instance; its pixel data is not modified and nothing is cached on it.
    min_side
        Both sides of the result stay at least this long.
    frame
        0-based frame.

    Returns
    -------
    Reduced | None
        A 2-D array of stored values (dtype as ``pixel_array`` gives: ``uint8``/``uint16``, or
        ``int8``/``int16`` when PixelRepresentation is 1), smaller than ``Rows`` x ``Columns``,
        with its scale and sampling phase; None when the frame is not a greyscale JPEG 2000 /
        JPEG baseline frame that can be decoded smaller, or decoding failed (decode in full
        then).
    """
    try:
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if syntax not in _J2K_SYNTAXES and syntax != JPEGBaseline8Bit:
            return None
        if int(ds.get("SamplesPerPixel", 1)) != 1 or "PixelData" not in ds:
            return None
        if str(ds.get("PhotometricInterpretation", "")).strip() not in (
            "MONOCHROME1",
            "MONOCHROME2",
        ):
            return None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        data = get_frame(ds.PixelData, frame, number_of_frames=frames)
        if syntax == JPEGBaseline8Bit:
            return _jpeg_reduced(ds, data, min_side)
        return _j2k_reduced(ds, data, min_side)
    except Exception as exc:  # any failure: the caller decodes in full
        logger.debug("reduced decode failed, decoding in full (%s)", type(exc).__name__)
        return None


def _j2k_reduced(ds: Dataset, codestream: bytes, min_side: int) -> Reduced | None:
    from PIL import Image

    header = j2k_header(codestream)
    if header is None or (header.rows, header.columns) != (int(ds.Rows), int(ds.Columns)):
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits_allocated = int(ds.BitsAllocated)
    if (
        header.signed != signed
        or header.precision > int(ds.BitsStored)
        or header.precision > 16
        or bits_allocated not in (8, 16)
        or header.precision > bits_allocated
    ):
        return None
    level = j2k_level(header, min_side)
    if level == 0:
        return None
    expected = header.reduced_size(level)
    with Image.open(io.BytesIO(codestream), formats=("JPEG2000",)) as im:
        im.reduce = level  # type: ignore[method-assign,assignment]  # the plugin's property
        im.load()
        out = np.asarray(im)
    if out.shape != expected:
        return None
    # Pillow scales to its mode's range: value << (8 or 16 - precision), signed values offset
    # by 2^(precision-1) first (Jpeg2KDecode.c, j2ku_gray_l/j2ku_gray_i).
    width = 8 if out.dtype == np.uint8 else 16
    values = out.astype(np.int32) >> (width - header.precision)
    if signed:
        values -= 1 << (header.precision - 1)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")
    scale = 1 << level
    return Reduced(values.astype(dtype), scale, (1.0 - 1.0 / scale) / 2.0)


def _jpeg_reduced(ds: Dataset, data: bytes, min_side: int) -> Reduced | None:
    from PIL import Image

    if int(ds.BitsAllocated) != 8 or int(ds.get("PixelRepresentation", 0)) != 0:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    if min(rows, columns) < 2 * min_side:
        return None
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
        if im.mode != "L" or im.size != (columns, rows):
            return None
        im.draft("L", (min_side, min_side))
        if min(im.size) < min_side or im.size == (columns, rows):
            return None
        im.load()
        out = np.asarray(im)
    scale = math.ceil(columns / out.shape[1])
    if out.shape != (_ceil_div(rows, scale), _ceil_div(columns, scale)):
        return None
    return Reduced(out.astype(np.uint8), scale, 0.0)
