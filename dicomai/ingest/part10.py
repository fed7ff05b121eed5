"""The File Meta Information of a DICOM Part 10 file read from its first bytes.

A STOW-RS part (``application/dicom``) is a Part 10 file: 128-byte preamble, ``DICM``, then
the group 0002 elements (always Explicit VR Little Endian, PS3.10 7.1) that name the transfer
syntax and the SOP class and instance of the data set that follows. :func:`read_file_meta`
reads them from a prefix of the part, so that the data set can be kept apart as it streams in
(the same bytes a C-STORE would carry), without pydicom and without trusting any length it
reads further than the prefix it was given.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

__all__ = ["MAX_META_BYTES", "FileMeta", "Incomplete", "NotPart10", "read_file_meta"]

#: A prefix this long without complete file meta is not a Part 10 file we accept.
MAX_META_BYTES = 64 * 1024

_PREAMBLE_LENGTH = 128
_MAGIC = b"DICM"
#: VRs with a reserved field and a 4-byte length in Explicit VR encoding (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_TRANSFER_SYNTAX, _SOP_CLASS, _SOP_INSTANCE = 0x0010, 0x0002, 0x0003


class Incomplete(Enum):
    """More bytes are needed before the file meta can be read."""

    MORE = "more"


class NotPart10(ValueError):
    """The bytes are not a Part 10 file (no ``DICM``, broken group 0002, UIDs missing)."""


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What a store needs from the file meta, and where the data set starts."""

    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    #: Offset of the first byte after the file meta (the data set).
    dataset_offset: int


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="strict").strip()


def read_file_meta(
    data: bytes | bytearray | memoryview, *, final: bool = False
) -> FileMeta | Incomplete:
    """The file meta of the Part 10 file ``data`` begins with, :attr:`Incomplete.MORE` when
    ``data`` ends before it does (with ``final``, ``data`` is the whole file: a file that ends
    within its file meta raises instead).

    A file without the preamble is accepted when it starts with a group 0002 element (some
    senders strip it). Raises :class:`NotPart10` for anything else, or when the meta has no
    transfer syntax, SOP class or SOP instance UID, or is longer than
    :data:`MAX_META_BYTES`.
    """
    view = memoryview(data)
    if len(view) < _PREAMBLE_LENGTH + 4 and not final:
        return Incomplete.MORE  # a preamble may begin like a group 0002 element
    if len(view) >= _PREAMBLE_LENGTH + 4 and bytes(view[128:132]) == _MAGIC:
        offset = _PREAMBLE_LENGTH + 4
    elif bytes(view[:2]) == b"\x02\x00":
        offset = 0  # no preamble: the group 0002 tag first
    else:
        raise NotPart10("no DICM prefix")
    result = _read(view, offset, final)
    if result is Incomplete.MORE and final:
        raise NotPart10("the file ends within its file meta")
    return result


def _read(view: memoryview, offset: int, final: bool) -> FileMeta | Incomplete:
    values: dict[int, bytes] = {}
    end_of_group: int | None = None
    while True:
        if end_of_group is not None and offset >= end_of_group:
            break
        if offset > MAX_META_BYTES:
            raise NotPart10("file meta too long")
        if len(view) < offset + 8:
            if final and offset == len(view) and values and end_of_group is None:
                break  # an empty data set after the meta
            return Incomplete.MORE
        group, element = struct.unpack_from("<HH", view, offset)
        if group != 0x0002:
            if end_of_group is not None:
                raise NotPart10("group 0002 shorter than its group length")
            break
        vr = bytes(view[offset + 4 : offset + 6])
        if not (vr.isalpha() and vr.isupper()):
            raise NotPart10("file meta is not Explicit VR")
        if vr in _LONG_VRS:
            if len(view) < offset + 12:
                return Incomplete.MORE
            (length,) = struct.unpack_from("<I", view, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", view, offset + 6)
            start = offset + 8
        if length == 0xFFFFFFFF or start + length > MAX_META_BYTES:
            raise NotPart10("file meta element too long")
        if len(view) < start + length:
            return Incomplete.MORE
        value = bytes(view[start : start + length])
        if element == 0x0000 and vr == b"UL" and length == 4:
            end_of_group = start + length + struct.unpack("<I", value)[0]
            if end_of_group > MAX_META_BYTES:
                raise NotPart10("file meta group length too long")
        values[element] = value
        offset = start + length
    try:
        meta = FileMeta(
            transfer_syntax=_text(values.get(_TRANSFER_SYNTAX, b"")),
            sop_class_uid=_text(values.get(_SOP_CLASS, b"")),
            sop_instance_uid=_text(values.get(_SOP_INSTANCE, b"")),
            dataset_offset=offset,
        )
    except UnicodeDecodeError as exc:
        raise NotPart10("file meta UIDs are not ASCII") from exc
    if not (meta.transfer_syntax and meta.sop_class_uid and meta.sop_instance_uid):
        raise NotPart10("file meta without transfer syntax, SOP class or SOP instance UID")
    return meta
