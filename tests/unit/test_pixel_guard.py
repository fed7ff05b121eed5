"""Compressed frames are checked against Rows/Columns and a pixel budget before decoding."""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import pydicom
import pydicom.encaps
import pytest
from pydicom.dataset import Dataset

from dicomai.config import PreprocessingSettings
from dicomai.errors import UnsupportedInput
from dicomai.inference.processing import preprocess_ct_slice, preprocess_xray
from dicomai.ingest.pixel_guard import MAX_FRAME_PIXELS, check_frame, codestream_size
from dicomai.results.display import display_rgb

DATA = Path(__file__).resolve().parents[1] / "data" / "real"
COMPRESSED = [
    "chest_xray/RG1_J2KI.dcm", "extremity_xray/RG3_J2KR.dcm",
    "other/transfer_syntaxes/CT2_J2KI.dcm", "other/transfer_syntaxes/CT2_JLSL.dcm",
    "other/transfer_syntaxes/CT2_JLSN.dcm", "other/transfer_syntaxes/CT2_JPLL.dcm",
    "other/transfer_syntaxes/RG3_JPLY.dcm", "other/transfer_syntaxes/RG3_JLSL.dcm",
]  # fmt: skip


def _frame(ds: Dataset) -> bytes:
    return pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)


def _with_frame(ds: Dataset, frame: bytes) -> Dataset:
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    return ds


def _patched_j2k(rows: int, columns: int) -> Dataset:
    """The real RG3 JPEG 2000 file with its codestream's SIZ claiming rows x columns."""
    ds = pydicom.dcmread(DATA / "extremity_xray/RG3_J2KR.dcm")
    frame = bytearray(_frame(ds))
    at = frame.find(b"\xff\x4f\xff\x51") + 4
    xosiz, yosiz = struct.unpack(">II", frame[at + 12 : at + 20])
    frame[at + 4 : at + 12] = struct.pack(">II", columns + xosiz, rows + yosiz)
    return _with_frame(ds, bytes(frame))


@pytest.mark.parametrize("rel", COMPRESSED)
def test_real_codestreams_agree_with_their_headers(rel: str) -> None:
    ds = pydicom.dcmread(DATA / rel)
    assert codestream_size(_frame(ds)) == (int(ds.Rows), int(ds.Columns))
    check_frame(ds, 0)


def test_rle_and_native_have_no_codestream_header() -> None:
    rle = pydicom.dcmread(DATA / "other/transfer_syntaxes/CT2_RLE.dcm")
    assert codestream_size(_frame(rle)) is None
    check_frame(rle, 0)
    check_frame(pydicom.dcmread(DATA / "head_ct/CT2_UNC.dcm"), 0)


def test_jpeg2000_claiming_more_pixels_is_refused_before_decoding() -> None:
    hostile = _patched_j2k(20000, 20000)
    assert codestream_size(_frame(hostile)) == (20000, 20000)
    with pytest.raises(UnsupportedInput, match="does not match Rows/Columns"):
        check_frame(hostile, 0)
    # Every decoding path refuses it at once, without allocating for 20000 x 20000.
    tracemalloc.start()
    t0 = time.perf_counter()
    for decode in (lambda: preprocess_xray(hostile, PreprocessingSettings()),
                   lambda: display_rgb(hostile, max_side=1024)):
        with pytest.raises(UnsupportedInput):
            decode()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 5.0 and peak < 50 * 2**20


def test_jpeg_frame_header_mismatch_is_refused() -> None:
    ds = pydicom.dcmread(DATA / "other/transfer_syntaxes/RG3_JPLY.dcm")
    frame = bytearray(_frame(ds))
    # Find the SOF segment and double the number of lines it declares.
    pos = 2
    while frame[pos + 1] not in (0xC0, 0xC1, 0xC2, 0xC3):
        pos += 2 + struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
    struct.pack_into(">H", frame, pos + 5, 2 * int(ds.Rows))
    hostile = _with_frame(ds, bytes(frame))
    with pytest.raises(UnsupportedInput, match="does not match"):
        check_frame(hostile, 0)
    with pytest.raises(UnsupportedInput):
        preprocess_xray(hostile, PreprocessingSettings())


def test_frames_beyond_the_pixel_budget_are_refused() -> None:
    ds = pydicom.dcmread(DATA / "head_ct/CT2_UNC.dcm")
    ds.Rows = ds.Columns = 40000  # 1.6e9 pixels: refused from the header alone
    assert 40000 * 40000 > MAX_FRAME_PIXELS
    with pytest.raises(UnsupportedInput, match="larger than the decoding limit"):
        check_frame(ds, 0)
    with pytest.raises(UnsupportedInput):
        preprocess_ct_slice(ds, PreprocessingSettings())
    # A 14-bit 4300 x 3500 mammogram is well inside it.
    ds.Rows, ds.Columns = 4300, 3500
    check_frame(ds, 0, max_pixels=MAX_FRAME_PIXELS)


def test_truncated_codestream_header_is_refused() -> None:
    ds = pydicom.dcmread(DATA / "extremity_xray/RG3_J2KR.dcm")
    frame = _frame(ds)
    at = frame.find(b"\xff\x4f\xff\x51")
    with pytest.raises(UnsupportedInput, match="truncated"):
        check_frame(_with_frame(ds, frame[: at + 10] + b"\x00\x00"), 0)
