"""Hostile data sets built from bytes: a deflate bomb, an element bomb, deep nesting, JPEG 2000
codestreams whose SIZ claims another size. Shared by the unit and integration tests of
:mod:`dicomai.ingest.file_limits`."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import JPEG2000Lossless

from dicomai_tools import synthetic

#: A private group after every standard header element and before the pixel data.
PRIVATE_GROUP = 0x7FD1


def encode(ds: Dataset, *, implicit: bool = False, little: bool = True) -> bytes:
    """``ds`` as data set bytes (no file meta)."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = little, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element."""
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, number, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def header(seed: int, *, pixels: bool = False) -> Dataset:
    """A small DX instance; without its pixel data unless ``pixels``."""
    ds = synthetic.make_xray("chest", rows=32, cols=32, seed=seed)
    if not pixels:
        del ds.PixelData
    return ds


def private_creator() -> bytes:
    return element(PRIVATE_GROUP, 0x0010, b"LO", b"DICOMAI TEST")


def deflate_bomb(ds: Dataset, inflated: int) -> bytes:
    """``ds`` followed by a private OB element of zeros, together ``inflated`` bytes or a
    little more, deflated (raw deflate, as Deflated Explicit VR Little Endian wants).

    Deflate repeats itself on zeros: after the first megabytes each sync-flushed chunk of
    zeros compresses to the same bytes, so the bomb is built from one such chunk repeated
    instead of compressing gigabytes."""
    chunk = 16 << 20
    head = encode(ds) + private_creator()
    count = max(2, -(-(inflated - len(head)) // chunk))
    zeros = bytes(chunk)
    value_length = count * chunk
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = compressor.compress(
        head + struct.pack("<HH2sHI", PRIVATE_GROUP, 0x1010, b"OB", 0, value_length) + zeros)
    first += compressor.flush(zlib.Z_SYNC_FLUSH)
    repeated = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    again = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert again == repeated, "zeros did not compress periodically"
    return first + repeated * (count - 1) + compressor.flush()


def deflated(ds: Dataset) -> bytes:
    """``ds`` as Deflated Explicit VR Little Endian data set bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(encode(ds)) + compressor.flush()


def element_bomb(ds: Dataset, count: int) -> bytes:
    """``ds`` followed by ``count`` tiny private elements (10 bytes each), in tag order."""
    parts = [encode(ds)]
    group, number = 0x6001, 0x1000
    for _ in range(count):
        parts.append(struct.pack("<HH2sH", group, number, b"SH", 2) + b"AB")
        number += 1
        if number > 0xFFFF:
            group, number = group + 2, 0x1000
    return b"".join(parts)


def nested(depth: int, *, defined: bool = False, implicit: bool = False) -> bytes:
    """A Content Sequence nested ``depth`` deep around one element, in Explicit (or Implicit)
    VR Little Endian, with undefined (or defined) lengths."""
    inner = (struct.pack("<HHI", 0x0008, 0x0060, 2) if implicit
             else struct.pack("<HH2sH", 0x0008, 0x0060, b"CS", 2)) + b"SR"
    for _ in range(depth):
        if defined:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            head = (struct.pack("<HHI", 0x0040, 0xA730, len(item)) if implicit
                    else struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)))
            inner = head + item
        else:
            head = (struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF) if implicit
                    else struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF))
            inner = (head + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner
                     + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
                     + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return inner


def j2k_codestream(rows: int = 64, columns: int = 64, *,
                   claim: tuple[int, int] | None = None) -> bytes:
    """A lossless JPEG 2000 codestream of a ``rows`` x ``columns`` 8-bit image (OpenJPEG, via
    Pillow), its SIZ patched to claim ``claim`` = (rows, columns) when given."""
    image = (np.arange(rows * columns, dtype=np.uint32) % 251).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image.reshape(rows, columns)).save(buf, "JPEG2000", no_jp2=True,
                                                        irreversible=False)
    stream = bytearray(buf.getvalue())
    if claim is not None:
        at = stream.find(b"\xff\x4f\xff\x51") + 4  # Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz
        xosiz, yosiz = struct.unpack(">II", stream[at + 12 : at + 20])
        stream[at + 4 : at + 12] = struct.pack(">II", claim[1] + xosiz, claim[0] + yosiz)
    return bytes(stream)


def j2k_instance(seed: int, *, rows: int, columns: int, codestream: bytes) -> Dataset:
    """A DX instance declaring ``rows`` x ``columns`` 8-bit, its pixel data ``codestream``
    (JPEG 2000 Lossless)."""
    ds = synthetic.make_xray("chest", rows=32, cols=32, seed=seed)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return ds


def part10(path: Path, ds: Dataset, data: bytes, syntax: str) -> Path:
    """A Part 10 file holding ``data`` as the data set of ``ds``'s SOP class and instance,
    under ``syntax`` (written as given, not re-encoded)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(buf.getvalue() + data)
    return path

