"""Tests of dicomai.inference.decode: reduced-resolution JPEG 2000 / JPEG baseline decoding and its use in
X-ray preprocessing (matches a full decode + resize; falls back to a full decode)."""

from __future__ import annotations

import copy
import io
from functools import cache

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from dicomai.inference import decode

from dicomai.inference import processing as inference
from dicomai.config import PreprocessingSettings
from dicomai.inference.decode import J2KHeader, align, decode_reduced, j2k_header, j2k_level
from dicomai.errors import UnsupportedInput
from dicomai.inference.processing import preprocess_xray, resize
from dicomai_tools.synthetic import make_xray, recompress

PRE = PreprocessingSettings(input_size=96)
STD = np.asarray(PRE.normalize_std, dtype=np.float32)[:, None, None]


@cache
def _chest(monochrome1: bool = False) -> Dataset:
    """A 640×800 (rows×columns) chest radiograph, 12 bits stored, native."""
    return make_xray("chest", rows=640, cols=800, seed=3, monochrome1=monochrome1)


def _j2k(ds: Dataset, syntax: str = JPEG2000Lossless) -> Dataset:
    return recompress(ds, syntax)


def _full(ds: Dataset) -> np.ndarray:
    """What the existing path decodes: the whole frame."""
    return np.asarray(ds.pixel_array)


def _without_reduction(ds: Dataset) -> np.ndarray:
    """preprocess_xray as it was: the full frame, always."""
    saved = inference.decode_reduced
    inference.decode_reduced = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        return preprocess_xray(ds, PRE)
    finally:
        inference.decode_reduced = saved


def _grey_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of two model inputs in [0, 1] grey levels."""
    return np.abs(a - b) * STD


def _signed(value_grid: np.ndarray, bits_stored: int = 16) -> Dataset:
    """A signed CT-like image (PixelRepresentation 1), JPEG 2000 lossless."""
    ds = copy.deepcopy(_chest())
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1
    ds.Rows, ds.Columns = value_grid.shape
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.PixelData = value_grid.astype("<i2").tobytes()
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    return ds


# -- header and level choice ------------------------------------------------------------------
def test_header_of_encoded_image() -> None:
    ds = _j2k(_chest())
    header = j2k_header(get_frame(ds.PixelData, 0, number_of_frames=1))
    assert header is not None
    assert (header.rows, header.columns) == (640, 800)
    assert header.precision == 12 and not header.signed
    assert header.levels >= 3


def test_header_refuses_other_data() -> None:
    assert j2k_header(b"") is None
    assert j2k_header(b"\x00\x00\x00\x0cjP  \r\n\x87\n") is None  # a JP2 file, not a codestream
    assert j2k_header(b"\xff\x4f\xff\x51\x00") is None  # truncated


def test_level_keeps_the_short_side_and_pillows_rounding() -> None:
    header = J2KHeader(columns=2500, rows=2000, x_offset=0, y_offset=0, precision=12,
                       signed=False, levels=5)
    assert header.reduced_size(3) == (250, 313)
    assert j2k_level(header, 448) == 2
    assert j2k_level(header, 224) == 3
    # Level 4 would keep 125 rows, but 2500 columns give ceil 157 where Pillow computes 156.
    assert j2k_level(header, 100) == 3
    assert j2k_level(header, 2000) == 0
    assert j2k_level(J2KHeader(columns=2048, rows=2048, x_offset=0, y_offset=0, precision=12,
                               signed=False, levels=2), 64) == 2


# -- reduced decoding -------------------------------------------------------------------------
@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEG2000])
def test_reduced_matches_full_decode_and_resize(syntax: str) -> None:
    ds = _j2k(_chest(), syntax)
    reduced = decode_reduced(ds, 150)
    assert reduced is not None
    assert reduced.scale == 4 and reduced.pixels.shape == (160, 200)
    assert reduced.pixels.dtype == np.uint16
    full = _full(ds).astype(np.float32)
    span = float(full.max() - full.min())
    a = resize(full, 64)[0]
    b = resize(align(reduced.pixels.astype(np.float32), reduced.phase), 64)[0]
    diff = np.abs(a - b) / span
    assert diff.mean() < 0.003 and diff.max() < 0.03


def test_constant_image_keeps_values_exactly() -> None:
    flat = np.full((256, 320), 3001, dtype=np.uint16)
    ds = copy.deepcopy(_chest())
    ds.Rows, ds.Columns = flat.shape
    ds.PixelData = flat.tobytes()
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    reduced = decode_reduced(ds, 64)
    assert reduced is not None and reduced.scale == 4
    assert (reduced.pixels == 3001).all()


@pytest.mark.parametrize("bits_stored", [16, 12])
def test_signed_pixels(bits_stored: int) -> None:
    values = np.full((256, 256), -1000, dtype=np.int16)
    values[:, 128:] = 1500
    values[:8, :8] = -2048 if bits_stored == 12 else -30000
    ds = _signed(values, bits_stored)
    reduced = decode_reduced(ds, 64)
    assert reduced is not None
    assert reduced.pixels.dtype == np.int16 and reduced.pixels.shape == (64, 64)
    assert (reduced.pixels[8:, 2:30] == -1000).all()
    assert (reduced.pixels[:, 34:] == 1500).all()
    assert reduced.pixels.min() < -1000


def test_monochrome1_preprocess_matches_full_path() -> None:
    ds = _j2k(_chest(monochrome1=True))
    reduced, full = preprocess_xray(ds, PRE), _without_reduction(ds)
    diff = _grey_diff(reduced, full)
    assert diff.mean() < 0.003 and diff.max() < 0.04
    mono2 = preprocess_xray(_j2k(_chest()), PRE)
    # Inverted display: bright bone in MONOCHROME2 is bright after inversion of MONOCHROME1.
    assert np.corrcoef(reduced[0].ravel(), mono2[0].ravel())[0, 1] > 0.95


def test_preprocess_uses_reduced_decode_and_stays_close() -> None:
    ds = _j2k(_chest())
    out = preprocess_xray(ds, PRE)
    assert out.shape == (3, 96, 96) and out.dtype == np.float32
    assert decode_reduced(ds, 2 * PRE.input_size) is not None  # 640 rows: level 1 (320 rows)
    diff = _grey_diff(out, _without_reduction(ds))
    assert diff.mean() < 0.003 and diff.max() < 0.04


def test_jpeg_baseline_draft() -> None:
    ds = copy.deepcopy(_chest())
    grey8 = (_full(ds).astype(np.float32) / 16).round().clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey8).save(buf, "JPEG", quality=95)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.WindowCenter, ds.WindowWidth = "128", "256"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    reduced = decode_reduced(ds, 150)
    assert reduced is not None and reduced.scale == 4 and reduced.phase == 0.0
    assert reduced.pixels.shape == (160, 200) and reduced.pixels.dtype == np.uint8
    a = resize(_full(ds).astype(np.float32), 64)[0]
    b = resize(reduced.pixels.astype(np.float32), 64)[0]
    assert (np.abs(a - b) / 255).mean() < 0.005


# -- fallback ---------------------------------------------------------------------------------
def test_other_syntaxes_are_not_reduced() -> None:
    assert decode_reduced(_chest(), 64) is None
    assert _chest().file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert decode_reduced(recompress(_chest(), RLELossless), 64) is None


def test_too_small_is_decoded_in_full() -> None:
    assert decode_reduced(_j2k(_chest()), 400) is None  # 640 rows: level 1 keeps only 320


def test_corrupt_codestream_falls_back() -> None:
    ds = _j2k(_chest())
    codestream = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    header_end = codestream.index(b"\xff\x90")  # first tile-part: keep the main header
    codestream[header_end + 200:] = b"\x00" * (len(codestream) - header_end - 200)
    ds.PixelData = encapsulate([bytes(codestream)])
    assert decode_reduced(ds, 150) is None
    with pytest.raises(UnsupportedInput):
        preprocess_xray(ds, PRE)  # the full decode fails too: a clean refusal


def test_decoder_failure_falls_back_to_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _j2k(_chest())
    expected = _without_reduction(ds)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("decoder gone")

    monkeypatch.setattr(decode, "_j2k_reduced", broken)
    assert decode_reduced(ds, 150) is None
    np.testing.assert_array_equal(preprocess_xray(ds, PRE), expected)


def test_signedness_mismatch_falls_back() -> None:
    ds = _j2k(_chest())
    ds.PixelRepresentation = 1  # the codestream says unsigned: let pydicom decide
    assert decode_reduced(ds, 150) is None
