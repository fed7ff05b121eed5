"""Check a compressed frame's own header before decoding it.

A hostile or broken file can declare 2048 x 2048 pixels in its DICOM header and carry a JPEG
2000 codestream that claims 20000 x 20000: the decoder would allocate for the codestream's
size, not the header's. Here the codestream's dimensions (JPEG 2000 SIZ, JPEG SOF, JPEG-LS
SOF55) are read from its first bytes and must equal Rows and Columns; and every frame must stay
within a pixel budget. Pure byte parsing: nothing is decoded.
"""

from __future__ import annotations

import struct

import pydicom.encaps
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomai.errors import UnsupportedInput

__all__ = ["MAX_FRAME_PIXELS", "check_frame", "codestream_size", "first_fragment"]

#: Pixels in one frame at most (Rows x Columns x samples): 100 million, about 7 times a 14-bit
#: 4300 x 3500 mammogram; larger frames are refused before decoding.
MAX_FRAME_PIXELS = 100_000_000
#: Bytes of a frame's start searched for its size marker.
_HEAD = 1 << 16
# JPEG start-of-frame markers that carry the frame size (not DHT 0xC4, JPG 0xC8, DAC 0xCC),
# plus JPEG-LS SOF55 (0xF7).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                  0xCF, 0xF7})  # fmt: skip
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_ITEM = b"\xfe\xff\x00\xe0"


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` declared by a JPEG, JPEG-LS or JPEG 2000 frame's own header, or
    None when the frame is none of these (e.g. RLE) or its header cannot be found.

    Raises
    ------
    UnsupportedInput
        The header is there but truncated.
    """
    head = bytes(frame[:_HEAD])
    at = head.find(_J2K_SOC_SIZ)
    if at >= 0:  # raw codestream, or inside a JP2 wrapper
        siz = head[at + 4 : at + 4 + 2 + 2 + 16]
        if len(siz) < 20:
            raise UnsupportedInput("JPEG 2000 header is truncated")
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", siz[4:20])
        return ysiz - yosiz, xsiz - xosiz
    if not head.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None  # not a marker where one must be: leave it to the decoder
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack(">H", head[pos + 2 : pos + 4])[0]
        if marker in _SOF:
            sof = head[pos + 4 : pos + 9]
            if len(sof) < 5:
                raise UnsupportedInput("JPEG frame header is truncated")
            rows, columns = struct.unpack(">HH", sof[1:5])
            return rows, columns
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        pos += 2 + length
    return None


def first_fragment(pixel_data: bytes, limit: int = _HEAD) -> bytes | None:
    """At most ``limit`` bytes from the start of the first fragment of encapsulated pixel
    data (PS3.5 A.4: an item holding the Basic Offset Table, then an item per fragment), where
    a frame's codestream header is; None when the encapsulation has no such fragment.

    Reads only item headers and the bytes returned: enough for :func:`codestream_size` at the
    door, before the data set is stored (the frame itself may continue in later fragments).
    """
    head = bytes(pixel_data[:8])
    if len(head) < 8 or head[:4] != _ITEM:
        return None
    at = 8 + struct.unpack("<I", head[4:])[0]
    fragment = bytes(pixel_data[at : at + 8])
    if len(fragment) < 8 or fragment[:4] != _ITEM:
        return None
    length = struct.unpack("<I", fragment[4:])[0]
    return bytes(pixel_data[at + 8 : at + 8 + min(length, limit)])


def check_frame(ds: Dataset, index: int, *, max_pixels: int = MAX_FRAME_PIXELS) -> None:
    """Refuse frame ``index`` (0-based) of ``ds`` before it is decoded if it is too large or
    its compressed header disagrees with Rows/Columns.

    Raises
    ------
    UnsupportedInput
        With a reason that names no dataset value.
    """
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise UnsupportedInput("image size attributes are missing or invalid") from exc
    if rows < 1 or columns < 1 or rows * columns * samples > max_pixels:
        raise UnsupportedInput("image frame is larger than the decoding limit")
    syntax = UID(str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or ""))
    if not syntax or not syntax.is_compressed or "PixelData" not in ds:
        return
    frames = int(ds.get("NumberOfFrames") or 1)
    try:
        frame = pydicom.encaps.get_frame(ds.PixelData, index, number_of_frames=frames)
    except Exception as exc:  # malformed encapsulation comes in several types
        raise UnsupportedInput("compressed pixel data is malformed") from exc
    size = codestream_size(frame)
    if size is not None and size != (rows, columns):
        raise UnsupportedInput("compressed frame size does not match Rows/Columns")
