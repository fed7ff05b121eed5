"""STOW-RS body parsing and response: Part 10 file meta, multipart parts as they stream in,
the PS3.18 response data set and HTTP status."""

from __future__ import annotations

import json

import pytest

from dicomai_tools import synthetic
from dicomai.ingest.part10 import Incomplete, NotPart10, read_file_meta
from dicomai.ingest.stow_parts import (
    BadRequest,
    PartProblem,
    PartReader,
    UnsupportedMediaType,
    boundary_of,
    parse_content_type,
)
from dicomai.ingest.stow_response import Outcome, failure_reason, http_status, response_body
from tests.stow_client import BOUNDARY, body, closing, part, part10


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    return [part10(ds) for ds in synthetic.make_head_ct(3, rows=32, cols=32, seed=5)]


def test_file_meta_read_from_a_growing_prefix(blobs):
    blob = blobs[0]
    meta = read_file_meta(blob)
    assert meta is not Incomplete.MORE
    assert meta.transfer_syntax == "1.2.840.10008.1.2.1"
    assert meta.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert blob[meta.dataset_offset:meta.dataset_offset + 2] == b"\x08\x00"  # group 0008
    for n in range(0, meta.dataset_offset, 7):
        assert read_file_meta(blob[:n]) is Incomplete.MORE
    no_preamble = read_file_meta(blob[132:])
    assert no_preamble.sop_instance_uid == meta.sop_instance_uid
    assert no_preamble.dataset_offset == meta.dataset_offset - 132


@pytest.mark.parametrize("data, why", [
    (b"x" * 300, "no DICM"),
    (b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00ab" + b"\x00" * 50, "not Explicit VR"),
    (b"\x00" * 128 + b"DICM" + b"\x08\x00\x05\x00CS\x00\x00" + b"\x00" * 50, "no UIDs"),
])
def test_not_part10(data, why):
    with pytest.raises(NotPart10):
        read_file_meta(data)


def test_file_cut_within_its_meta_is_not_part10_at_the_end(blobs):
    with pytest.raises(NotPart10):
        read_file_meta(blobs[0][:200], final=True)


def _feed(reader: PartReader, data: bytes, step: int) -> list:
    out = []
    for i in range(0, len(data), step):
        out += reader.feed(data[i:i + step])
    return out


@pytest.mark.parametrize("step", [1, 3, 64, 1000, 10**9])
def test_parts_whatever_the_chunking(blobs, step):
    data = b"".join(body(blobs))
    reader = PartReader(BOUNDARY.encode(), max_part_bytes=10**9)
    parts = _feed(reader, data, step)
    reader.finish()
    assert [p.index for p in parts] == [0, 1, 2]
    for p, blob in zip(parts, blobs, strict=True):
        assert p.problem is None
        assert p.size == len(blob)
        assert p.dataset.getvalue() == blob[p.meta.dataset_offset:]
        assert p.meta.sop_instance_uid == read_file_meta(blob).sop_instance_uid


def test_preamble_skipped_and_missing_part_type_accepted(blobs):
    data = b"this is a MIME preamble\r\n" + b"".join(
        part(b, content_type=None) for b in blobs[:2]) + closing()
    reader = PartReader(BOUNDARY.encode(), max_part_bytes=10**9)
    parts = _feed(reader, data, 100)
    reader.finish()
    assert [p.problem for p in parts] == [None, None]


def test_cut_body_yields_only_complete_parts(blobs):
    data = b"".join(body(blobs))
    cut = data.index(blobs[2]) + 1000  # within the third part's data set
    reader = PartReader(BOUNDARY.encode(), max_part_bytes=10**9)
    parts = _feed(reader, data[:cut], 4096)
    assert len(parts) == 2
    with pytest.raises(BadRequest):
        reader.finish()
    # Cut right after a part's data, before its closing delimiter: not complete either.
    reader = PartReader(BOUNDARY.encode(), max_part_bytes=10**9)
    first = part(blobs[0])
    assert reader.feed(first[:-2]) == []
    with pytest.raises(BadRequest):
        reader.finish()


def test_part_problems(blobs):
    data = (part(b"not dicom at all" * 20) + part(blobs[0], content_type="application/json")
            + part(blobs[1]) + part(b"") + closing())
    reader = PartReader(BOUNDARY.encode(), max_part_bytes=len(blobs[0]) - 1)
    parts = _feed(reader, data, 512)
    reader.finish()
    assert [p.problem for p in parts] == [PartProblem.NOT_DICOM, PartProblem.MEDIA_TYPE,
                                          PartProblem.TOO_LARGE, PartProblem.NOT_DICOM]
    assert all(p.dataset is None for p in parts)
    assert parts[2].meta is not None  # a part too large still names its instance


@pytest.mark.parametrize("data", [b"garbage without boundary" * 5000,
                                  f"--{BOUNDARY}\r\nbroken header line\r\n\r\n".encode()])
def test_malformed_bodies(data):
    reader = PartReader(BOUNDARY.encode(), max_part_bytes=10**9)
    with pytest.raises(BadRequest):
        _feed(reader, data, 1000)
        reader.finish()


def test_content_types():
    assert boundary_of('multipart/related; type="application/dicom"; boundary=abc') == b"abc"
    assert boundary_of('Multipart/Related; boundary="a b;c"; type=application/dicom') == b"a b;c"
    assert boundary_of("multipart/related; boundary=abc") == b"abc"  # type left out
    for bad in (None, "", "application/dicom", "multipart/form-data; boundary=abc",
                'multipart/related; type="application/dicom+json"; boundary=abc'):
        with pytest.raises(UnsupportedMediaType):
            boundary_of(bad)
    with pytest.raises(BadRequest):
        boundary_of('multipart/related; type="application/dicom"')
    long = "e248bc21-c43f-4500-b676-ee4e3ded85a1-e248bc21-c43f-4500-b676-ee4e3ded85a1"
    assert boundary_of(f"multipart/related; boundary={long}") == long.encode()  # Orthanc's
    ct = parse_content_type('a/b; x="q\\"uoted"; Y=2')
    assert ct.media_type == "a/b" and ct.params == {"x": 'q"uoted', "y": "2"}


def test_failure_reasons():
    assert failure_reason(0xA700) == 0xA700
    assert failure_reason(0xA900) == 0xA900
    assert failure_reason(0xC210) == 0xC000
    assert failure_reason(0xC220) == 0xC000
    assert failure_reason(0xC122) == 0xC122
    assert failure_reason(0x0122) == 0x0122
    assert failure_reason(0x0211) == 0x0110


def test_response_and_status():
    ok = Outcome("1.2.3", "1.2.3.4")
    bad = Outcome("1.2.3", "1.2.3.5", 0xA900)
    full = Outcome("1.2.3", "1.2.3.6", 0xA700)
    assert http_status([ok, ok]) == 200
    assert http_status([ok, bad]) == 202
    assert http_status([bad, full]) == 409
    assert http_status([full, full]) == 503
    data = json.loads(response_body([ok, bad]))
    assert data["00081199"] == {"vr": "SQ", "Value": [
        {"00081150": {"vr": "UI", "Value": ["1.2.3"]},
         "00081155": {"vr": "UI", "Value": ["1.2.3.4"]}}]}
    assert data["00081198"]["Value"][0]["00081197"] == {"vr": "US", "Value": [0xA900]}
    assert "00081198" not in json.loads(response_body([ok]))
    assert "00081199" not in json.loads(response_body([bad]))
