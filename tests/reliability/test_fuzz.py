"""Property tests: preprocessing of odd images, and the C-STORE handler fed mutated bytes.

Hypothesis runs derandomized (the same examples every run) with a bounded example count.
"""

from __future__ import annotations

import itertools
import os
import struct
import warnings
from collections import Counter
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import select

from dicomai_tools import synthetic
from dicomai.config import PreprocessingSettings, load_settings
from dicomai.runtime.daemon import Daemon
from dicomai.db import Instance
from dicomai.errors import UnsupportedInput
from dicomai.inference.processing import preprocess_ct_slice, preprocess_xray
from dicomai.ops.scu import echo, send_files
from tests.conftest import DEFAULT_CONFIG, running_daemon

pytestmark = pytest.mark.slow

#: Deterministic and bounded; REL_FUZZ_EXAMPLES=1000 searches longer (locally, not in CI).
FUZZ = settings(max_examples=int(os.environ.get("REL_FUZZ_EXAMPLES", "60")), deadline=None,
                derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PRE = PreprocessingSettings(input_size=32, batch_size=4)
DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
ALLOWED_STATUSES = {0x0000, 0xA900, 0xC210, 0xA700}

# -- (a) preprocessing ---------------------------------------------------------------------

#: Decimal String values as a header may carry them: valid, extreme, empty, or not numbers.
DS_TEXT = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda v: f"{v:g}"),
    st.integers(-5000, 5000).map(str),
    st.sampled_from(["0", "-0", "1", "-1", "0.5", "-4096", "1e-30", "1e30", "1e38", "1e308",
                     "-1e308", "1e309", "NaN", "nan", "inf", "-Infinity", "", " ", "abc",
                     "1.2.3", "40\\400", "-40\\0", "\\", "+5", "0x10"]),
)


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a short (2-byte) length."""
    if len(value) % 2:
        value += b" "
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def _encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def image_file(sop_class: str, values: np.ndarray, *, bits_allocated: int = 16,
               bits_stored: int = 16, signed: bool = False, photometric: str = "MONOCHROME2",
               header: dict[int, str] | None = None,
               voi_lut: tuple[list[int], list[int]] | None = None) -> bytes:
    """A DICOM file (bytes); ``values`` is (frames, rows, cols, samples). ``header`` maps
    (0028,xxxx) element numbers of DS attributes to their raw text, written as is."""
    frames, rows, cols, samples = values.shape
    dtype = {8: "<i1" if signed else "<u1", 16: "<i2" if signed else "<u2",
             32: "<i4" if signed else "<u4"}[bits_allocated]
    pixel_bytes = values.astype(dtype).tobytes()
    if len(pixel_bytes) % 2:
        pixel_bytes += b"\x00"
    head = Dataset()
    head.SOPClassUID = sop_class
    head.SOPInstanceUID = "1.2.3.4.5"
    head.Modality = "CT" if sop_class == CT else "DX"
    head.SamplesPerPixel = samples
    head.PhotometricInterpretation = photometric
    if samples == 3:
        head.PlanarConfiguration = 0
    if frames > 1:
        head.NumberOfFrames = frames
    head.Rows, head.Columns = rows, cols
    head.BitsAllocated, head.BitsStored = bits_allocated, bits_stored
    head.HighBit, head.PixelRepresentation = bits_stored - 1, int(signed)
    # (0028,1050)..(0028,1053) are written by hand, so that any text is possible.
    middle = b"".join(_element(0x0028, elem, b"DS", text.encode("latin-1"))
                      for elem, text in sorted((header or {}).items()))
    tail = Dataset()
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor, item.LUTData = voi_lut
        item["LUTDescriptor"].VR = item["LUTData"].VR = "US"
        tail.VOILUTSequence = [item]
    tail.add_new(0x7FE00010, "OB" if bits_allocated == 8 else "OW", pixel_bytes)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + _encode(head) + middle + _encode(tail)


@st.composite
def odd_images(draw: st.DrawFn, sop_class: str) -> bytes:
    """Random geometry, bit depth, signedness, photometric, VOI LUT, rescale and window."""
    bits_allocated = draw(st.sampled_from([8, 16, 32]))
    bits_stored = draw(st.integers(1, bits_allocated))
    signed = draw(st.booleans())
    rows, cols = draw(st.integers(6, 40)), draw(st.integers(6, 40))  # < 8 is refused
    frames = draw(st.sampled_from([1, 1, 1, 2, 3]))
    samples = draw(st.sampled_from([1, 1, 1, 1, 3]))
    photometric = "RGB" if samples == 3 else draw(st.sampled_from(["MONOCHROME1",
                                                                   "MONOCHROME2"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    low, high = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed \
        else (0, (1 << bits_stored) - 1)
    pattern = draw(st.sampled_from(["random", "constant", "extremes"]))
    shape = (frames, rows, cols, samples)
    if pattern == "random":
        values = rng.integers(low, high, size=shape, endpoint=True)
    elif pattern == "constant":
        values = np.full(shape, int(rng.integers(low, high, endpoint=True)))
    else:
        values = rng.choice([low, high], size=shape)
    header = {}
    for elem in (0x1050, 0x1051, 0x1052, 0x1053):  # window centre/width, intercept, slope
        text = draw(st.one_of(st.none(), DS_TEXT, DS_TEXT))
        if text is not None:
            header[elem] = text
    voi_lut = None
    if draw(st.integers(0, 4)) == 0:  # a VOI LUT, sane or not
        entries = draw(st.integers(0, 70))
        voi_lut = ([entries, draw(st.integers(-5, 5)) & 0xFFFF, draw(st.integers(0, 16))],
                   [int(v) for v in rng.integers(0, 65535, size=max(entries, 1))])
    return image_file(sop_class, values, bits_allocated=bits_allocated,
                      bits_stored=bits_stored, signed=signed, photometric=photometric,
                      header=header, voi_lut=voi_lut)


def _check_preprocess(data: bytes, fn, outcomes: Counter[str]) -> None:
    with warnings.catch_warnings():
        # As in production: pydicom's warnings about odd values are not errors.
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(BytesIO(data))
        try:
            out = fn(ds, PRE)
        except UnsupportedInput:
            outcomes["UnsupportedInput"] += 1
            return
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == (3, PRE.input_size, PRE.input_size)
    finite = bool(np.isfinite(out).all())
    outcomes["finite" if finite else "NOT FINITE"] += 1
    assert finite, "non-finite model input: " + _describe(ds)


def _describe(ds: Dataset) -> str:
    keys = ("BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation",
            "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = [f"{k}={ds[k].value!r}" for k in keys if k in ds]
        if "VOILUTSequence" in ds:
            parts.append(f"LUTDescriptor={list(ds.VOILUTSequence[0].LUTDescriptor)}")
    return ", ".join(parts)


@pytest.fixture(scope="module")
def rel_outcomes() -> Iterator[dict[str, Counter[str]]]:
    """How the property examples ended, printed at the end of the module (``pytest -s``)."""
    seen: dict[str, Counter[str]] = {}
    yield seen
    for name, counter in seen.items():
        print(f"\n[fuzz outcomes] {name}: {dict(counter)}")


@FUZZ
@given(data=odd_images(DX))
def test_preprocess_xray_is_finite_or_unsupported(data, rel_outcomes):
    _check_preprocess(data, preprocess_xray, rel_outcomes.setdefault("preprocess_xray",
                                                                      Counter()))


@FUZZ
@given(data=odd_images(CT))
def test_preprocess_ct_slice_is_finite_or_unsupported(data, rel_outcomes):
    _check_preprocess(data, preprocess_ct_slice,
                      rel_outcomes.setdefault("preprocess_ct_slice", Counter()))


WINDOW_CENTER, WINDOW_WIDTH, INTERCEPT, SLOPE = 0x1050, 0x1051, 0x1052, 0x1053
NON_FINITE_CASES = {
    "xray-nan-window-centre": (DX, {WINDOW_CENTER: "NaN", WINDOW_WIDTH: "400"}),
    "xray-inf-window-width": (DX, {WINDOW_CENTER: "40", WINDOW_WIDTH: "1e309"}),
    "xray-slope-overflows-float32": (DX, {SLOPE: "1e38", INTERCEPT: "0"}),
    "xray-nan-slope": (DX, {SLOPE: "nan", INTERCEPT: "0"}),
    "ct-nan-slope": (CT, {SLOPE: "nan", INTERCEPT: "-1024"}),
    "ct-nan-intercept": (CT, {SLOPE: "1", INTERCEPT: "NaN"}),
    "ct-inf-slope": (CT, {SLOPE: "1e309", INTERCEPT: "-1024"}),  # inf * 0 = NaN
}


@pytest.mark.parametrize("case", sorted(NON_FINITE_CASES))
def test_preprocess_non_finite_header_values(case):
    sop_class, header = NON_FINITE_CASES[case]
    values = (np.arange(16 * 16) * 16).reshape(1, 16, 16, 1)
    data = image_file(sop_class, values, bits_stored=12, header=header)
    fn = preprocess_ct_slice if sop_class == CT else preprocess_xray
    _check_preprocess(data, fn, Counter())


# -- (b) the store handler over a real receiver --------------------------------------------


@pytest.fixture(scope="module")
def rel_fuzz_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One receiver-only daemon for the whole module (hypothesis runs many examples)."""
    root = tmp_path_factory.mktemp("fuzz")
    settings_ = load_settings(DEFAULT_CONFIG, environ={}, overrides={
        "general": {"data_dir": str(root / "data")},
        "receiver": {"port": 0, "min_free_disk_mb": 0, "acse_timeout_seconds": 5,
                     "dimse_timeout_seconds": 10, "network_timeout_seconds": 10},
        "scheduler": {"study_quiet_seconds": 3600},
    })
    with running_daemon(settings_, roles=["receiver"]) as daemon:
        yield daemon


def _raw_store(port: int, sop_class: str, sop_uid: str, payload: bytes, tmp: Path) -> int | None:
    """C-STORE arbitrary dataset bytes behind a valid file meta header; returns the status."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path = tmp / "payload.dcm"
    path.write_bytes(buf.getvalue() + payload)
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes without decoding them
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
        assert assoc.is_established, "the receiver stopped accepting associations"
        rsp = assoc.send_c_store(path)
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if assoc.is_established:
            assoc.release()
        return status
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        ae.shutdown()


#: Where in the encoded dataset, as a fraction of its length; squared, so that the header
#: (the first ~60 %, before the 512 bytes of pixel data) is hit more often than the pixels.
AT = st.floats(0, 1).map(lambda f: f * f)
MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("truncate"), AT),
        st.tuples(st.just("flip"), AT, st.integers(1, 255)),
        st.tuples(st.just("insert"), AT, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), AT, st.integers(1, 16)),
        st.tuples(st.just("duplicate"), AT, st.integers(1, 64)),
    ),
    min_size=1, max_size=4,
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for m in mutations:
        at = min(int(m[1] * len(out)), max(len(out) - 1, 0))
        if m[0] == "truncate":
            del out[at:]
        elif m[0] == "flip" and out:
            out[at] ^= m[2]
        elif m[0] == "insert":
            out[at:at] = m[2]
        elif m[0] == "delete":
            del out[at:at + m[2]]
        elif m[0] == "duplicate":
            out[at:at] = out[at:at + m[2]]
    return bytes(out)


def _fully_decodes(path: str) -> bool:
    """Every element of the file converts to a value (as the worker will need)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for _ in pydicom.dcmread(path).iterall():
                pass
        except Exception:
            return False
    return True


def test_store_handler_with_mutated_bytes(rel_fuzz_receiver, tmp_path, rel_report):
    daemon = rel_fuzz_receiver
    port = daemon.receiver.port
    counter = itertools.count()
    seen: Counter[str] = Counter()
    stored: list[str] = []
    undecodable: list[tuple] = []

    @FUZZ
    @given(mutations=MUTATIONS, modality=st.sampled_from(["chest", "ct"]))
    def one(mutations: list[tuple], modality: str) -> None:
        n = next(counter)
        if modality == "chest":
            ds = synthetic.make_xray("chest", rows=16, cols=16, seed=n,
                                     study_uid=synthetic.derive_uid("fuzz", n))
        else:
            ds = synthetic.make_head_ct(1, rows=16, cols=16, seed=n,
                                        study_uid=synthetic.derive_uid("fuzz", n))[0]
        uid = str(ds.SOPInstanceUID)
        status = _raw_store(port, str(ds.SOPClassUID), uid, _mutate(_encode(ds), mutations),
                            tmp_path)
        seen[f"0x{status:04X}" if status is not None else "None"] += 1
        assert status in ALLOWED_STATUSES, f"status {status!r} for {mutations!r}"
        if status == 0x0000:
            stored.append(uid)
            assert daemon.index.has_instance(uid), "answered Success but not indexed"
            path = _stored_path(daemon, uid)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back = pydicom.dcmread(path)  # the file parses
                assert back.SOPInstanceUID == uid
            if not _fully_decodes(path):  # see test_store_refuses_what_it_cannot_decode
                undecodable.append((modality, mutations))

    # As in production, warnings (pydicom reading mangled bytes in the handler threads) are
    # not errors here; they are recorded and reported instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one()
    assert echo("127.0.0.1", port, called_ae="DICOMAI") == 0
    good = synthetic.make_xray("chest", rows=32, cols=32, seed=999_999)
    assert send_files(synthetic.write_study([good], tmp_path / "good"), "127.0.0.1", port,
                      called_ae="DICOMAI").ok
    assert daemon.index.has_instance(str(good.SOPInstanceUID))
    rel_report("C-STORE statuses", dict(seen))
    rel_report("stored (0x0000)", len(stored))
    rel_report("stored but not fully decodable", undecodable)
    rel_report("warnings seen", dict(Counter(f"{type(w.message).__name__}: "
                                             f"{str(w.message)[:50]}" for w in caught)))


@pytest.mark.parametrize("case", ["bad-vr", "odd-length-us"])
def test_store_refuses_what_it_cannot_decode(rel_fuzz_receiver, tmp_path, case):
    """Found by the fuzzer: accepted, but dicomai itself cannot read the instance."""
    ds = synthetic.make_xray("chest", rows=16, cols=16, seed=4242 + len(case))
    raw = _encode(ds)
    if case == "bad-vr":  # WindowCenter (0028,1050) with VR "D\0"
        element = b"\x28\x00\x50\x10DS"
        payload = raw.replace(element, b"\x28\x00\x50\x10D\x00")
    else:  # PixelRepresentation (0028,0103): US of 3 bytes
        element = b"\x28\x00\x03\x01US\x02\x00\x00\x00"
        payload = raw.replace(element, b"\x28\x00\x03\x01US\x03\x00\x00\x00\x00")
    assert element in raw and payload != raw
    uid = str(ds.SOPInstanceUID)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = _raw_store(rel_fuzz_receiver.receiver.port, str(ds.SOPClassUID), uid,
                            payload, tmp_path)
    assert status in ALLOWED_STATUSES
    if status == 0x0000:
        assert _fully_decodes(_stored_path(rel_fuzz_receiver, uid)), \
            "answered Success for an instance that does not decode"


def _stored_path(daemon: Daemon, uid: str) -> str:
    with daemon.queue.session() as s:
        path = s.scalar(select(Instance.path).where(Instance.sop_instance_uid == uid))
    assert path is not None
    return path
