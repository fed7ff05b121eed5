"""STOW-RS sends (dicomai.delivery.stow.send_objects_stow) against an HTTP(S) archive of this test on
loopback, which answers what each test scripts: PS3.18 responses per instance, credentials
checked by dicomai.http_auth's server side, TLS with a CA of our own, a request held."""

from __future__ import annotations

import http.server
import json
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import SegmentationStorage

from dicomai_tools import synthetic
from dicomai.config import DestinationSettings, load_settings
from dicomai.http_auth import credentials
from dicomai.delivery.sender import stow_target
from dicomai.delivery.stow import send_objects_stow
from dicomai.delivery.transport import SendCancel, SendItem
from dicomai.jobs.policy import SendOutcome
from tests.conftest import DEFAULT_CONFIG, free_port
from tests.waiting import wait_until


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/dicom+json"


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Archive:
    """What the archive answers (a function of the request) and what it saw."""

    answer: Callable[[Seen], Answer] = lambda seen: Answer()
    seen: list[Seen] = field(default_factory=list)
    hold: threading.Event | None = None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        archive: Archive = self.server.archive  # type: ignore[attr-defined]
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = b""
            while size := int(self.rfile.readline().strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.read(2)
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        seen = Seen(self.path, dict(self.headers.items()), body)
        archive.seen.append(seen)
        if archive.hold is not None:
            archive.hold.wait(30)
        answer = archive.answer(seen)
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[Archive, int]]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(archive: Archive, tls: ssl.SSLContext | None = None) -> tuple[Archive, int]:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.archive = archive  # type: ignore[attr-defined]
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return archive, server.server_address[1]

    yield start
    for server in servers:
        if getattr(server, "archive", None) and server.archive.hold is not None:
            server.archive.hold.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def results(tmp_path: Path) -> list[tuple[SendItem, pydicom.Dataset]]:
    """Three result-like files (an SR stand-in, an SC stand-in, an optional SEG stand-in)."""
    out = []
    for i, (optional, sop_class) in enumerate(((False, "1.2.840.10008.5.1.4.1.1.88.34"),
                                               (False, "1.2.840.10008.5.1.4.1.1.7"),
                                               (True, SegmentationStorage))):
        ds = synthetic.make_xray("chest", rows=32, cols=32, seed=40 + i)
        (path,) = synthetic.write_study([ds], tmp_path / f"r{i}")
        out.append((SendItem(i + 1, str(path), sop_class, optional=optional), ds))
    return out


def _settings(tmp_path: Path) -> Any:
    return load_settings(DEFAULT_CONFIG, environ={},
                         overrides={"general": {"data_dir": str(tmp_path / "data")}})


def _send(dest: DestinationSettings, items: list[SendItem], tmp_path: Path,
          cancel: SendCancel | None = None) -> Any:
    return send_objects_stow(dest, items, target=stow_target(dest, _settings(tmp_path)),
                             cancel=cancel)


def _response(stored: list[str], failed: list[tuple[str, int]]) -> bytes:
    ds = pydicom.Dataset()
    if stored:
        ds.ReferencedSOPSequence = [pydicom.Dataset() for _ in stored]
        for item, uid in zip(ds.ReferencedSOPSequence, stored, strict=True):
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
            item.ReferencedSOPInstanceUID = uid
    if failed:
        ds.FailedSOPSequence = [pydicom.Dataset() for _ in failed]
        for item, (uid, reason) in zip(ds.FailedSOPSequence, failed, strict=True):
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
            item.ReferencedSOPInstanceUID = uid
            item.FailureReason = reason
    return json.dumps(ds.to_json_dict()).encode()


def _dest(port: int, scheme: str = "http", **kw: Any) -> DestinationSettings:
    return DestinationSettings(name="web", kind="dicomweb",
                               url=f"{scheme}://127.0.0.1:{port}/dicom-web", **kw)


def test_one_request_per_job_and_a_partial_answer_per_instance(serve, results, tmp_path):
    items = [i for i, _ in results]
    sr, sc, seg = (str(ds.SOPInstanceUID) for _, ds in results)
    archive, port = serve(Archive(lambda seen: Answer(202, _response(
        [sr], [(sc, 0xA700), (seg, 0x0122)]))))
    report = _send(_dest(port), items, tmp_path)
    (seen,) = archive.seen
    assert seen.path == "/dicom-web/studies"
    assert seen.headers["Content-Type"].startswith("multipart/related")
    assert 'type="application/dicom"' in seen.headers["Content-Type"]
    # Every file went in the one body, as a Part 10 file.
    for _, ds in results:
        assert str(ds.SOPInstanceUID).encode() in seen.body
    assert seen.body.count(b"DICM") == 3
    assert report.outcomes[1] == (SendOutcome.SENT, None, None)
    assert report.outcomes[2][0] is SendOutcome.RETRY and report.outcomes[2][1] == 0xA700
    assert report.outcomes[3][0] is SendOutcome.SKIPPED  # optional, SOP class not supported


def test_409_refusals_and_duplicates(serve, results, tmp_path):
    items = [i for i, _ in results]
    sr, sc, seg = (str(ds.SOPInstanceUID) for _, ds in results)
    _, port = serve(Archive(lambda seen: Answer(409, _response(
        [], [(sr, 0x0111), (sc, 0xA900), (seg, 0x0110)]))))
    report = _send(_dest(port), items, tmp_path)
    assert report.outcomes[1][0] is SendOutcome.SENT  # already held: not an error
    assert report.outcomes[2] == (SendOutcome.REFUSED, 0xA900, "failure reason 0xA900")
    assert report.outcomes[3][0] is SendOutcome.REFUSED  # optional, but not a SOP class refusal


def test_server_errors_and_no_listener_are_retried(serve, results, tmp_path):
    items = [i for i, _ in results]
    _, port = serve(Archive(lambda seen: Answer(503, b"busy", "text/plain")))
    report = _send(_dest(port), items, tmp_path)
    assert {o[0] for o in report.outcomes.values()} == {SendOutcome.RETRY}
    assert report.error == "HTTP 503"
    report = _send(_dest(free_port()), items, tmp_path)
    assert {o[0] for o in report.outcomes.values()} == {SendOutcome.RETRY}
    assert report.error.startswith("connection failed")


def test_bearer_token_checked_and_rotated(serve, results, tmp_path):
    token = tmp_path / "token"
    token.write_text("archive-token-1\n")
    server_side = credentials("bearer", token_file=tmp_path / "server-token")
    (tmp_path / "server-token").write_text("archive-token-2\n")

    def answer(seen: Seen) -> Answer:
        if not server_side.accepts(seen.headers.get("Authorization")):
            return Answer(401, b"", "text/plain")
        return Answer(200, b"")

    archive, port = serve(Archive(answer))
    dest = _dest(port, auth="bearer", token_file=token)
    target = stow_target(dest, _settings(tmp_path))
    items = [results[0][0]]
    report = send_objects_stow(dest, items, target=target)
    assert report.outcomes[1][0] is SendOutcome.RETRY and "401" in report.error
    token.write_text("archive-token-2\n")  # rotated: the same target reads it again
    assert send_objects_stow(dest, items, target=target).outcomes[1][0] is SendOutcome.SENT
    assert [s.headers["Authorization"] for s in archive.seen] == [
        "Bearer archive-token-1", "Bearer archive-token-2"]
    token.unlink()  # a missing file: retried, said as an auth problem, nothing sent
    report = send_objects_stow(dest, items, target=target)
    assert report.outcomes[1][0] is SendOutcome.RETRY and "does not exist" in report.error
    assert len(archive.seen) == 2


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                    reason="openssl not installed")
def test_https_with_our_ca_file_or_verification_off(serve, results, tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=dicomai test CA", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
             str(d / "ca.key"), "-CAcreateserial", "-days", "1", "-extfile",
             str(d / "server.ext"), "-out", str(d / "server.pem"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(d / "server.pem"), str(d / "server.key"))
    archive, port = serve(Archive(), tls=ctx)
    items = [results[0][0]]
    # The system's CAs do not know ours: no connection, retried.
    report = _send(_dest(port, "https"), items, tmp_path)
    assert report.outcomes[1][0] is SendOutcome.RETRY and "SSLError" in report.error
    report = _send(_dest(port, "https", ca_file=d / "ca.pem"), items, tmp_path)
    assert report.outcomes[1][0] is SendOutcome.SENT, report.error
    assert _send(_dest(port, "https", verify=False), items,
                 tmp_path).outcomes[1][0] is SendOutcome.SENT
    assert len(archive.seen) == 2


def test_a_held_request_is_cut_short_at_shutdown(serve, results, tmp_path):
    hold = threading.Event()
    archive, port = serve(Archive(hold=hold))
    cancel = SendCancel()
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(report=_send(
        _dest(port, timeout_seconds=30), [i for i, _ in results], tmp_path, cancel)),
        daemon=True)
    thread.start()
    wait_until(lambda: archive.seen, timeout=10, interval=0.05, what="the request at the archive")
    assert archive.seen and thread.is_alive()  # the archive holds the request (30 s timeout)
    cancel.cancel()
    thread.join(5)
    assert not thread.is_alive()
    report = out["report"]
    assert {o[0] for o in report.outcomes.values()} == {SendOutcome.RETRY}
    assert report.error == "cut short: shutting down"
    hold.set()
