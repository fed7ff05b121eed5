"""Bad input, resource trouble and access control at the receiver, over real associations."""

from __future__ import annotations

import socket
import sqlite3
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from dicomai_tools import synthetic
from dicomai.ops.scu import echo, send_files
from dicomai.ops.status import collect
from tests.conftest import running_daemon

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _raw_store(port: int, sop_class: str, sop_uid: str, payload: bytes,
               syntax: str = ExplicitVRLittleEndian, *, tmp: Path) -> int | None:
    """C-STORE arbitrary dataset bytes (not necessarily DICOM) and return the status.

    pynetdicom sends a file's dataset bytes as they are, so the payload goes into a file
    behind a valid file meta header.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path = tmp / f"raw-{sop_uid}.dcm"
    path.write_bytes(buf.getvalue() + payload)
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes without decoding them
    try:
        assert assoc.is_established
        rsp = assoc.send_c_store(path)
        assoc.release()
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        ae.shutdown()


def _encode(ds: pydicom.Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def test_bad_input_is_refused_quarantined_and_serving_continues(make_settings, tmp_path):
    settings = make_settings(None, scheduler={"study_quiet_seconds": 3600})
    good = synthetic.make_xray("chest", rows=64, cols=64, seed=41)
    short = synthetic.make_xray("chest", rows=64, cols=64, seed=42)
    short.PixelData = short.PixelData[:100]
    no_uid = synthetic.make_xray("chest", rows=64, cols=64, seed=43)
    uid_for_missing = no_uid.SOPInstanceUID
    del no_uid.SeriesInstanceUID
    absurd = synthetic.make_xray("chest", rows=64, cols=64, seed=44)
    absurd.NumberOfFrames = 10**9
    with running_daemon(settings) as daemon:
        port = daemon.receiver.port
        statuses = {
            "garbage": _raw_store(port, DX, generate_uid(), b"\x00not dicom at all\xff" * 7,
                                  tmp=tmp_path),
            "truncated": _raw_store(port, DX, good.SOPInstanceUID, _encode(good)[:301],
                                    tmp=tmp_path),
            "missing_uid": _raw_store(port, DX, uid_for_missing, _encode(no_uid), tmp=tmp_path),
            "pixel_length": _raw_store(port, DX, short.SOPInstanceUID, _encode(short),
                                       tmp=tmp_path),
            "absurd": _raw_store(port, DX, absurd.SOPInstanceUID, _encode(absurd),
                                 tmp=tmp_path),
        }
        # A SOP class and a transfer syntax we do not accept are refused at negotiation.
        ae = AE(ae_title="FUZZER")
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context("1.2.3.4.5.6.7", ExplicitVRLittleEndian)
        ae.add_requested_context(DX, "1.2.840.10008.1.2.4.100")  # MPEG2
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
        if assoc.is_established:  # accepted with no usable context, or refused outright
            assert assoc.accepted_contexts == []
            assoc.release()
        assert {cx.abstract_syntax for cx in assoc.rejected_contexts} >= {"1.2.3.4.5.6.7", DX}
        ae.shutdown()
        # Still serving: a good instance afterwards is stored.
        assert send_files(synthetic.write_study([good], tmp_path), "127.0.0.1", port,
                          called_ae="DICOMAI").ok
        data = collect(settings, engine=daemon.engine)
    assert statuses["garbage"] in (0xC210, 0xA900)
    assert statuses["truncated"] in (0xC210, 0xA900)
    assert statuses["missing_uid"] == 0xA900
    assert statuses["pixel_length"] == 0xA900
    assert statuses["absurd"] == 0xC220  # beyond [receiver] max_pixel_data_mb
    reasons = [q["reason"] for q in data["quarantine"]["recent"]]
    assert data["quarantine"]["count"] == 5
    assert {"missing_uid", "pixel_data_length", "pixel_data_too_large"} <= set(reasons)
    for item in data["quarantine"]["recent"]:
        assert item["calling_ae"] == "FUZZER"
        assert item["path"] and Path(item["path"]).exists()
        assert "/quarantine/" in item["path"]
    (study,) = data["studies"]
    assert study["study_instance_uid"] == good.StudyInstanceUID
    assert study["instances"] == 1


def test_free_space_floor_answers_out_of_resources_and_recovers(make_settings, tmp_path):
    settings = make_settings(None, scheduler={"study_quiet_seconds": 3600})
    ds = synthetic.make_xray("chest", rows=64, cols=64, seed=45)
    paths = synthetic.write_study([ds], tmp_path)
    with running_daemon(settings) as daemon:
        port = daemon.receiver.port
        free = daemon.spool.free_bytes()
        daemon.receiver.min_free_bytes = free * 2  # the disk is "full" for the receiver
        refused = send_files(paths, "127.0.0.1", port, called_ae="DICOMAI")
        assert refused.statuses == (0xA700,)
        assert collect(settings, engine=daemon.engine)["studies"] == []
        assert not [f for f in (Path(settings.spool_path) / "incoming").rglob("*.dcm")
                    if f.stat().st_size]  # nothing written; pre-created files stay empty
        daemon.receiver.min_free_bytes = 0  # space is back
        assert send_files(paths, "127.0.0.1", port, called_ae="DICOMAI").ok
        assert collect(settings, engine=daemon.engine)["studies"][0]["instances"] == 1


def test_locked_database_answers_out_of_resources_never_success(make_settings, tmp_path):
    settings = make_settings(None, scheduler={"study_quiet_seconds": 3600},
                             database={"busy_timeout_seconds": 0.5, "url": ""})
    ds = synthetic.make_xray("chest", rows=64, cols=64, seed=46)
    paths = synthetic.write_study([ds], tmp_path)
    with running_daemon(settings, roles=["receiver"]) as daemon:
        db_file = settings.database_url.removeprefix("sqlite:///")
        locker = sqlite3.connect(db_file, timeout=0.1)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            result = send_files(paths, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI")
        finally:
            locker.rollback()
            locker.close()
        assert result.statuses == (0xA700,)
        assert collect(settings, engine=daemon.engine)["studies"] == []
        # The sender retries once the database is free again, and nothing is duplicated.
        assert send_files(paths, "127.0.0.1", daemon.receiver.port, called_ae="DICOMAI").ok
        assert collect(settings, engine=daemon.engine)["studies"][0]["instances"] == 1


def test_peer_address_allow_list(make_settings):
    settings = make_settings(None, receiver={"allowed_peer_addresses": ["10.99.0.0/16"]})
    with running_daemon(settings) as daemon:
        assert echo("127.0.0.1", daemon.receiver.port, called_ae="DICOMAI") is None
    settings = make_settings(None, receiver={"allowed_peer_addresses": ["127.0.0.0/8"]})
    with running_daemon(settings) as daemon:
        assert echo("127.0.0.1", daemon.receiver.port, called_ae="DICOMAI") == 0


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made here."""
    d = tmp_path / "pki"
    d.mkdir()
    p = {k: d / k for k in ("ca.key", "ca.pem", "server.key", "server.pem", "client.key",
                           "client.pem")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=dicomai test CA", "-keyout", str(p["ca.key"]), "-out", str(p["ca.pem"]))
    for who, cn in (("server", "127.0.0.1"), ("client", "PACS")):
        csr = d / f"{who}.csr"
        ext = d / f"{who}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n" if who == "server" else
                       "extendedKeyUsage=clientAuth\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", str(p[f"{who}.key"]), "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(p["ca.pem"]), "-CAkey",
                 str(p["ca.key"]), "-CAcreateserial", "-days", "1", "-extfile", str(ext),
                 "-out", str(p[f"{who}.pem"]))
    return p


def _tls_echo(port: int, ca: Path, cert: Path | None = None, key: Path | None = None,
              store: list[Dataset] | None = None) -> int | None:
    """C-ECHO over DICOM TLS (then C-STORE each of ``store``); the worst status."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    ae = AE(ae_title="PACS")
    ae.add_requested_context("1.2.840.10008.1.1")
    for ds in store or []:
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI", tls_args=(ctx, "127.0.0.1"))
    try:
        if not assoc.is_established:
            return None
        statuses = [int(assoc.send_c_echo().Status)]
        statuses += [int(assoc.send_c_store(ds).Status) for ds in store or []]
        assoc.release()
        return max(statuses)
    finally:
        ae.shutdown()


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                    reason="openssl not installed")
def test_dicom_tls_with_client_certificates(make_settings, certificates, tmp_path):
    c = certificates
    settings = make_settings(None, receiver={
        "tls_cert_file": str(c["server.pem"]), "tls_key_file": str(c["server.key"]),
        "tls_ca_file": str(c["ca.pem"]), "tls_require_client_cert": True})
    with running_daemon(settings) as daemon:
        port = daemon.receiver.port
        # A client that connects and never starts its TLS handshake holds only its own
        # connection (the handshake runs on the connection's thread, not the accept loop).
        silent = socket.create_connection(("127.0.0.1", port))
        assert _tls_echo(port, c["ca.pem"], c["client.pem"], c["client.key"]) == 0
        # C-STORE over TLS: 128 KiB slices, several TLS records per PDU (the fast path reads
        # what select() cannot see as pending in the SSL socket).
        ct = synthetic.make_head_ct(3, rows=256, cols=256)
        assert _tls_echo(port, c["ca.pem"], c["client.pem"], c["client.key"], store=ct) == 0
        assert daemon.receiver.fast_store_requests == 3
        assert all(daemon.index.known_instance(ds.SOPInstanceUID) == "stored" for ds in ct)
        assert _tls_echo(port, c["ca.pem"]) is None  # no client certificate
        assert echo("127.0.0.1", port, called_ae="DICOMAI", calling_ae="PACS",
                    timeout=5) is None  # plain DICOM on a TLS port
        ds = synthetic.make_xray("chest", rows=64, cols=64, seed=47)
        paths = synthetic.write_study([ds], tmp_path / "in")
        plain = send_files(paths, "127.0.0.1", port, called_ae="DICOMAI", timeout=5)
        assert not plain.ok
        # Only the TLS study: nothing from the plain association.
        assert [s["study_instance_uid"] for s in collect(
            settings, engine=daemon.engine)["studies"]] == [ct[0].StudyInstanceUID]
        silent.close()
