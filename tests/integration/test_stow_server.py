"""The DICOMweb STOW-RS receiver in a running daemon, with a raw HTTP client over loopback.

Every request is real HTTP to the daemon's [dicomweb] port (port 0), every instance goes through
the receiver's store path; what is stored is read back from the database and the spool.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from dicomai_tools import synthetic
from dicomai.db import Instance, QuarantineEntry, Study
from dicomai.ingest.part10 import read_file_meta
from dicomai.ingest.store_instance import file_meta_bytes
from dicomai.ops.health import check_health
from dicomai.ops.status import collect
from dicomai.ops.status_view import render_text
from tests.conftest import DEFAULT_CONFIG, free_port, running_daemon
from tests.stow_client import (
    BOUNDARY,
    CONTENT_TYPE,
    body,
    closing,
    part,
    part10,
    post,
    post_cut,
)
from tests.waiting import let_time_pass, wait_until

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _stored(daemon, study_uid: str | None = None) -> dict[str, tuple[str, str]]:
    """SOP instance UID → (calling AE, path) of the instances indexed (of one study)."""
    with daemon.queue.session() as s:
        q = select(Instance.sop_instance_uid, Instance.calling_ae_title, Instance.path)
        if study_uid is not None:
            q = q.join(Study, Study.id == Instance.study_id).where(
                Study.study_instance_uid == study_uid)
        return {uid: (ae, path) for uid, ae, path in s.execute(q).all()}


def _quarantined(daemon) -> list[str]:
    with daemon.queue.session() as s:
        return list(s.scalars(select(QuarantineEntry.reason)))


@pytest.fixture
def stow_settings(make_settings, local_pacs):
    """Settings with [dicomweb] on (port 0); sections override as for make_settings."""

    def make(**dicomweb):
        return make_settings(local_pacs.port, dicomweb={"enabled": True, "port": 0, **dicomweb})

    return make


def test_stored_like_a_cstore_and_reported(stow_settings, tmp_path):
    settings = stow_settings()
    ct = synthetic.make_head_ct(6, rows=64, cols=64, seed=171)
    study = ct[0].StudyInstanceUID
    uids = [str(ds.SOPInstanceUID) for ds in ct]
    with running_daemon(settings, roles=("receiver",)) as daemon:
        port = daemon.dicomweb.port
        answer = post(port, body(part10(ds) for ds in ct))
        assert answer.status == 200, answer.raw[:500]
        assert answer.headers["content-type"] == "application/dicom+json"
        assert answer.stored == uids and answer.failed == {}
        stored = _stored(daemon, study)
        assert set(stored) == set(uids)
        for uid, (calling_ae, path) in stored.items():
            assert calling_ae == "DICOMWEB"
            ds = pydicom.dcmread(path)  # the file as sent: meta, data set, pixels
            assert ds.SOPInstanceUID == uid and ds.file_meta.MediaStorageSOPInstanceUID == uid
            assert ds.PixelData == ct[uids.index(uid)].PixelData
        # Sent again (a client retrying): answered as stored, nothing new kept.
        again = post(port, body(part10(ds) for ds in ct), path=f"/dicomweb/studies/{study}")
        assert again.status == 200 and again.stored == uids
        assert _stored(daemon, study) == stored
        assert len(list((settings.spool_path / "incoming").rglob("*.dcm"))) >= len(uids)

        daemon._beat()
        status = collect(daemon.settings, engine=daemon.engine)
        (component,) = status["daemon"]["components"]
        web = component["receiver"]["dicomweb"]
        assert web == {"enabled": True, "host": "127.0.0.1", "port": port, "path": "/dicomweb",
                       "tls": False, "auth": "none"}
        assert component["receiver"]["port"] == daemon.receiver.port  # DIMSE fields unchanged
        assert f"STOW-RS http://127.0.0.1:{port}/dicomweb" in render_text(status)
        (check,) = [c for c in check_health(status, daemon.settings)["checks"]
                    if c["name"] == "dicomweb"]
        assert check["ok"] is True and check["critical"]
        daemon.dicomweb.stop()  # the HTTP receiver gone, the heartbeat still says it is on
        (check,) = [c for c in check_health(status, daemon.settings)["checks"]
                    if c["name"] == "dicomweb"]
        assert check["ok"] is False and "connect failed" in check["detail"]
    audit = [json.loads(line) for line in
             (settings.general.data_dir / "audit.log").read_text().splitlines()]
    logins = [a for a in audit if a["EventIdentification"]["EventID"]["code"] == "110114"
              and a["ActiveParticipant"][1]["UserID"] == "DICOMweb"]
    assert len(logins) == 2
    assert all(a["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
               for a in logins)
    transfers = [a for a in audit if a["EventIdentification"]["EventID"]["code"] == "110104"]
    assert [t["ParticipantObjectIdentification"][0]["ParticipantObjectID"]
            for t in transfers] == [study, study]
    assert [t["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]
            ["NumberOfInstances"] for t in transfers] == [6, 6]


def test_metrics_count_requests_by_status(stow_settings):
    from dicomai.metrics import REGISTRY

    def count(status: str) -> float:
        return REGISTRY.get_sample_value("dicomai_http_requests_total",
                                         {"status": status}) or 0.0

    port = free_port()
    settings = stow_settings()
    settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(
        update={"enabled": True, "port": port})})
    ct = synthetic.make_head_ct(2, rows=32, cols=32, seed=172)
    before = {s: count(s) for s in ("200", "415")}
    received = REGISTRY.get_sample_value("dicomai_instances_received_total") or 0.0
    with running_daemon(settings, roles=("receiver",)) as daemon:
        assert post(daemon.dicomweb.port, body(part10(ds) for ds in ct)).status == 200
        assert post(daemon.dicomweb.port, b"{}", content_type="application/json").status == 415
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert count("200") == before["200"] + 1 and count("415") == before["415"] + 1
    assert REGISTRY.get_sample_value("dicomai_instances_received_total") == received + 2
    assert f'dicomai_http_requests_total{{status="415"}} {count("415")}' in text.decode()


def test_partial_failure_names_each_instance(stow_settings):
    settings = stow_settings()
    ct = synthetic.make_head_ct(3, rows=32, cols=32, seed=173)
    other = synthetic.make_head_ct(1, rows=32, cols=32, seed=174)[0]  # another study
    study = ct[0].StudyInstanceUID
    # The data set's SOP Instance UID differs from its file meta's (same length).
    blob = part10(ct[2])
    offset = read_file_meta(blob).dataset_offset
    uid = str(ct[2].SOPInstanceUID).encode()
    other_uid = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    bad_uid = blob[:offset] + blob[offset:].replace(uid, other_uid)
    assert bad_uid != blob
    # A transfer syntax the receiver does not take (HTJ2K), named in the file meta.
    blob = part10(ct[1])
    htj2k = b"\x00" * 128 + b"DICM" + file_meta_bytes(
        CT_IMAGE, str(ct[1].SOPInstanceUID), "1.2.840.10008.1.2.4.201") + \
        blob[read_file_meta(blob).dataset_offset:]
    with running_daemon(settings, roles=("receiver",)) as daemon:
        port = daemon.dicomweb.port
        data = (part(part10(ct[0])) + part(part10(other)) + part(b"hello, not DICOM")
                + part(bad_uid) + part(htj2k) + closing())
        answer = post(port, data, path=f"/dicomweb/studies/{study}")
        assert answer.status == 202, answer.raw[:500]
        assert answer.stored == [str(ct[0].SOPInstanceUID)]
        assert answer.failed == {str(other.SOPInstanceUID): 0xA900,  # another study
                                 "": 0xC000,  # not DICOM
                                 str(ct[2].SOPInstanceUID): 0xA900,  # UID mismatch
                                 str(ct[1].SOPInstanceUID): 0xC122}  # transfer syntax
        assert set(_stored(daemon)) == {str(ct[0].SOPInstanceUID)}
        assert _quarantined(daemon) == ["uid_mismatch"]  # as a C-STORE's would be

        # Everything failed: 409, nothing stored.
        all_bad = post(port, part(part10(other)) + closing(), path=f"/dicomweb/studies/{study}")
        assert all_bad.status == 409 and all_bad.stored == []
        # Only non-DICOM parts: a bad request.
        assert post(port, part(b"x" * 400) + part(b"") + closing()).status == 400
        assert set(_stored(daemon)) == {str(ct[0].SOPInstanceUID)}


def test_the_door_answers_each_fault_and_stores_nothing(stow_settings, tmp_path):
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    settings = stow_settings(auth="basic", user="orthanc", password_file=str(password),
                             max_request_mb=1)
    ct = synthetic.make_head_ct(2, rows=64, cols=64, seed=175)
    good = {"Authorization": "Basic b3J0aGFuYzpzM2NyZXQ="}  # orthanc:s3cret
    wrong = {"Authorization": "Basic b3J0aGFuYzp3cm9uZw=="}  # orthanc:wrong
    payload = b"".join(body(part10(ds) for ds in ct))
    with running_daemon(settings, roles=("receiver",)) as daemon:
        port = daemon.dicomweb.port
        for headers in ({}, wrong, {"Authorization": "Bearer s3cret"}):
            answer = post(port, payload, headers=headers)
            assert answer.status == 401
            assert answer.headers["www-authenticate"] == 'Basic realm="dicomai"'
        assert post(port, payload, headers=good,
                    content_type="application/dicom").status == 415
        assert post(port, payload, headers=good, content_type=(
            'multipart/related; type="application/dicom+xml"; boundary=' + BOUNDARY)).status == 415
        assert post(port, payload, headers=good,
                    content_type='multipart/related; type="application/dicom"').status == 400
        assert post(port, b"--not-the-boundary\r\n\r\nxx", headers=good).status == 400
        assert post(port, payload[:300], headers=good).status == 400  # ends in its first part
        big = b"\x00" * (1024 * 1024 + 1)
        assert post(port, big, headers=good).status == 413  # by Content-Length
        big = part(big) + closing()
        chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
        assert post(port, chunks, headers=good).status == 413  # streamed (chunked)
        assert post(port, payload, headers=good, path="/dicomweb/series").status == 404
        assert _stored(daemon) == {}
        assert post(port, payload, headers=good).status == 200
        assert len(_stored(daemon)) == 2
        password.write_text("rotated\n")  # read again on change
        assert post(port, payload, headers=good).status == 401


def test_bearer_token(stow_settings, tmp_path):
    token = tmp_path / "token"
    token.write_text("abc.def.ghi")
    settings = stow_settings(auth="bearer", token_file=str(token))
    ct = synthetic.make_head_ct(1, rows=32, cols=32, seed=176)
    payload = b"".join(body(part10(ds) for ds in ct))
    with running_daemon(settings, roles=("receiver",)) as daemon:
        port = daemon.dicomweb.port
        answer = post(port, payload, headers={"Authorization": "Bearer nope"})
        assert answer.status == 401
        assert answer.headers["www-authenticate"] == 'Bearer realm="dicomai"'
        assert post(port, payload, headers={"Authorization": "Bearer abc.def.ghi"}).status == 200


def test_address_not_allowed_and_spool_full(stow_settings):
    ct = synthetic.make_head_ct(1, rows=32, cols=32, seed=177)
    payload = b"".join(body(part10(ds) for ds in ct))
    settings = stow_settings(allowed_peer_addresses=["10.0.0.0/8"])
    with running_daemon(settings, roles=("receiver",)) as daemon:
        assert post(daemon.dicomweb.port, payload).status == 403
        assert _stored(daemon) == {}
    settings = stow_settings(allowed_peer_addresses=["127.0.0.0/8"])
    settings = settings.model_copy(update={"receiver": settings.receiver.model_copy(
        update={"min_free_disk_mb": 1024 * 1024 * 1024})})  # a floor no disk reaches
    with running_daemon(settings, roles=("receiver",)) as daemon:
        answer = post(daemon.dicomweb.port, payload)
        assert answer.status == 503 and answer.headers.get("retry-after")
        assert _stored(daemon) == {}


def test_cut_body_keeps_complete_instances_only(stow_settings):
    settings = stow_settings()
    ct = synthetic.make_head_ct(3, rows=64, cols=64, seed=178)
    blobs = [part10(ds) for ds in ct]
    data = part(blobs[0]) + part(blobs[1]) + part(blobs[2])
    cut = data.index(blobs[2]) + len(blobs[2]) // 2  # in the middle of the third part
    with running_daemon(settings, roles=("receiver",)) as daemon:
        post_cut(daemon.dicomweb.port, data[:cut])
        uids = [str(ds.SOPInstanceUID) for ds in ct]
        wait_until(lambda: len(_stored(daemon)) >= 2, timeout=10, what="two instances stored")
        let_time_pass(0.5, "the cut third instance, were it stored, would be by now")
        assert set(_stored(daemon)) == set(uids[:2])
        # The instance cut in the middle was neither stored nor quarantined; the spool holds
        # exactly the two complete files (pre-created empty slots aside).
        assert _quarantined(daemon) == []
        files = [f for f in (settings.spool_path / "incoming").rglob("*.dcm") if f.stat().st_size]
        assert sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files) == sorted(uids[:2])
        # A body that ends (the client did not die) without its closing boundary: 400, and
        # the answer names what was complete, and stored, before the end.
        more = synthetic.make_head_ct(2, rows=64, cols=64, seed=183)
        answer = post(daemon.dicomweb.port, b"".join(body(part10(ds) for ds in more))[:-30])
        assert answer.status == 400
        assert answer.stored == [str(more[0].SOPInstanceUID)]
        assert set(_stored(daemon)) == {*uids[:2], str(more[0].SOPInstanceUID)}


def test_stalled_body_is_dropped_after_the_timeout(stow_settings):
    import socket

    settings = stow_settings(network_timeout_seconds=1)
    ct = synthetic.make_head_ct(2, rows=32, cols=32, seed=179)
    data = part(part10(ct[0])) + part(part10(ct[1]))[:100]
    with running_daemon(settings, roles=("receiver",)) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.dicomweb.port), timeout=10) as sock:
            sock.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          f"{CONTENT_TYPE}\r\nContent-Length: 99999999\r\n\r\n").encode() + data)
            t0 = time.monotonic()
            answer = sock.recv(4096)
            waited = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert waited < 5
        assert set(_stored(daemon)) == {str(ct[0].SOPInstanceUID)}


def test_study_split_between_dimse_and_dicomweb_is_one_study(stow_settings, local_pacs):
    settings = stow_settings()
    settings = settings.model_copy(update={"scheduler": settings.scheduler.model_copy(update={
        "study_quiet_seconds": 600.0, "release_grace_seconds": 0.3})})
    ct = synthetic.make_head_ct(8, rows=64, cols=64, seed=180)
    for ds in ct:  # nothing announces the count: the releases close it
        del ds.ImagesInAcquisition
    study = ct[0].StudyInstanceUID
    with running_daemon(settings) as daemon:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CT_IMAGE, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", daemon.receiver.port, ae_title="DICOMAI")
        try:
            assert assoc.is_established
            for ds in ct[:4]:
                assert assoc.send_c_store(ds).Status == 0
            # The HTTP request ends while the association is still open: not released yet.
            assert post(daemon.dicomweb.port, body(part10(ds) for ds in ct[4:])).status == 200
            let_time_pass(1.5, "ticks and grace periods that must not close the open study")
            (only,) = [s for s in collect(daemon.settings, engine=daemon.engine)["studies"]
                       if s["study_instance_uid"] == study]
            assert only["state"] == "receiving" and only["instances"] == 8
            assoc.release()
        finally:
            ae.shutdown()
        done = wait_until(lambda: [s for s in collect(daemon.settings, engine=daemon.engine)
                                   ["studies"] if s["study_instance_uid"] == study
                                   and s["state"] == "done"], timeout=120, what="study done")
        assert done[0]["generation"] == 1 and done[0]["instances"] == 8
        assert {ae for ae, _ in _stored(daemon, study).values()} == {"MODALITY", "DICOMWEB"}
    assert any(o.modality == "SR" for o in local_pacs.objects(study))


def test_release_by_the_request_end_closes_early(stow_settings, local_pacs):
    settings = stow_settings()
    settings = settings.model_copy(update={"scheduler": settings.scheduler.model_copy(update={
        "study_quiet_seconds": 600.0, "release_grace_seconds": 0.3})})
    ct = synthetic.make_head_ct(4, rows=64, cols=64, seed=181)
    for ds in ct:
        del ds.ImagesInAcquisition
    study = ct[0].StudyInstanceUID
    with running_daemon(settings) as daemon:
        assert post(daemon.dicomweb.port, body(part10(ds) for ds in ct)).status == 200
        t0 = time.monotonic()
        wait_until(lambda: [s for s in collect(daemon.settings, engine=daemon.engine)["studies"]
                            if s["study_instance_uid"] == study and s["state"] != "receiving"],
                   timeout=30, what="closed after the request")
        assert time.monotonic() - t0 < 10  # against a 600 s quiet period


def test_tls(stow_settings, tmp_path):
    import ssl
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    settings = stow_settings(tls_cert_file=str(cert), tls_key_file=str(key))
    ct = synthetic.make_head_ct(1, rows=32, cols=32, seed=182)
    payload = b"".join(body(part10(ds) for ds in ct))
    with running_daemon(settings, roles=("receiver",)) as daemon:
        assert daemon.dicomweb.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        req = urllib.request.Request(f"{daemon.dicomweb.url}/studies", data=payload,
                                     headers={"Content-Type": CONTENT_TYPE}, method="POST")
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            assert resp.status == 200
        assert len(_stored(daemon)) == 1


def test_check_config(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "dicomai.toml"
    text = DEFAULT_CONFIG.read_text()
    cfg.write_text(text.replace('[dicomweb]\n', '[dicomweb]\nuser = "x"\n', 1))
    out = subprocess.run([sys.executable, "-m", "dicomai", "--config", str(cfg), "check-config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "dicomweb" in out.stdout + out.stderr
    cfg.write_text(text.replace('auth = "none"', 'auth = "bearer"\ntoken_file = "/nonexistent/t"',
                                1).replace("enabled = false", "enabled = true", 1))
    out = subprocess.run([sys.executable, "-m", "dicomai", "--config", str(cfg), "check-config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "/nonexistent/t" in out.stderr
