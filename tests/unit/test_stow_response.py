"""dicomai.delivery.stow_client.read_store_response: PS3.18 Store Instances Responses, built
with pydicom and sent through DICOM JSON as an archive would, read per instance."""

from __future__ import annotations

import json

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomai.delivery.stow_client import Verdict, read_store_response

SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
BASE = "http://archive.test/dicom-web"


def _response(study: str, stored: list[tuple[str, str, int | None]],
              failed: list[tuple[str, str, int]]) -> pydicom.Dataset:
    """A Store Instances Response (PS3.18 Table 10.5.3-1), as it comes off the wire."""
    ds = pydicom.Dataset()
    ds.RetrieveURL = f"{BASE}/studies/{study}"
    refs = []
    for cls, uid, warning in stored:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        item.RetrieveURL = f"{BASE}/studies/{study}/series/1.2.3/instances/{uid}"
        if warning is not None:
            item.WarningReason = warning
        refs.append(item)
    fails = []
    for cls, uid, reason in failed:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reason
        fails.append(item)
    if refs:
        ds.ReferencedSOPSequence = refs
    if fails:
        ds.FailedSOPSequence = fails
    wire = json.dumps(ds.to_json_dict())
    return pydicom.Dataset.from_json(wire)


@pytest.fixture
def uids() -> tuple[str, str, str, str]:
    return generate_uid(), generate_uid(), generate_uid(), generate_uid()


def test_200_all_stored(uids):
    study, sr, sc, seg = uids
    rsp = _response(study, [(SR, sr, None), (SC, sc, None), (SEG, seg, 0xB000)], [])
    result = read_store_response(200, rsp, [sr, sc, seg])
    assert result.error is None and not result.auth_problem
    assert {u: v.verdict for u, v in result.instances.items()} == {
        sr: Verdict.STORED, sc: Verdict.STORED, seg: Verdict.STORED}
    assert result.instances[seg].reason == 0xB000  # stored with a warning (coercion)


def test_200_without_a_body_means_all_stored(uids):
    _, sr, sc, _ = uids
    result = read_store_response(200, None, [sr, sc])
    assert all(v.verdict is Verdict.STORED for v in result.instances.values())


def test_202_partial_failure_per_instance(uids):
    study, sr, sc, seg = uids
    rsp = _response(study, [(SR, sr, None)],
                    [(SC, sc, 0xA700), (SEG, seg, 0x0122)])
    result = read_store_response(202, rsp, [sr, sc, seg])
    assert result.instances[sr].verdict is Verdict.STORED
    assert result.instances[sc].verdict is Verdict.RETRY  # out of resources
    assert result.instances[sc].reason == 0xA700
    assert result.instances[seg].verdict is Verdict.CLASS_REFUSED  # SOP class not supported
    assert "0x0122" in result.instances[seg].detail


def test_409_every_instance_failed(uids):
    study, sr, sc, seg = uids
    rsp = _response(study, [], [(SR, sr, 0x0110), (SC, sc, 0xA900), (SEG, seg, 0xC000)])
    result = read_store_response(409, rsp, [sr, sc, seg])
    assert {v.verdict for v in result.instances.values()} == {Verdict.REFUSED}
    assert [result.instances[u].reason for u in (sr, sc, seg)] == [0x0110, 0xA900, 0xC000]
    assert result.instances[sr].detail == "failure reason 0x0110"


@pytest.mark.parametrize("reason", [0x0111, 45070])
def test_an_instance_the_archive_already_holds_is_not_an_error(uids, reason):
    study, sr, sc, _ = uids
    rsp = _response(study, [(SC, sc, None)], [(SR, sr, reason)])
    for status in (202, 409):
        result = read_store_response(status, rsp, [sr, sc])
        assert result.instances[sr].verdict is Verdict.STORED, status
        assert "already held" in result.instances[sr].detail


def test_instances_missing_from_a_partial_answer_are_retried(uids):
    study, sr, sc, seg = uids
    rsp = _response(study, [(SR, sr, None)], [(SC, sc, 0x0110)])
    result = read_store_response(202, rsp, [sr, sc, seg])
    assert result.instances[seg].verdict is Verdict.RETRY
    assert result.instances[seg].detail == "not in the archive's answer"


def test_409_or_202_without_a_readable_response(uids):
    _, sr, sc, _ = uids
    for status in (202, 409):
        result = read_store_response(status, None, [sr, sc])
        assert {v.verdict for v in result.instances.values()} == {Verdict.RETRY}
        assert "without a Store Instances Response" in result.error


@pytest.mark.parametrize(("status", "verdict"), [
    (500, Verdict.RETRY), (502, Verdict.RETRY), (503, Verdict.RETRY), (504, Verdict.RETRY),
    (401, Verdict.RETRY), (403, Verdict.RETRY), (404, Verdict.RETRY), (408, Verdict.RETRY),
    (413, Verdict.RETRY), (429, Verdict.RETRY),
    (400, Verdict.REFUSED), (415, Verdict.REFUSED), (422, Verdict.REFUSED),
])
def test_http_statuses_without_a_response_body(uids, status, verdict):
    _, sr, _, _ = uids
    result = read_store_response(status, None, [sr])
    assert result.instances[sr].verdict is verdict
    assert result.error.startswith(f"HTTP {status}")
    assert result.instances[sr].detail.startswith(f"HTTP {status}")
    assert result.auth_problem is (status in (401, 403))


def test_a_400_with_a_failed_sop_sequence_is_read_per_instance(uids):
    study, sr, sc, _ = uids
    rsp = _response(study, [], [(SR, sr, 0xA700), (SC, sc, 0xC000)])
    result = read_store_response(400, rsp, [sr, sc])
    assert result.instances[sr].verdict is Verdict.RETRY
    assert result.instances[sc].verdict is Verdict.REFUSED
