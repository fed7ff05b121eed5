"""dicomai.ingest.file_limits: what a received data set may cost, checked from its bytes and
header values (crafted bytes; nothing is decoded)."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.filereader import read_dataset as pydicom_read
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from dicomai.config import ReceiverSettings
from dicomai.ingest import file_limits as fl
from dicomai.ingest.file_limits import FileLimits, LimitExceeded, check_pixels, inflate, scan
from dicomai.ingest.pixel_guard import first_fragment
from tests import file_bombs as bombs

DATA = Path(__file__).resolve().parents[1] / "data" / "real"
MIB = 1 << 20


def _dataset_bytes(path: Path) -> tuple[bytes, UID]:
    """The data set bytes of a Part 10 file (after its file meta) and its transfer syntax."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    fp = BytesIO(raw)
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)  # test-only: where the data set starts
    return raw[fp.tell():], UID(ds.file_meta.TransferSyntaxUID)


def _walk(data: bytes, *, elements: int = 10**8, depth: int = 10**4, implicit: bool = False,
          little: bool = True) -> str | None:
    return scan(data, implicit_vr=implicit, little_endian=little, max_elements=elements,
                max_depth=depth)


def _count(data: bytes, **kw: bool) -> int:
    """The number of elements, items and fragments :func:`scan` counts in ``data``."""
    lo, hi = 0, 10**8
    while lo < hi:
        mid = (lo + hi) // 2
        if _walk(data, elements=mid, **kw) is None:
            hi = mid
        else:
            lo = mid + 1
    return lo


# -- configuration --------------------------------------------------------------------------


def test_limits_come_from_the_receiver_section_with_safe_defaults() -> None:
    defaults = FileLimits.from_settings(ReceiverSettings())
    assert defaults == FileLimits()
    assert defaults.max_inflated_bytes == 512 * MIB
    assert (defaults.max_elements, defaults.max_nesting_depth) == (250_000, 32)
    # Room for real modalities: a 14-bit 4300 x 3500 mammogram, a 3000-frame 512 x 512
    # enhanced CT (16 bits allocated).
    assert 4300 * 3500 <= defaults.max_frame_pixels
    assert 3000 * 512 * 512 * 2 <= defaults.max_pixel_data_bytes
    custom = FileLimits.from_settings(ReceiverSettings(
        max_inflated_mb=1, max_elements=5000, max_nesting_depth=4, max_frame_megapixels=2,
        max_pixel_data_mb=3))
    assert custom == FileLimits(max_inflated_bytes=MIB, max_elements=5000, max_nesting_depth=4,
                                max_frame_pixels=2_000_000, max_pixel_data_bytes=3 * MIB)
    for bad in ({"max_inflated_mb": 0}, {"max_elements": 10}, {"max_nesting_depth": 0},
                {"max_nesting_depth": 1000}, {"max_frame_megapixels": 0},
                {"max_pixel_data_mb": -1}):
        with pytest.raises(ValueError):
            ReceiverSettings(**bad)


def test_statuses_of_the_reason_codes() -> None:
    for reason in ("inflated_too_large", "too_many_elements", "nesting_too_deep",
                   "frame_too_large", "pixel_data_too_large"):
        assert fl.status_for(reason) == 0xC220
        assert LimitExceeded(reason).status == 0xC220
    assert fl.status_for("codestream_mismatch") == 0xA900
    assert fl.status_for("undecodable") is None


# -- inflating ------------------------------------------------------------------------------


def test_deflated_data_set_inflates_as_zlib_does() -> None:
    ds = bombs.header(1, pixels=True)
    data = bombs.deflated(ds)
    assert inflate(data, 512 * MIB).getvalue() == bombs.encode(ds)
    # Exactly at the limit is allowed, one byte less refused.
    size = len(bombs.encode(ds))
    assert len(inflate(data, size).getvalue()) == size
    with pytest.raises(LimitExceeded) as refused:
        inflate(data, size - 1)
    assert refused.value.reason == "inflated_too_large"
    with pytest.raises(zlib.error):
        inflate(data[: len(data) // 2], 512 * MIB)  # cut before its last block
    with pytest.raises(zlib.error):
        inflate(b"\xff" * 64, 512 * MIB)


def test_deflate_bomb_is_refused_without_holding_what_it_inflates_to() -> None:
    bomb = bombs.deflate_bomb(bombs.header(2), 1 << 30)  # about 1 MB inflating to 1 GiB
    assert len(bomb) < 1.1 * MIB
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded) as refused:
            inflate(bomb, 64 * MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.reason == "inflated_too_large"
    assert peak < 8 * MIB  # one output chunk at a time, never the inflated bytes
    # The same through read_dataset, as the receiver calls it.
    with pytest.raises(LimitExceeded):
        fl.read_dataset(BytesIO(bomb), UID(DeflatedExplicitVRLittleEndian),
                        FileLimits(max_inflated_bytes=64 * MIB))


def test_read_dataset_inflates_a_deflated_data_set_within_the_limit() -> None:
    ds = bombs.header(3, pixels=True)
    got = fl.read_dataset(BytesIO(bombs.deflated(ds)), UID(DeflatedExplicitVRLittleEndian),
                          FileLimits())
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.PixelData == ds.PixelData


# -- element count and nesting ------------------------------------------------------------------


def test_real_files_pass_and_their_elements_are_counted() -> None:
    files = sorted(DATA.rglob("*.dcm"))
    assert len(files) > 10
    for path in files:
        data, syntax = _dataset_bytes(path)
        kw = {"implicit": syntax.is_implicit_VR, "little": syntax.is_little_endian}
        assert _walk(data, elements=250_000, depth=32, **kw) is None, path.name
        ds = pydicom.dcmread(path)
        # At least every element pydicom sees (items and fragments count too).
        assert _count(data, **kw) >= sum(1 for _ in ds.iterall()), path.name
        got = fl.read_dataset(BytesIO(data), syntax, FileLimits())
        assert set(got.keys()) == set(ds.keys()), path.name


def test_element_bomb_is_refused_at_the_limit_quickly() -> None:
    bomb = bombs.element_bomb(bombs.header(4), 10**6)
    assert 9 * MIB < len(bomb) < 11 * MIB
    t0 = time.perf_counter()
    with pytest.raises(LimitExceeded) as refused:
        fl.read_dataset(BytesIO(bomb), UID(ExplicitVRLittleEndian), FileLimits())
    assert refused.value.reason == "too_many_elements"
    assert time.perf_counter() - t0 < 10.0  # a correctness bound: it stops at the limit
    # Nested elements count too: the same elements inside one sequence item.
    tiny = bombs.element_bomb(bombs.header(4), 3000)[len(bombs.encode(bombs.header(4))):]
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(tiny)) + tiny
    sequence = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    assert _walk(sequence, elements=2999) == "too_many_elements"
    assert _walk(sequence, elements=3002) is None  # the sequence, its item, 3000 inside


def test_short_data_sets_are_not_walked_before_parsing() -> None:
    # Shorter than 8 bytes per allowed element: it cannot hold too many.
    ds = bombs.header(5)
    data = bombs.element_bomb(ds, 400)
    limits = FileLimits(max_elements=len(data) // 8 + 1)
    assert fl.read_dataset(BytesIO(data), UID(ExplicitVRLittleEndian), limits) is not None
    limits = FileLimits(max_elements=300)  # now long enough to be walked, and too many
    with pytest.raises(LimitExceeded, match="too_many_elements"):
        fl.read_dataset(BytesIO(data), UID(ExplicitVRLittleEndian), limits)


@pytest.mark.parametrize("defined", [False, True])
@pytest.mark.parametrize("implicit", [False, True])
def test_nesting_depth(defined: bool, implicit: bool) -> None:
    kw = {"implicit": implicit}
    assert _walk(bombs.nested(32, defined=defined, implicit=implicit), depth=32, **kw) is None
    assert _walk(bombs.nested(33, defined=defined, implicit=implicit), depth=32,
                 **kw) == "nesting_too_deep"
    syntax = UID(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    ok = fl.read_dataset(BytesIO(bombs.nested(32, defined=defined, implicit=implicit)),
                         syntax, FileLimits())
    assert "ContentSequence" in ok
    # Short data sets: refused after parsing, from their item count outside the pixel data.
    for depth in (33, 150, 400):  # 400: beyond what pydicom's recursion can parse
        with pytest.raises(LimitExceeded, match="nesting_too_deep"):
            fl.read_dataset(BytesIO(bombs.nested(depth, defined=defined, implicit=implicit)),
                            syntax, FileLimits())


def test_nesting_after_the_pixel_data_is_found() -> None:
    ds = bombs.header(6, pixels=True)
    deep = bombs.nested(40).replace(struct.pack("<HH", 0x0040, 0xA730),
                                    struct.pack("<HH", 0x7FE1, 0x1010))
    data = bombs.encode(ds) + bombs.element(0x7FE1, 0x0010, b"LO", b"DICOMAI TEST") + deep
    with pytest.raises(LimitExceeded, match="nesting_too_deep"):
        fl.read_dataset(BytesIO(data), UID(ExplicitVRLittleEndian), FileLimits())
    # Item tags inside the pixel data are not nesting.
    ds.PixelData = struct.pack("<HHI", 0xFFFE, 0xE000, 0) * (len(ds.PixelData) // 8)
    assert fl.read_dataset(BytesIO(bombs.encode(ds)), UID(ExplicitVRLittleEndian),
                           FileLimits()) is not None


def test_big_endian_and_un_sequences_are_walked() -> None:
    ds = bombs.header(7, pixels=True)
    big = bombs.encode(ds, little=False)
    assert _walk(big, little=False, elements=250_000, depth=32) is None
    assert _count(big, little=False) == _count(bombs.encode(ds))
    # A sequence sent as UN (explicit VR) holds Implicit VR Little Endian items.
    inner = bombs.nested(40, implicit=True)
    un = struct.pack("<HH2sHI", 0x0040, 0xA730, b"UN", 0, 0xFFFFFFFF) + inner[8:]
    assert _walk(un, depth=32) == "nesting_too_deep"
    assert _walk(un) is None
    # Read through read_dataset as well (big endian).
    assert fl.read_dataset(BytesIO(big), UID(ExplicitVRBigEndian), FileLimits()).Rows == 32


def test_garbage_stops_the_walk_and_is_left_to_the_parser() -> None:
    assert _walk(b"") is None
    assert _walk(b"\x00not dicom at all\xff" * 7) is None
    assert _walk(bombs.encode(bombs.header(8))[:301]) is None
    # A sequence cut before its delimiter: the parser's error, not a limit.
    cut = (struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
           + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + b"\x08\x00")
    with pytest.raises(Exception) as raised:
        fl.read_dataset(BytesIO(cut), UID(ExplicitVRLittleEndian), FileLimits())
    assert not isinstance(raised.value, LimitExceeded)


def test_reading_within_limits_gives_what_pydicom_gives() -> None:
    ds = bombs.header(9, pixels=True)
    data = bombs.encode(ds)
    got = fl.read_dataset(BytesIO(data), UID(ExplicitVRLittleEndian), FileLimits())
    want = pydicom_read(BytesIO(data), False, True)
    assert got == want


# -- pixels ---------------------------------------------------------------------------------


def _pixels(rows: int, columns: int, *, frames: int = 1, samples: int = 1, bits: int = 16,
            syntax: str = ExplicitVRLittleEndian, data: bytes | None = None,
            limits: FileLimits = FileLimits()) -> str | None:
    return check_pixels(rows=rows, columns=columns, frames=frames, samples=samples,
                        bits_allocated=bits, transfer_syntax=UID(syntax), pixel_data=data,
                        limits=limits)


def test_pixel_budget() -> None:
    assert _pixels(4300, 3500) is None  # mammogram
    assert _pixels(512, 512, frames=3000) is None  # enhanced CT
    assert _pixels(32767, 32767) == "frame_too_large"
    assert _pixels(10000, 10000, samples=3) == "frame_too_large"
    assert _pixels(64, 64, frames=10**9) == "pixel_data_too_large"
    assert _pixels(1024, 1024, frames=3000, bits=16) == "pixel_data_too_large"  # 6 GiB
    small = FileLimits(max_frame_pixels=1000, max_pixel_data_bytes=2000)
    assert _pixels(31, 32, limits=small, bits=8) is None
    assert _pixels(32, 32, limits=small, bits=8) == "frame_too_large"
    assert _pixels(31, 32, frames=3, limits=small, bits=8) == "pixel_data_too_large"


def test_codestream_size_is_checked_from_the_first_fragment() -> None:
    stream = bombs.j2k_codestream(64, 48)
    fragments = encapsulate([stream])
    assert first_fragment(fragments) == stream[: len(first_fragment(fragments) or b"")]
    assert _pixels(64, 48, bits=8, syntax=JPEG2000Lossless, data=fragments) is None
    assert _pixels(48, 64, bits=8, syntax=JPEG2000Lossless,
                   data=fragments) == "codestream_mismatch"
    claims = bombs.j2k_codestream(64, 48, claim=(20000, 20000))
    assert _pixels(2048, 2048, bits=8, syntax=JPEG2000Lossless,
                   data=encapsulate([claims])) == "codestream_mismatch"
    # With a Basic Offset Table, and a frame split over fragments.
    two = encapsulate([stream, stream], has_bot=True)
    assert _pixels(64, 48, frames=2, bits=8, syntax=JPEG2000Lossless, data=two) is None
    split = encapsulate([claims], fragments_per_frame=3)
    assert _pixels(2048, 2048, bits=8, syntax=JPEG2000Lossless,
                   data=split) == "codestream_mismatch"
    # A header cut by its fragment's end, or no fragment at all, is left to later checks.
    cut = (struct.pack("<HHI", 0xFFFE, 0xE000, 0)
           + struct.pack("<HHI", 0xFFFE, 0xE000, 10) + claims[:10])
    assert _pixels(2048, 2048, bits=8, syntax=JPEG2000Lossless, data=cut) is None
    assert _pixels(2048, 2048, bits=8, syntax=JPEG2000Lossless, data=b"\x00" * 16) is None
    assert first_fragment(b"\x00" * 16) is None
    # Native pixel data is never read as a codestream.
    assert _pixels(2048, 2048, bits=8, data=encapsulate([claims])) is None


def test_real_jpeg_and_jpeg_ls_frames_match_their_headers() -> None:
    for rel in ("other/transfer_syntaxes/RG3_JPLY.dcm", "other/transfer_syntaxes/CT2_JLSL.dcm",
                "extremity_xray/RG3_J2KR.dcm"):
        ds = pydicom.dcmread(DATA / rel)
        rows, columns = int(ds.Rows), int(ds.Columns)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        assert _pixels(rows, columns, bits=int(ds.BitsAllocated), syntax=syntax,
                       data=ds.PixelData) is None, rel
        assert _pixels(rows + 1, columns, bits=int(ds.BitsAllocated), syntax=syntax,
                       data=ds.PixelData) == "codestream_mismatch", rel


def test_check_config_validates_and_shows_the_limits(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from dicomai.ops import cli

    bad = tmp_path / "bad.toml"
    bad.write_text("[receiver]\nmax_nesting_depth = 0\n")
    assert cli.main(["--config", str(bad), "check-config"]) == 3
    assert "receiver.max_nesting_depth" in capsys.readouterr().err
    bad.write_text("[worker]\ndecode_timeout_seconds = 0\n")
    assert cli.main(["--config", str(bad), "check-config"]) == 3
    assert "worker.decode_timeout_seconds" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text("[receiver]\nmax_elements = 100000\nmax_frame_megapixels = 1000\n")
    assert cli.main(["--config", str(good), "check-config"]) == 0
    out = capsys.readouterr()
    assert "file limits: inflated 512 MiB, 100000 elements, nesting 32, frame 1000 Mpixel, " \
           "pixel data 4096 MiB" in out.out
    assert "decoding: 1 process(es), 4096 MiB and 120 s per image" in out.out
    assert "needs about 5722 MiB to decode" in out.err  # a warning, not an error
