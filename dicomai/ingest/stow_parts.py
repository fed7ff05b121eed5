"""A STOW-RS request body read part by part as it streams in (``multipart/related``).

The body can be gigabytes: it is never held whole. :class:`PartReader` feeds the chunks the
HTTP server hands over to python-multipart's streaming parser and keeps only the part being
received: its file meta is read as soon as its first bytes are there
(:func:`dicomai.ingest.part10.read_file_meta`) and its data set collected in a buffer of its
own, up to ``max_part_bytes`` (beyond, the rest of the part is read and dropped). A part is
handed out only once its closing boundary has arrived: a body cut off in the middle of a part
never yields that part.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from io import BytesIO

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError

from dicomai.ingest.part10 import MAX_META_BYTES, FileMeta, Incomplete, NotPart10, read_file_meta

__all__ = [
    "BadRequest",
    "ContentType",
    "Part",
    "PartProblem",
    "PartReader",
    "UnsupportedMediaType",
    "boundary_of",
    "parse_content_type",
]

# python-multipart logs parse errors itself (we raise them as BadRequest).
logging.getLogger("python_multipart").setLevel(logging.CRITICAL)

DICOM_MEDIA_TYPE = "application/dicom"
#: Bytes before the first boundary (a MIME preamble) we skip at most.
_MAX_PREAMBLE = 64 * 1024
#: Headers of one part (bytes of one header line; count).
_MAX_HEADER_SIZE = 8 * 1024
_MAX_HEADER_COUNT = 32
_MAX_BOUNDARY = 200


class BadRequest(ValueError):
    """The body is not a well-formed multipart body (HTTP 400)."""


class UnsupportedMediaType(ValueError):
    """The request's Content-Type is not ``multipart/related; type="application/dicom"``
    (HTTP 415)."""


@dataclass(frozen=True, slots=True)
class ContentType:
    """A media type (lower case) and its parameters (names lower case, values unquoted)."""

    media_type: str
    params: dict[str, str]


def parse_content_type(value: str) -> ContentType:
    """Split a Content-Type header value (RFC 9110 8.3.1; quoted parameter values)."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == ";" and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    params: dict[str, str] = {}
    for item in items[1:]:
        name, sep, raw = item.partition("=")
        if not sep:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        params[name.strip().lower()] = raw
    return ContentType(items[0].strip().lower(), params)


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a STOW-RS request's Content-Type.

    Raises :class:`UnsupportedMediaType` when it is not ``multipart/related`` with
    ``type="application/dicom"`` (a missing ``type`` is accepted: each part's own type is
    checked), :class:`BadRequest` when it has no usable boundary.
    """
    if not content_type:
        raise UnsupportedMediaType("no Content-Type")
    ct = parse_content_type(content_type)
    if ct.media_type != "multipart/related":
        raise UnsupportedMediaType(f"media type {ct.media_type[:64]!r}")
    kind = ct.params.get("type", DICOM_MEDIA_TYPE).strip().lower()
    if kind != DICOM_MEDIA_TYPE:
        raise UnsupportedMediaType(f"type {kind[:64]!r}")
    boundary = ct.params.get("boundary", "")
    # RFC 2046 5.1.1 allows 70 characters; Orthanc's DICOMweb client sends 73.
    if not 1 <= len(boundary) <= _MAX_BOUNDARY:
        raise BadRequest("no multipart boundary")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError as exc:
        raise BadRequest("boundary is not ASCII") from exc


class PartProblem(Enum):
    """Why a part cannot be stored (it is still read to its end)."""

    NOT_DICOM = "not_dicom"  # not a Part 10 file
    MEDIA_TYPE = "media_type"  # a part Content-Type other than application/dicom
    TOO_LARGE = "too_large"  # beyond max_part_bytes


@dataclass(slots=True)
class Part:
    """One complete part: the file meta and data set of a Part 10 file, or its problem."""

    index: int
    size: int = 0
    meta: FileMeta | None = None
    #: The data set bytes after the file meta (``None`` with a problem).
    dataset: BytesIO | None = None
    problem: PartProblem | None = None
    _content_type: list[bytes] = field(default_factory=list)
    _head: bytearray = field(default_factory=bytearray)


class PartReader:
    """Parses one request body incrementally; :meth:`feed` returns the parts it completed."""

    def __init__(self, boundary: bytes, max_part_bytes: int) -> None:
        self.max_part_bytes = max_part_bytes
        self._marker = b"--" + boundary
        self._preamble: bytearray | None = bytearray()
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._begin,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_end": self._on_end,
            },
            max_header_count=_MAX_HEADER_COUNT,
            max_header_size=_MAX_HEADER_SIZE,
        )
        self._part: Part | None = None
        self._field = bytearray()
        self._value = bytearray()
        self._done: list[Part] = []
        self.parts = 0
        #: The closing boundary was read: the body is complete.
        self.ended = False

    # -- input ------------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> list[Part]:
        """Parse ``chunk``; the parts it completed, in order. Raises :class:`BadRequest`."""
        if self._preamble is not None:
            chunk = self._skip_preamble(chunk)
            if not chunk:
                return []
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from exc
        done, self._done = self._done, []
        return done

    def _skip_preamble(self, chunk: bytes) -> bytes:
        """Drop what comes before the first boundary line (RFC 2046 5.1.1 preamble)."""
        assert self._preamble is not None
        buf = self._preamble
        buf += chunk
        start = 0
        while True:
            at = buf.find(self._marker, start)
            if at < 0:
                if len(buf) > _MAX_PREAMBLE:
                    raise BadRequest("no multipart boundary at the start of the body")
                return b""
            if at == 0 or buf[at - 2 : at] == b"\r\n":
                self._preamble = None
                return bytes(buf[at:])
            start = at + 1

    def finish(self) -> None:
        """The body ended: raises :class:`BadRequest` unless its closing boundary was read."""
        if self._preamble is not None or not self.ended:
            raise BadRequest("multipart body ends before its closing boundary")

    # -- parser callbacks -------------------------------------------------------------------
    def _begin(self) -> None:
        self._part = Part(index=self.parts)
        self.parts += 1

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._part is not None and bytes(self._field).strip().lower() == b"content-type":
            self._part._content_type.append(bytes(self._value))
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        part = self._part
        if part is None or not part._content_type:
            return  # no part Content-Type: the request's type applies
        media = parse_content_type(part._content_type[-1].decode("latin-1")).media_type
        if media != DICOM_MEDIA_TYPE:
            part.problem = PartProblem.MEDIA_TYPE

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None:
            return
        part.size += end - start
        if part.problem is not None:
            return
        if part.size > self.max_part_bytes:
            part.problem = PartProblem.TOO_LARGE
            part.dataset = None
            part._head = bytearray()
            return
        chunk = memoryview(data)[start:end]
        if part.dataset is not None:
            part.dataset.write(chunk)
            return
        part._head += chunk
        self._try_meta(part, final=False)

    def _try_meta(self, part: Part, *, final: bool) -> None:
        try:
            meta = read_file_meta(part._head, final=final)
        except NotPart10:
            meta = None
        if meta is Incomplete.MORE:
            if len(part._head) > MAX_META_BYTES + 132:
                part.problem = PartProblem.NOT_DICOM
                part._head = bytearray()
            return
        if meta is None:
            part.problem = PartProblem.NOT_DICOM
            part._head = bytearray()
            return
        part.meta = meta
        part.dataset = BytesIO()
        part.dataset.write(memoryview(part._head)[meta.dataset_offset :])
        part._head = bytearray()

    def _end(self) -> None:
        part, self._part = self._part, None
        if part is None:
            return
        if part.problem is None and part.meta is None:
            self._try_meta(part, final=True)
        if part.problem is not None:
            part.dataset = None  # the meta stays where it was read: the failure names it
        self._done.append(part)

    def _on_end(self) -> None:
        self.ended = True
