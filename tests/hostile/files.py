"""Hostile files: valid-looking chest radiographs (they would be routed and analysed) that
cost the receiver far more than their size, and a way to send them as a normal client does.

Each builder writes a Part 10 file and returns its path. The costly part is never built in
this process: the deflate bomb's zeros are compressed once and the compressed block repeated,
and the million elements are laid out with numpy.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, _config

from dicomai_tools import synthetic
from tests.integration.test_conformance import encode

__all__ = [
    "Sent",
    "deflate_bomb",
    "j2k_codestream",
    "j2k_huge_and_agreeing",
    "j2k_larger_than_its_header",
    "many_elements",
    "send_as_is",
]


@dataclass(frozen=True, slots=True)
class Sent:
    """A C-STORE's outcome: the status (None: no response) and the seconds it took."""

    status: int | None
    seconds: float

    @property
    def refused(self) -> bool:
        """Answered, and not Success or a Warning."""
        return self.status is not None and self.status != 0 and (self.status & 0xF000) != 0xB000


def _base(seed: int) -> Dataset:
    """A small routable chest DX (the attacks dress up as one)."""
    return synthetic.make_xray("chest", modality="DX", view_position="PA", rows=64, cols=64,
                               seed=seed)


def _write(path: Path, ds: Dataset, transfer_syntax: str, body: bytes) -> Path:
    """A Part 10 file: preamble, file meta for ``ds`` in ``transfer_syntax``, then ``body``
    (the data set bytes, as they are)."""
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    path.write_bytes(buf.getvalue() + body)
    return path


def _split(ds: Dataset, group: int) -> tuple[Dataset, Dataset]:
    """``ds``'s elements below ``group`` and from it on."""
    low, high = Dataset(), Dataset()
    for elem in ds:
        (low if elem.tag.group < group else high).add(elem)
    return low, high


def deflate_bomb(path: Path, *, inflated_bytes: int = (2 << 30) + (128 << 20),
                 seed: int = 301) -> Path:
    """A Deflated Explicit VR Little Endian chest DX carrying a private OB element of
    ``inflated_bytes`` zeros (default 2.125 GiB): about 2 MB on the wire.

    The zeros are compressed as 1 MiB from a fresh compressor ending on a full flush: a
    byte-aligned run of non-final blocks that refers to nothing before it, so it can be
    repeated; the rest of the data set follows in the final block.
    """
    chunk = 1 << 20
    assert inflated_bytes % chunk == 0 and inflated_bytes < 1 << 32
    ds = _base(seed)
    low, high = _split(ds, 0x0009)
    head = encode(low) + _encode_private_header(inflated_bytes)
    tail = encode(high)

    def deflate(data: bytes, final: bool) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)

    zeros = deflate(bytes(chunk), final=False)
    body = b"".join((deflate(head, False), zeros * (inflated_bytes // chunk),
                     deflate(tail, True)))
    return _write(path, ds, DeflatedExplicitVRLittleEndian, body)


def _encode_private_header(length: int) -> bytes:
    """(0009,0010) private creator, then the header of (0009,1000) OB announcing
    ``length`` bytes (its value follows)."""
    creator = b"HOSTILE "
    return (struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", len(creator)) + creator
            + struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, length))


def j2k_codestream(rows: int, columns: int) -> bytes:
    """A minimal JPEG 2000 codestream of ``rows`` x ``columns`` 8-bit grey pixels: one tile,
    no wavelet levels, one layer, one empty packet (the image is all zero). A decoder has
    to allocate the whole image for it."""
    siz = struct.pack(">HIIIIIIIIHBBB", 0, columns, rows, 0, 0, columns, rows, 0, 0, 1,
                      7, 1, 1)  # Rsiz..Csiz, then Ssiz (8 bits unsigned), XRsiz, YRsiz
    cod = struct.pack(">BBHBBBBBB", 0, 0, 1, 0, 0, 4, 4, 0, 1)  # LRCP, 1 layer, 5-3
    qcd = struct.pack(">BB", 0x40, 8 << 3)  # no quantization, 2 guard bits, exponent 8
    packet = b"\x00"  # an empty packet

    def segment(marker: int, body: bytes) -> bytes:
        return struct.pack(">HH", marker, len(body) + 2) + body

    tile = b"\xff\x93" + packet
    sot = segment(0xFF90, struct.pack(">HIBB", 0, 12 + len(tile), 0, 1))
    return b"".join((b"\xff\x4f", segment(0xFF51, siz), segment(0xFF52, cod),
                     segment(0xFF5C, qcd), sot, tile, b"\xff\xd9"))


def j2k_larger_than_its_header(path: Path, *, claimed: int = 20000, seed: int = 302) -> Path:
    """A JPEG 2000 Lossless chest DX of 2048 x 2048 (the real codestream pydicom encodes)
    whose codestream's SIZ is patched to claim ``claimed`` x ``claimed``."""
    ds = synthetic.make_xray("chest", modality="DX", view_position="PA", rows=2048,
                             cols=2048, seed=seed, transfer_syntax=JPEG2000Lossless)
    data = bytearray(ds.PixelData)
    at = data.find(b"\xff\x4f\xff\x51")
    assert at > 0, "no JPEG 2000 codestream in the encoded pixel data"
    xsiz = at + 8  # SOC, SIZ marker, Lsiz, Rsiz
    assert struct.unpack_from(">II", data, xsiz) == (2048, 2048)
    struct.pack_into(">II", data, xsiz, claimed, claimed)
    ds.PixelData = bytes(data)
    return _write(path, ds, JPEG2000Lossless, encode(ds))


def j2k_huge_and_agreeing(path: Path, *, side: int = 32767, seed: int = 303) -> Path:
    """A JPEG 2000 Lossless chest DX whose header and tiny codestream agree on ``side`` x
    ``side`` 8-bit pixels (a gigabyte once decoded)."""
    ds = _base(seed)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for keyword in ("WindowCenter", "WindowWidth", "SmallestImagePixelValue",
                    "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = encapsulate([j2k_codestream(side, side)])
    ds["PixelData"].VR = "OB"
    return _write(path, ds, JPEG2000Lossless, encode(ds))


def many_elements(path: Path, *, count: int = 1_000_000, seed: int = 304) -> Path:
    """A chest DX with ``count`` tiny private elements (US, 10 bytes each) in odd groups from
    0x7F01 on, between its other attributes and its pixel data."""
    ds = _base(seed)
    first = 0x7F01
    low, high = _split(ds, first)
    assert all(e.tag.group >= 0x7FE0 for e in high)
    per_group = 0x10000 - 0x1000  # private data elements (gggg,1000)-(gggg,FFFF)
    index = np.arange(count)
    elements = np.zeros(count, dtype=[("group", "<u2"), ("element", "<u2"), ("vr", "S2"),
                                      ("length", "<u2"), ("value", "<u2")])
    elements["group"] = first + 2 * (index // per_group)
    elements["element"] = 0x1000 + index % per_group
    elements["vr"] = b"US"
    elements["length"] = 2
    elements["value"] = index % 0x10000
    assert int(elements["group"][-1]) < 0x7FE0
    return _write(path, ds, ExplicitVRLittleEndian,
                  encode(low) + elements.tobytes() + encode(high))


def send_as_is(path: Path, port: int, *, timeout: float = 30.0,
               calling_ae: str = "MODALITY") -> Sent:
    """C-STORE the file with pynetdicom as its bytes are (its data set is not decoded here:
    pynetdicom's chunked sending), on a context of the file's own transfer syntax."""
    meta = read_file_meta_info(path)  # the data set itself is not read (nor inflated)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    started = time.monotonic()
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
        if not assoc.is_established:
            return Sent(None, time.monotonic() - started)
        try:
            rsp = assoc.send_c_store(path)
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        finally:
            if assoc.is_established:
                assoc.release()
        return Sent(status, time.monotonic() - started)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        ae.shutdown()
