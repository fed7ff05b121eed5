"""What a received data set may cost before it is refused.

A C-STORE carries a few bytes that can ask for a great deal: a Deflated Explicit VR Little
Endian data set of one megabyte can inflate to gigabytes, nine megabytes of tiny elements
take half a minute to parse, a header can promise a 32767 x 32767 image whose decoding no host
survives, and a JPEG 2000 codestream can claim another size than its header. Each is refused
here, at the door, from bytes and header values only (nothing is decoded), within limits the
operator sets in ``[receiver]`` (:class:`FileLimits`):

- **Inflated size** (``max_inflated_mb``): a deflated data set is inflated in bounded chunks,
  counted, and refused as soon as it passes the limit, without ever holding the inflated bytes
  (:func:`inflate`). Deflate cannot expand one byte into more than 1032, so a data set too
  small to reach the limit is inflated once; a larger one is counted first, then inflated.
- **Element count** (``max_elements``, nested elements and items included) and **nesting
  depth** (``max_nesting_depth``, sequences within sequences): :func:`scan` walks the
  encoding, jumping over values, and stops at the first limit passed. Every element, item or
  delimiter takes at least 8 bytes, so a data set shorter than 8 x ``max_elements`` bytes
  cannot pass the count and is not walked before parsing; its nesting is bounded afterwards by
  its item tags outside the pixel data (one per level at least: a normal header has a few), and
  walked only where those are more than the limit (:func:`read_dataset`).
- **Pixel budget** (``max_frame_megapixels``: Rows x Columns x samples of one frame;
  ``max_pixel_data_mb``: the decoded bytes of all frames, Rows x Columns x frames x samples x
  BitsAllocated / 8) and, for encapsulated syntaxes, the **codestream's own size** (JPEG 2000
  SIZ, JPEG SOF, JPEG-LS SOF55 of the first fragment, :mod:`dicomai.ingest.pixel_guard`) equal to
  Rows/Columns (:func:`check_pixels`).

Statuses (PS3.4 Annex B.2.3 lists, for a Storage SCP, Refused: Out of Resources A7xx, Error:
Data Set does not match SOP Class A9xx, Error: Cannot understand Cxxx):

- A data set beyond a configured limit (``inflated_too_large``, ``too_many_elements``,
  ``nesting_too_deep``, ``frame_too_large``, ``pixel_data_too_large``) is answered
  :data:`STATUS_OVER_LIMIT`, 0xC220, in the "Cannot understand" range (0xC210, our
  ``undecodable``, is beside it): we refuse to read it further, and retrying cannot change
  that. 0xA700 "Out of Resources" would be the literal reading of a resource limit, but it
  says the SCP is short of resources *now* (our answer when the spool disk is full or the
  database is locked): senders retry it, many of them forever and in order, so one such
  instance at the head of a PACS's forwarding queue would hold back every study behind it,
  and a hostile sender would be invited to send its bomb again. An operator who raises a limit
  has the refused instance sent again (it is kept under ``quarantine/<reason>/``).
- A codestream whose size differs from Rows/Columns (``codestream_mismatch``) is answered
  0xA900 (:data:`STATUS_DATASET_MISMATCH`): the data set contradicts itself (its pixel data
  is not the image its Image Pixel module describes), like native pixel data shorter than the
  image, which the receiver answers 0xA900 too.
"""

from __future__ import annotations

import functools
import struct
import threading
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset as pydicom_read_dataset
from pydicom.uid import UID

from dicomai.errors import UnsupportedInput
from dicomai.ingest.pixel_guard import codestream_size, first_fragment

if TYPE_CHECKING:
    from dicomai.config import ReceiverSettings

__all__ = [
    "LIMIT_REASONS",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OVER_LIMIT",
    "FileLimits",
    "LimitExceeded",
    "active",
    "check_pixels",
    "configure",
    "inflate",
    "read_dataset",
    "scan",
    "status_for",
]

MIB = 1024 * 1024

#: "Error: Cannot understand" (PS3.4 B.2.3, C000-CFFF), our code for "beyond a configured limit".
STATUS_OVER_LIMIT = 0xC220
#: "Error: Data Set does not match SOP Class" (PS3.4 B.2.3, A900-A9FF).
STATUS_DATASET_MISMATCH = 0xA900

INFLATED_TOO_LARGE = "inflated_too_large"
TOO_MANY_ELEMENTS = "too_many_elements"
NESTING_TOO_DEEP = "nesting_too_deep"
FRAME_TOO_LARGE = "frame_too_large"
PIXEL_DATA_TOO_LARGE = "pixel_data_too_large"
CODESTREAM_MISMATCH = "codestream_mismatch"

#: Reason code -> the status it is answered with.
LIMIT_REASONS: dict[str, int] = {
    INFLATED_TOO_LARGE: STATUS_OVER_LIMIT,
    TOO_MANY_ELEMENTS: STATUS_OVER_LIMIT,
    NESTING_TOO_DEEP: STATUS_OVER_LIMIT,
    FRAME_TOO_LARGE: STATUS_OVER_LIMIT,
    PIXEL_DATA_TOO_LARGE: STATUS_OVER_LIMIT,
    CODESTREAM_MISMATCH: STATUS_DATASET_MISMATCH,
}


def status_for(reason: str) -> int | None:
    """The status a reason code of this module is answered with; None for other codes."""
    return LIMIT_REASONS.get(reason)


@dataclass(frozen=True, slots=True)
class FileLimits:
    """The limits one received data set is held to (``[receiver]``, in bytes and pixels)."""

    max_inflated_bytes: int = 512 * MIB
    max_elements: int = 250_000
    max_nesting_depth: int = 32
    max_frame_pixels: int = 100_000_000
    max_pixel_data_bytes: int = 4096 * MIB

    @classmethod
    def from_settings(cls, settings: ReceiverSettings) -> FileLimits:
        """The limits of a ``[receiver]`` section."""
        return cls(
            max_inflated_bytes=settings.max_inflated_mb * MIB,
            max_elements=settings.max_elements,
            max_nesting_depth=settings.max_nesting_depth,
            max_frame_pixels=settings.max_frame_megapixels * 1_000_000,
            max_pixel_data_bytes=settings.max_pixel_data_mb * MIB,
        )


_active = FileLimits()
_active_lock = threading.Lock()


def configure(limits: FileLimits) -> None:
    """Make ``limits`` the ones :func:`active` gives (the daemon, from ``[receiver]``)."""
    global _active
    with _active_lock:
        _active = limits


def active() -> FileLimits:
    """The limits received data sets are held to in this process (defaults until
    :func:`configure`)."""
    return _active


class LimitExceeded(Exception):
    """A data set refused by one of these limits; ``reason`` is its quarantine reason code.

    The message names the limit, never a dataset value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = LIMIT_REASONS[reason]


# -- inflating ------------------------------------------------------------------------------

#: Deflate's largest expansion: a 258-byte match coded in 2 bits (RFC 1951), 1032 to 1.
_DEFLATE_MAX_RATIO = 1032
#: Input fed to the inflater at once, and output taken from it at once.
_IN_CHUNK = 64 * 1024
_OUT_CHUNK = 1 << 20


def _inflate(data: memoryview, limit: int, out: BytesIO | None) -> bool:
    """Inflate raw deflate ``data`` in bounded steps into ``out`` (or only count it when
    ``out`` is None); False as soon as more than ``limit`` bytes came out.

    Raises
    ------
    zlib.error
        The stream is corrupt or ends before its last block.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    for start in range(0, len(data), _IN_CHUNK):
        pending: bytes | memoryview = data[start : start + _IN_CHUNK]
        while pending:
            chunk = inflater.decompress(pending, _OUT_CHUNK)
            total += len(chunk)
            if total > limit:
                return False
            if out is not None:
                out.write(chunk)
            pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        if inflater.eof:
            break
    while not inflater.eof:  # output still held inside the inflater: take it in steps too
        chunk = inflater.decompress(b"", _OUT_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            return False
        if out is not None:
            out.write(chunk)
    if not inflater.eof:
        raise zlib.error("deflated data set ends before its last block")
    return True


def inflate(data: bytes | memoryview, limit: int) -> BytesIO:
    """The inflated bytes of a Deflated Explicit VR Little Endian data set (raw deflate,
    PS3.5 A.5), at most ``limit`` of them.

    When ``data`` could inflate beyond ``limit`` (more than ``limit`` / 1032 bytes), it is
    first inflated without keeping anything, only counting: a refused data set never costs
    more than one chunk of memory.

    Raises
    ------
    LimitExceeded
        ``inflated_too_large``.
    zlib.error
        Corrupt deflate data.
    """
    with memoryview(data) as view:
        could_exceed = len(view) * _DEFLATE_MAX_RATIO + _OUT_CHUNK > limit
        if could_exceed and not _inflate(view, limit, None):
            raise LimitExceeded(INFLATED_TOO_LARGE)
        out = BytesIO()
        if not _inflate(view, limit, out):  # only reached when it could not exceed
            raise LimitExceeded(INFLATED_TOO_LARGE)
    out.seek(0)
    return out


# -- counting elements and nesting ---------------------------------------------------------------

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
#: Explicit VRs with a reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})  # fmt: skip
_ITEM_LE, _ITEM_BE = b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00"
_ENDIAN = {True: ("<", _ITEM_LE), False: (">", _ITEM_BE)}
_TAG = {True: struct.Struct("<HH"), False: struct.Struct(">HH")}
_U16 = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}

# What the bytes of a frame of the walk are.
_DATASET, _SEQUENCE, _FRAGMENTS = 0, 1, 2


@functools.cache
def _is_sequence_tag(tag: int) -> bool | None:
    """Whether the data dictionary makes ``tag`` a sequence; None for a tag it does not know."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return None


def scan(
    data: bytes | memoryview,
    *,
    implicit_vr: bool,
    little_endian: bool,
    max_elements: int,
    max_depth: int,
) -> str | None:
    """Walk an encoded data set's elements (values skipped, sequences entered) and return
    ``too_many_elements`` or ``nesting_too_deep`` at the first limit passed, else None.

    Elements, items and fragments count, nested ones included. The depth of an element is the
    number of sequences around it; a sequence opened deeper than ``max_depth`` is refused.
    Bytes that are not a well-formed encoding stop the walk with None: the parser refuses them
    afterwards. In implicit VR a sequence of defined length is recognised by the data
    dictionary, or for a tag it does not know by a value that starts with an item; a UN
    element holding a sequence (PS3.5 6.2.2) is entered in Implicit VR Little Endian.
    """
    view = memoryview(data)
    size = len(view)
    count = depth = 0
    pos = 0
    # The current frame, and the frames around it: (kind, end or -1 when undefined, implicit,
    # little endian).
    kind, end, implicit, little = _DATASET, size, implicit_vr, little_endian
    stack: list[tuple[int, int, bool, bool]] = []
    tag_s, u16, u32 = _TAG[little], _U16[little], _U32[little]
    while True:
        if end != -1 and pos >= end:
            if not stack:
                return None
            if kind == _SEQUENCE:
                depth -= 1
            kind, end, implicit, little = stack.pop()
            tag_s, u16, u32 = _TAG[little], _U16[little], _U32[little]
            continue
        if pos + 8 > size:
            return None  # truncated: the parser says so
        group, element = tag_s.unpack_from(view, pos)
        tag = group << 16 | element
        if kind == _DATASET:
            if group == 0xFFFE:
                if tag != _ITEM_END or end != -1 or not stack:
                    return None
                pos += 8
                kind, end, implicit, little = stack.pop()  # back in the sequence
                tag_s, u16, u32 = _TAG[little], _U16[little], _U32[little]
                continue
            count += 1
            if count > max_elements:
                return TOO_MANY_ELEMENTS
            if implicit:
                vr = None
                length = u32.unpack_from(view, pos + 4)[0]
                value = pos + 8
            else:
                vr = bytes(view[pos + 4 : pos + 6])
                if vr in _LONG_VRS:
                    if pos + 12 > size:
                        return None
                    length = u32.unpack_from(view, pos + 8)[0]
                    value = pos + 12
                else:
                    length = u16.unpack_from(view, pos + 6)[0]
                    value = pos + 8
            inner_implicit, inner_little = implicit, little
            if vr == b"SQ":
                enters = _SEQUENCE
            elif vr == b"UN" or (vr is None and tag != _PIXEL_DATA):
                # A UN sequence is encoded in Implicit VR Little Endian; an implicit element
                # of undefined length can only be a sequence.
                if vr == b"UN":
                    inner_implicit, inner_little = True, True
                if length == _UNDEFINED:
                    enters = _SEQUENCE
                else:
                    known = _is_sequence_tag(tag) if vr is None else None
                    starts_item = length >= 8 and bytes(view[value : value + 4]) == (
                        _ITEM_LE if inner_little else _ITEM_BE
                    )
                    enters = _SEQUENCE if known or (known is None and starts_item) else -1
            elif length == _UNDEFINED:
                enters = _FRAGMENTS  # encapsulated pixel data
            else:
                enters = -1
            if enters == -1:
                pos = value + length
                continue
            stack.append((kind, end, implicit, little))
            kind, implicit, little = enters, inner_implicit, inner_little
            end = -1 if length == _UNDEFINED else value + length
            tag_s, u16, u32 = _TAG[little], _U16[little], _U32[little]
            pos = value
            if enters == _SEQUENCE:
                depth += 1
                if depth > max_depth:
                    return NESTING_TOO_DEEP
            continue
        # in a sequence or in encapsulated pixel data: items, then (undefined) a delimiter
        if tag == _SEQUENCE_END and end == -1:
            pos += 8
            if kind == _SEQUENCE:
                depth -= 1
            kind, end, implicit, little = stack.pop()
            tag_s, u16, u32 = _TAG[little], _U16[little], _U32[little]
            continue
        if tag != _ITEM:
            return None
        count += 1
        if count > max_elements:
            return TOO_MANY_ELEMENTS
        length = u32.unpack_from(view, pos + 4)[0]
        pos += 8
        if kind == _FRAGMENTS:
            if length == _UNDEFINED:
                return None
            pos += length
            continue
        stack.append((kind, end, implicit, little))
        kind, end = _DATASET, (-1 if length == _UNDEFINED else pos + length)


def _items_outside_pixels(data: memoryview, ds: Dataset, item: bytes) -> int:
    """Item tags in ``data`` before and after the pixel data's value (an upper bound on the
    nesting depth anywhere outside the pixel data)."""
    raw = ds.get_item(_PIXEL_DATA)
    if isinstance(raw, RawDataElement) and raw.value is not None:
        start = raw.value_tell
        stop = start + len(raw.value)
        return bytes(data[:start]).count(item) + bytes(data[stop:]).count(item)
    return bytes(data).count(item)


def read_dataset(stream: BytesIO, transfer_syntax: UID, limits: FileLimits) -> Dataset:
    """Parse a received data set (every top-level element's tag, VR and length; values are
    converted when used) within ``limits``: inflated, counted and nesting-checked as this
    module's docstring says.

    Raises
    ------
    LimitExceeded
        ``inflated_too_large``, ``too_many_elements`` or ``nesting_too_deep``.
    Exception
        Whatever the parser raises for bytes that are not a data set.
    """
    if transfer_syntax.is_deflated:
        with stream.getbuffer() as raw:
            stream = inflate(raw, limits.max_inflated_bytes)
        implicit, little = False, True
    else:
        implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian

    def walk() -> None:
        with stream.getbuffer() as data:
            reason = scan(
                data,
                implicit_vr=implicit,
                little_endian=little,
                max_elements=limits.max_elements,
                max_depth=limits.max_nesting_depth,
            )
        if reason is not None:
            raise LimitExceeded(reason)

    size = stream.getbuffer().nbytes
    walked = size >= 8 * limits.max_elements
    if walked:  # long enough to hold too many elements: walk it before parsing
        walk()
    stream.seek(0)
    try:
        ds = pydicom_read_dataset(stream, implicit, little)
    except Exception:
        if not walked:  # too deep for the parser (recursion)? then say so
            walk()
        raise
    if not walked:
        with stream.getbuffer() as data:
            items = _items_outside_pixels(data, ds, _ENDIAN[little][1])
        if items > limits.max_nesting_depth:
            walk()
    return ds


# -- pixels ---------------------------------------------------------------------------------------


def check_pixels(
    *,
    rows: int,
    columns: int,
    frames: int,
    samples: int,
    bits_allocated: int,
    transfer_syntax: UID,
    pixel_data: bytes | None,
    limits: FileLimits,
) -> str | None:
    """A reason code when an image's declared size passes a pixel limit or, for an
    encapsulated syntax, its first fragment's codestream declares another size than
    ``rows`` x ``columns``; else None. Sizes are positive (the caller checked them)."""
    if rows * columns * samples > limits.max_frame_pixels:
        return FRAME_TOO_LARGE
    if (rows * columns * frames * samples * bits_allocated + 7) // 8 > limits.max_pixel_data_bytes:
        return PIXEL_DATA_TOO_LARGE
    if pixel_data is None or not transfer_syntax.is_encapsulated:
        return None
    head = first_fragment(pixel_data)
    if head is None:
        return None  # no fragment to read: the encapsulation check refuses it
    try:
        size = codestream_size(head)
    except UnsupportedInput:
        return None  # a header cut by the fragment's end: the worker reads the whole frame
    if size is not None and size != (rows, columns):
        return CODESTREAM_MISMATCH
    return None
