"""A raw STOW-RS client for tests: multipart/related bodies built by hand and streamed.

The body is a generator of chunks sent with ``Transfer-Encoding: chunked`` (http.client), so a
test can stream hundreds of instances without building the body in memory, stop in the middle
of a part (:func:`post_raw` with ``close_after``), or send exactly the bytes it wants.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pydicom

BOUNDARY = "dicomai-test-boundary-7f3a"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"


def part10(ds: pydicom.Dataset) -> bytes:
    """``ds`` as a Part 10 file."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def part(blob: bytes, content_type: str | None = "application/dicom",
         boundary: str = BOUNDARY) -> bytes:
    """One body part: delimiter, headers, the bytes, CRLF."""
    head = f"--{boundary}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + blob + b"\r\n"


def closing(boundary: str = BOUNDARY) -> bytes:
    return f"--{boundary}--\r\n".encode()


def body(blobs: Iterable[bytes], boundary: str = BOUNDARY) -> Iterator[bytes]:
    """A whole multipart/related body, one chunk per part (blobs are made as it goes)."""
    for blob in blobs:
        yield part(blob, boundary=boundary)
    yield closing(boundary)


@dataclass
class StowAnswer:
    """An HTTP answer and the response data set's UIDs."""

    status: int
    headers: dict[str, str]
    raw: bytes
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def stored(self) -> list[str]:
        seq = self.data.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
        return [i[REFERENCED_SOP_INSTANCE].get("Value", [""])[0] for i in seq]

    @property
    def failed(self) -> dict[str, int]:
        """Failed SOP instance UID ("" when unknown) → Failure Reason."""
        seq = self.data.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
        return {i[REFERENCED_SOP_INSTANCE].get("Value", [""])[0]: i[FAILURE_REASON]["Value"][0]
                for i in seq}


def post(port: int, chunks: Iterable[bytes] | bytes, *, path: str = "/dicomweb/studies",
         content_type: str | None = CONTENT_TYPE, headers: dict[str, str] | None = None,
         timeout: float = 120.0) -> StowAnswer:
    """POST ``chunks`` (streamed, chunked encoding; ``bytes`` are sent with a length)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        all_headers = dict(headers or {})
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        if isinstance(chunks, bytes):
            conn.request("POST", path, body=chunks, headers=all_headers)
        else:
            conn.request("POST", path, body=iter(chunks), headers=all_headers,
                         encode_chunked=True)
        resp = conn.getresponse()
        raw = resp.read()
        answer = StowAnswer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw)
        if raw and answer.headers.get("content-type", "").startswith("application/dicom+json"):
            answer.data = json.loads(raw)
        return answer
    finally:
        conn.close()


def post_cut(port: int, data: bytes, *, path: str = "/dicomweb/studies",
             content_type: str = CONTENT_TYPE, declared_length: int | None = None) -> None:
    """Send a request whose body stops after ``data`` and close the connection (a client
    that dies mid-upload): ``Content-Length`` says more than is sent."""
    length = declared_length if declared_length is not None else len(data) + 1_000_000
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()
        sock.sendall(head + data)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
