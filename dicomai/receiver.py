"""DICOM Storage SCP: C-ECHO and C-STORE handlers that store durably before answering Success."""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts
from pynetdicom.sop_class import Verification

import dicomai.ingest.file_limits as file_limits
from dicomai import __version__, audit, metrics
from dicomai.config import ReceiverSettings
from dicomai.copies import MAX_COPY_BYTES, CopyFlusher
from dicomai.ingest import pynetdicom_seam as seam
from dicomai.ingest import uid_cache
from dicomai.ingest.fast_store import FastStore, StoreRequest
from dicomai.ingest.listener import Listener, listener_class
from dicomai.ingest.lobby import Lobby, LobbyLimits
from dicomai.ingest.pdu_reader import PduReader
from dicomai.logs import log_fields, uid_ref
from dicomai.queue import InstanceRecord, OwnResultObject, Queue
from dicomai.store import Spool, safe_uid

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_SUCCESS",
    "TRANSFER_SYNTAXES",
    "Receiver",
    "check_command",
    "check_instance",
    "handle_store",
    "store_instance",
]

logger = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1.71"
IMPLEMENTATION_VERSION_NAME = f"DICOMAI_{__version__}"[:16]

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

#: Accepted transfer syntaxes; instances are stored exactly as received.
TRANSFER_SYNTAXES: list[UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessP14,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


#: VRs whose conversion depends on nothing but the element's bytes, the dataset's encoding
#: and its character set (no sequences, no ambiguous VRs, no bulk data). Person names (PN)
#: are left out: no name is kept beyond the instance it came with.
_PLAIN_VRS = frozenset({
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "SH", "SL",
    "SS", "ST", "TM", "UC", "UI", "UL", "UR", "US", "UT",
})
_MAX_CACHED_VALUE = 256
_CACHE_MAX = 4096


def _cache_key(tag: int, raw: RawDataElement,
               encoding: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What a plain raw element's conversion depends on, or ``None`` (not cacheable).

    Patient module elements (group 0010: names, IDs, birth date) are never cached either, so
    no patient's identity outlives the handling of their own instances in this process."""
    if tag >> 16 == 0x0010:
        return None
    value = raw.value
    if not isinstance(value, bytes) or len(value) > _MAX_CACHED_VALUE:
        return None
    vr = raw.VR
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return None
    return (tag, vr, value, encoding) if vr in _PLAIN_VRS else None


def _encoding(ds: Dataset, transfer_syntax: str) -> tuple[Any, ...]:
    raw = ds.get_item(0x00080005) if 0x00080005 in ds else None
    charset = getattr(raw, "value", None)
    return (str(transfer_syntax), charset if isinstance(charset, bytes) else str(charset))


#: Converted values of plain raw elements, by what their conversion depends on: the header
#: fields of a series repeat byte for byte from instance to instance. Values are only read.
_VALUES: dict[tuple[Any, ...], Any] = {}


_tag: Callable[[str], int | None] = functools.cache(tag_for_keyword)


def _getter(ds: Dataset, transfer_syntax: str) -> Callable[[str], Any]:
    """``ds.get(keyword)`` served from :data:`_VALUES` where the raw bytes were seen before."""
    encoding = _encoding(ds, transfer_syntax)

    def get(keyword: str) -> Any:
        tag = _tag(keyword)
        raw = ds.get_item(tag) if tag is not None else None
        if raw is None:
            return None
        key = _cache_key(tag, raw, encoding) if isinstance(raw, RawDataElement) else None
        if key is None:
            return ds[tag].value
        try:
            return _VALUES[key]
        except KeyError:
            value = ds[tag].value
            if len(_VALUES) >= _CACHE_MAX:
                _VALUES.clear()
            _VALUES[key] = value
            return value

    return get


def _text(get: Callable[[str], Any], keyword: str, limit: int = 128) -> str:
    value = get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or getattr(value, "VM", 1) > 1:
        return "\\".join(str(v) for v in value)[:limit]
    return str(value).strip()[:limit]


def _int(get: Callable[[str], Any], keyword: str) -> int | None:
    try:
        value = get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def extract_record(ds: Dataset, transfer_syntax: str, sop_class_uid: str) -> InstanceRecord:
    """Header fields routing needs; raises ``ValueError`` when a required UID is missing."""
    get = _getter(ds, transfer_syntax)
    study = safe_uid(get("StudyInstanceUID"))
    series = safe_uid(get("SeriesInstanceUID"))
    sop = safe_uid(get("SOPInstanceUID"))
    slice_position: float | None = None
    ipp = get("ImagePositionPatient")
    iop = get("ImageOrientationPatient")
    if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
        row, col = [float(v) for v in iop[:3]], [float(v) for v in iop[3:]]
        normal = (
            row[1] * col[2] - row[2] * col[1],
            row[2] * col[0] - row[0] * col[2],
            row[0] * col[1] - row[1] * col[0],
        )
        slice_position = sum(float(p) * n for p, n in zip(ipp, normal, strict=True))
    return InstanceRecord(
        sop_instance_uid=sop,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_class_uid=str(sop_class_uid),
        transfer_syntax_uid=str(transfer_syntax),
        modality=_text(get, "Modality", 16).upper(),
        body_part=_text(get, "BodyPartExamined", 64).upper(),
        series_number=_int(get, "SeriesNumber"),
        instance_number=_int(get, "InstanceNumber"),
        image_type=_text(get, "ImageType").upper(),
        view_position=_text(get, "ViewPosition", 16).upper(),
        study_description=_text(get, "StudyDescription"),
        series_description=_text(get, "SeriesDescription"),
        orientation="\\".join(f"{float(v):.4f}" for v in iop) if iop is not None else "",
        slice_position=slice_position,
        rows=_int(get, "Rows"),
        columns=_int(get, "Columns"),
        acquisition_number=_int(get, "AcquisitionNumber"),
        images_in_acquisition=_int(get, "ImagesInAcquisition"),
    )


_ITEM_TAG = b"\xfe\xff\x00\xe0"


_PIXEL_DATA, _ROWS, _COLUMNS = 0x7FE00010, 0x00280010, 0x00280011
_BITS_ALLOCATED, _SAMPLES_PER_PIXEL, _NUMBER_OF_FRAMES = 0x00280100, 0x00280002, 0x00280008


def _value(ds: Dataset, tag: int, default: Any = None) -> Any:
    """``ds[tag].value``, or ``default`` when the element is absent."""
    return default if ds.get_item(tag) is None else ds[tag].value


def check_instance(ds: Dataset, transfer_syntax: UID,
                   limits: file_limits.FileLimits | None = None) -> str | None:
    """A short reason code when the dataset cannot be a valid image instance, else ``None``.

    Cheap structural checks only (no decoding): image attributes present and sane, within the
    pixel limits (:func:`dicomai.ingest.file_limits.check_pixels`: frame and pixel data size,
    the first fragment's codestream size), native pixel data long enough, encapsulated pixel
    data starting with an item.
    """
    if ds.get_item(_PIXEL_DATA) is None:
        return None  # not an image (e.g. an SR or a presentation state): nothing to check
    try:
        rows, cols = int(_value(ds, _ROWS)), int(_value(ds, _COLUMNS))
        bits = int(_value(ds, _BITS_ALLOCATED))
        samples = int(_value(ds, _SAMPLES_PER_PIXEL, 1) or 1)
        frames = int(_value(ds, _NUMBER_OF_FRAMES, 1) or 1)
    except (TypeError, ValueError):
        return "image_attributes"
    if min(rows, cols, bits, samples, frames) < 1 or bits > 64:
        return "image_attributes"
    data = _value(ds, _PIXEL_DATA)
    problem = file_limits.check_pixels(
        rows=rows, columns=cols, frames=frames, samples=samples, bits_allocated=bits,
        transfer_syntax=transfer_syntax, pixel_data=data, limits=limits or file_limits.active())
    if problem:
        return problem
    if transfer_syntax.is_encapsulated:
        return None if bytes(data[:4]) == _ITEM_TAG else "encapsulation"
    expected = (rows * cols * frames * samples * bits + 7) // 8
    return None if len(data) >= expected else "pixel_data_length"


def check_command(req: StoreRequest) -> tuple[str, int] | None:
    """A reason code and the status to answer when the C-STORE-RQ's command itself cannot be
    served (checked before its data set is read), else ``None``.

    - An Affected SOP Class UID that is empty, or not the abstract syntax of the presentation
      context the request arrived on: 0x0122 "Refused: SOP Class not supported"
      (``context_mismatch``). The SOP class a context carries is the one negotiated for it
      (PS3.8); a request naming another was never agreed on this context. PS3.7 lists 0122H
      among the C-STORE failure statuses; the alternative is an A-ABORT. We answer with the
      status: an abort would also fail every other instance the sender has queued on the
      association (and many senders then retry the whole association), while the status
      fails exactly this request, tells the sender why, and leaves the association usable.
      The data set is not interpreted under a SOP class other than the negotiated one; it is
      quarantined.
    - An empty or absent Affected SOP Instance UID (mandatory in a C-STORE-RQ, PS3.7):
      0xA900 "Error: Data Set does not match SOP Class" (``missing_affected_uid``). The
      request then cannot match the SOP Instance UID its data set carries: the check we
      answer 0xA900 (``uid_mismatch``) for a differing UID, and the status DCMTK's storescp
      gives for the same comparison. 0xC000-0xCFFF ("Cannot understand") is not used: it
      would tell the sender its data set could not be read (our 0xC210 means exactly that),
      which is not the problem and is not even looked at here.
    """
    if not req.sop_class_uid or (req.context_sop_class is not None
                                 and req.sop_class_uid != req.context_sop_class):
        return "context_mismatch", STATUS_SOP_CLASS_NOT_SUPPORTED
    if not req.sop_instance_uid:
        return "missing_affected_uid", STATUS_DATASET_MISMATCH
    return None


def _quarantine(req: StoreRequest, spool: Spool, queue: Queue, reason: str, status: int,
                clock: Callable[[], datetime], min_free_bytes: int) -> int:
    """Keep the refused bytes under quarantine/<reason>/ and record them; returns ``status``."""
    metrics.observe_refused(reason)
    path: str | None = None
    size = 0
    try:
        with req.dataset.getbuffer() as raw:
            size = len(raw)
            if spool.free_bytes() >= min_free_bytes:
                target = spool.quarantine_path(reason)
                spool.write_atomic(target, raw)
                path = str(target)
    except Exception:
        logger.exception("could not quarantine", extra=log_fields("instance.quarantine_failed"))
    try:
        sop_class = safe_uid(req.sop_class_uid)
    except ValueError:  # a command's garbage (e.g. a context mismatch) is not recorded
        sop_class = ""
    try:
        queue.quarantine(reason=reason, status_code=status, calling_ae=req.calling_ae,
                         peer=req.peer, sop_class_uid=sop_class, path=path,
                         size_bytes=size, now=clock())
    except Exception:
        logger.exception("could not record quarantine",
                         extra=log_fields("instance.quarantine_failed"))
    logger.warning("instance refused", extra=log_fields(
        "instance.rejected", reason=reason, status=f"0x{status:04X}", calling_ae=req.calling_ae,
        peer=req.peer, bytes=size))
    audit.security_alert(reason=f"instance refused: {reason}", peer=req.peer,
                         calling_ae=req.calling_ae)
    return status


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _short_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian with a 2-byte length."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The encoded File Meta Information pynetdicom writes for a C-STORE (the same bytes as
    ``encode_file_meta(event.file_meta)``, without building a pydicom dataset)."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join((
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _short_element(0x0002, b"UI", _uid_value(sop_class_uid)),
        _short_element(0x0003, b"UI", _uid_value(sop_instance_uid)),
        _short_element(0x0010, b"UI", _uid_value(transfer_syntax)),
        _short_element(0x0012, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID)),
        _short_element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
    ))
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _write_instance(spool: Spool, req: StoreRequest,
                    copies: bool = False) -> tuple[Path, int, bytes | None]:
    """Write the instance as received (Part 10: preamble, file meta, the peer's dataset
    bytes); returns its path, its size and, with ``copies``, for an instance of at most
    :data:`~dicomai.copies.MAX_COPY_BYTES`, its bytes: that file is not flushed, the bytes
    are committed with the row instead (:mod:`dicomai.copies`). A larger instance is written
    without joining its parts into one copy first, and flushed."""
    meta = file_meta_bytes(req.sop_class_uid, req.sop_instance_uid, str(req.transfer_syntax))
    with req.dataset.getbuffer() as data:
        if copies and len(_PREAMBLE) + len(meta) + len(data) <= MAX_COPY_BYTES:
            whole = b"".join((_PREAMBLE, meta, data))
            path, size = spool.write_instance([whole], sync=False)
            return path, size, whole
        path, size = spool.write_instance([_PREAMBLE, meta, data])
        return path, size, None


def _read(req: StoreRequest, limits: file_limits.FileLimits | None = None) -> Dataset:
    """The request's dataset read (every top-level element's tag, VR and length; a truncated
    or garbled stream raises here); values are converted when used. Within the file limits
    (:func:`dicomai.ingest.file_limits.read_dataset`: a deflated data set inflated in bounded
    steps, element count and nesting depth): raises
    :class:`~dicomai.ingest.file_limits.LimitExceeded` beyond them."""
    return file_limits.read_dataset(req.dataset, req.transfer_syntax,
                                    limits or file_limits.active())


#: Raw elements (by what their conversion depends on) that converted without error before;
#: converting the same bytes again gives the same result, so it is skipped. Bounded.
_CONVERTED: set[tuple[Any, ...]] = set()


#: VRs whose conversion cannot fail under pydicom's default reading validation (``WARN``):
#: text is decoded with undecodable bytes replaced and an unknown character set ignored (both
#: warn), and dates and times stay strings (``datetime_conversion`` off). About two thirds of
#: a typical header; ``tests/unit/test_record_path.py`` feeds them garbage.
_TEXT_VRS = frozenset({
    "AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UR", "UT",
})
_DATE_VRS = frozenset({"DA", "DT", "TM"})


def _never_failing_vrs() -> frozenset[str]:
    """The VRs :func:`_convert_all` may skip under pydicom's current settings."""
    if pydicom_config.settings.reading_validation_mode == pydicom_config.RAISE:
        return frozenset()
    return _TEXT_VRS if pydicom_config.datetime_conversion else _TEXT_VRS | _DATE_VRS


def _convert_all(ds: Dataset, transfer_syntax: str) -> None:
    """Convert every top-level element now (raises on a value dicomai could not read later:
    an unknown VR, a bad length, a broken sequence, a number that is not one), not in the
    worker.

    Text, dates and times are skipped (:func:`_never_failing_vrs`: converting them cannot
    fail). Most other header elements of a series repeat byte for byte from instance to
    instance; an element whose bytes (VR, encoding and character set alike) converted before
    is not converted again (about 8 us each with pydicom).
    """
    encoding = _encoding(ds, transfer_syntax)
    skip = _never_failing_vrs()
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement):
            continue
        vr = raw.VR
        if vr is None:  # implicit VR: the dictionary's (a private or unknown tag: convert)
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = None
        if vr in skip:
            continue
        key = _cache_key(tag, raw, encoding)
        if key is not None and key in _CONVERTED:
            continue
        ds[tag]  # converting it is the check
        if key is not None:
            if len(_CONVERTED) >= _CACHE_MAX:
                _CONVERTED.clear()
            _CONVERTED.add(key)


def request_from_event(event: evt.Event) -> StoreRequest:
    """A :class:`StoreRequest` for an EVT_C_STORE event of pynetdicom."""
    assoc, request = event.assoc, event.request
    dataset = request.DataSet if request.DataSet is not None else BytesIO()
    return StoreRequest(
        calling_ae=assoc.requestor.ae_title.strip(), peer=str(assoc.requestor.address),
        assoc_key=id(assoc), transfer_syntax=UID(str(event.context.transfer_syntax)),
        sop_class_uid=str(request.AffectedSOPClassUID or ""),
        sop_instance_uid=str(request.AffectedSOPInstanceUID or ""), dataset=dataset,
        context_sop_class=str(event.context.abstract_syntax))


def store_instance(
    req: StoreRequest,
    spool: Spool,
    queue: Queue,
    floor: Callable[[], int],
    clock: Callable[[], datetime],
    tally: Callable[[int, str], None] | None = None,
    flusher: CopyFlusher | None = None,
    limits: file_limits.FileLimits | None = None,
) -> int:
    """Store one received instance; returns a DIMSE status and never raises.

    Success is answered only after the file is fsynced and its row committed; with a
    ``flusher``, a small instance's bytes are committed with its row instead and its file is
    fsynced afterwards (:mod:`dicomai.copies`). Refused objects (a command that cannot be
    served, :func:`check_command`; a data set that does not match its command or cannot be
    an instance, or passes a file limit: ``limits``, by default those of
    :func:`dicomai.ingest.file_limits.active`) are quarantined with a reason code and never
    stored as an instance; resource problems answer 0xA700 so the sender retries.
    Both C-STORE paths call this: pynetdicom's EVT_C_STORE (:func:`handle_store`) and the
    fast path of :mod:`dicomai.ingest.fast_store`.
    """
    try:
        min_free_bytes = floor()
        calling = req.calling_ae
        refused = check_command(req)
        if refused is not None:
            reason, status = refused
            return _quarantine(req, spool, queue, reason, status, clock, min_free_bytes)
        try:
            ds = _read(req, limits)
            _convert_all(ds, req.transfer_syntax)
        except file_limits.LimitExceeded as refused:
            return _quarantine(req, spool, queue, refused.reason, refused.status, clock,
                               min_free_bytes)
        except Exception:  # any decoding problem of peer-supplied bytes
            return _refuse(req, spool, queue, "undecodable", clock, min_free_bytes)
        try:
            rec = extract_record(ds, req.transfer_syntax, req.sop_class_uid)
        except (AttributeError, KeyError, ValueError):
            return _refuse(req, spool, queue, "missing_uid", clock, min_free_bytes)
        except Exception:
            return _refuse(req, spool, queue, "undecodable", clock, min_free_bytes)
        if rec.sop_instance_uid != req.sop_instance_uid:
            return _refuse(req, spool, queue, "uid_mismatch", clock, min_free_bytes)
        try:
            sop_class = _text(_getter(ds, req.transfer_syntax), "SOPClassUID")
        except Exception:
            return _refuse(req, spool, queue, "undecodable", clock, min_free_bytes)
        if sop_class != req.sop_class_uid:  # PS3.4 B.2.3: 0xA900 (also when it is missing)
            return _refuse(req, spool, queue, "sop_class_mismatch", clock, min_free_bytes)
        try:
            problem = check_instance(ds, req.transfer_syntax, limits)
        except Exception:
            problem = "undecodable"
        if problem:
            return _refuse(req, spool, queue, problem, clock, min_free_bytes)
        if spool.free_bytes() < min_free_bytes:
            logger.error("spool below free-space floor",
                         extra=log_fields("instance.out_of_space", calling_ae=calling))
            metrics.observe_refused("out_of_space")
            return STATUS_OUT_OF_RESOURCES
        try:
            path, size, copy = _write_instance(spool, req, copies=flusher is not None)
        except OSError:
            logger.exception("could not write instance",
                             extra=log_fields("instance.write_failed", calling_ae=calling))
            return STATUS_OUT_OF_RESOURCES
        # Written first, then indexed: a duplicate (already stored, or one of our own results
        # sent back by the PACS) is found by the index and its copy removed. It is answered
        # Success so the sender is satisfied, but never analysed again (that would loop).
        try:
            new, job_id = queue.record_instance(rec, str(path), size, calling, clock(),
                                                copy=copy)
        except OwnResultObject:
            new, job_id = False, None
        except Exception:
            spool.discard_instance(path)
            logger.exception("could not record instance",
                             extra=log_fields("instance.db_failed", calling_ae=calling))
            metrics.observe_refused("database")
            return STATUS_OUT_OF_RESOURCES
        if new:
            metrics.observe_instance(size)
            if copy is not None and flusher is not None:
                flusher.add(str(path))
        else:  # a duplicate: keep the first copy (or none, for our own result)
            spool.discard_instance(path)
        if new and logger.isEnabledFor(logging.DEBUG):
            logger.debug("instance stored", extra=log_fields(
                "instance.stored", job_id=job_id, study=uid_ref(rec.study_instance_uid),
                bytes=size))
        elif not new:
            logger.debug("duplicate instance", extra=log_fields(
                "instance.duplicate", sop=uid_ref(rec.sop_instance_uid),
                kind="stored" if job_id is not None else "own_result"))
        if tally is not None:
            tally(req.assoc_key, rec.study_instance_uid)
        return STATUS_SUCCESS
    except Exception:  # never raise: pynetdicom would answer 0xC211
        logger.exception("store handler failed", extra=log_fields("instance.handler_failed"))
        return STATUS_OUT_OF_RESOURCES


def _refuse(req: StoreRequest, spool: Spool, queue: Queue, problem: str,
            clock: Callable[[], datetime], min_free_bytes: int) -> int:
    status = STATUS_CANNOT_UNDERSTAND if problem == "undecodable" else (
        file_limits.status_for(problem) or STATUS_DATASET_MISMATCH)
    return _quarantine(req, spool, queue, problem, status, clock, min_free_bytes)


def handle_store(
    event: evt.Event,
    spool: Spool,
    queue: Queue,
    floor: Callable[[], int],
    clock: Callable[[], datetime],
    tally: Callable[[int, str], None] | None = None,
    flusher: CopyFlusher | None = None,
) -> int:
    """EVT_C_STORE handler (pynetdicom's path): :func:`store_instance` for the event."""
    try:
        req = request_from_event(event)
    except Exception:
        logger.exception("store handler failed", extra=log_fields("instance.handler_failed"))
        return STATUS_OUT_OF_RESOURCES
    return store_instance(req, spool, queue, floor, clock, tally, flusher)


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO handler."""
    return STATUS_SUCCESS


def _misfit_store(assoc: Any, msg: Any, context_id: int) -> PresentationContext | None:
    """The accepted context of a C-STORE-RQ that pynetdicom would not answer as a Storage
    SCP must, else ``None`` (pynetdicom's own handling is right).

    pynetdicom 3.0.4 drops a request missing a mandatory parameter without any response (an
    empty Affected SOP Instance UID reads as none), aborts the association when the
    Affected SOP Class UID names no SOP class it knows, and otherwise serves the request
    whatever context it arrived on."""
    if not isinstance(msg, C_STORE) or msg.MessageID is None or seam.release_started(assoc):
        return None  # not a request (a response has no Message ID), or ignored in a release
    context = seam.accepted_context(assoc, context_id)
    if context is None or not context.transfer_syntax:
        return None  # pynetdicom aborts, as for any message on a context never accepted
    if msg.is_valid_request and str(msg.AffectedSOPClassUID) == str(context.abstract_syntax):
        return None
    return context


def _answer_store(assoc: Any, msg: C_STORE, context: PresentationContext,
                  store: Callable[[StoreRequest], int]) -> None:
    """Serve a :func:`_misfit_store` request by ``store`` (which refuses what
    :func:`check_command` refuses, as on the fast path) and send its C-STORE-RSP."""
    try:
        req = StoreRequest(
            calling_ae=assoc.requestor.ae_title.strip(), peer=str(assoc.requestor.address),
            assoc_key=id(assoc), transfer_syntax=UID(str(context.transfer_syntax[0])),
            sop_class_uid=str(msg.AffectedSOPClassUID or ""),
            sop_instance_uid=str(msg.AffectedSOPInstanceUID or ""),
            dataset=msg.DataSet if msg.DataSet is not None else BytesIO(),
            context_sop_class=str(context.abstract_syntax))
    except Exception:
        logger.exception("store handler failed", extra=log_fields("instance.handler_failed"))
        status = STATUS_OUT_OF_RESOURCES
    else:
        status = store(req)  # never raises
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg.MessageID
    rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID  # left out of the response when None
    rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
    rsp.Status = status
    if assoc.is_established:
        assoc.dimse.send_msg(rsp, cast(int, context.context_id))


def _guard_store_requests(assoc: Any, store: Callable[[StoreRequest], int]) -> None:
    """Answer every C-STORE-RQ that reaches pynetdicom's DIMSE layer (``fast_store =
    false``, or a request the fast path leaves to pynetdicom) as the fast path does: those of
    :func:`_misfit_store` by :func:`_answer_store`, the others by pynetdicom (EVT_C_STORE,
    :func:`handle_store`)."""

    def guarded(serve_request: Callable[[Any, int], None], msg: Any, context_id: int) -> None:
        context = _misfit_store(assoc, msg, context_id)
        if context is None:
            serve_request(msg, context_id)
        else:
            _answer_store(assoc, msg, context, store)

    seam.wrap_serve_request(assoc, guarded)


def _audit_association(event: evt.Event, accepted: bool) -> None:
    req, acc = event.assoc.requestor, event.assoc.acceptor
    audit.association(accepted=accepted, calling_ae=req.ae_title.strip(),
                      called_ae=acc.ae_title.strip(), peer=str(req.address),
                      local=str(acc.address), reason=None if accepted else "rejected")


def _on_accepted(event: evt.Event) -> None:
    req = event.assoc.requestor
    logger.info("association accepted", extra=log_fields(
        "association.accepted", calling_ae=req.ae_title.strip(), peer=req.address))
    _audit_association(event, True)


def _on_rejected(event: evt.Event) -> None:
    req = event.assoc.requestor
    logger.warning("association rejected", extra=log_fields(
        "association.rejected", calling_ae=req.ae_title.strip(), peer=req.address))
    _audit_association(event, False)


def _copy_context(cx: PresentationContext) -> PresentationContext:
    """A copy of a presentation context as independent as ``deepcopy``'s: its attributes are
    ints, bools, ``None``, UIDs (immutable) and the list of transfer syntax UIDs."""
    new = PresentationContext.__new__(PresentationContext)
    new.__dict__ = {k: (list(v) if isinstance(v, list) else v) for k, v in cx.__dict__.items()}
    return new


class _SupportedContexts(list):  # type: ignore[type-arg]
    """The server's supported contexts; pynetdicom deep-copies them for every association.

    ``deepcopy`` rebuilds every UID through pydicom's validating constructor: about 1,500 per
    association with our ~120 storage contexts, 10 ms and more of a new association's set-up
    on the machines measured. This copies them cheaply (and as deeply: see
    :func:`_copy_context`)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [_copy_context(cx) for cx in self]


class Receiver:
    """The Storage SCP component."""

    def __init__(
        self,
        settings: ReceiverSettings,
        spool: Spool,
        queue: Queue,
        clock: Callable[[], datetime],
        ssl_context: Any = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.queue = queue
        self.clock = clock
        self.ssl_context = ssl_context
        #: Free-space floor of the spool in bytes; below it C-STORE answers 0xA700.
        self.min_free_bytes = settings.min_free_disk_mb * 1024 * 1024
        self.ae: AE | None = None
        self.server: Listener | None = None
        #: Connections that have not associated yet (dicomai.ingest.lobby).
        self.lobby: Lobby | None = None
        self._lock = threading.Lock()
        self._transfers: dict[int, dict[str, int]] = {}
        #: Associations started and not finished yet, by id (for :meth:`_sweep`).
        self._started: dict[int, Any] = {}
        #: Called after an association released and its studies were marked (the daemon
        #: wakes the scheduler with it so an early close need not wait for the next tick).
        self.on_release: Callable[[], None] | None = None
        #: C-STORE requests served by the fast path (:mod:`dicomai.ingest.fast_store`) so far.
        self.fast_store_requests = 0
        #: Flushes the files of small instances committed with their bytes (dicomai.copies).
        self.copies = CopyFlusher(queue)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self.server is None:
            raise RuntimeError("receiver not started")
        return int(self.server.server_address[1])

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.require_called_aet = True
        ae.require_calling_aet = list(s.allowed_calling_ae_titles)
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout_seconds
        ae.dimse_timeout = s.dimse_timeout_seconds
        ae.network_timeout = s.network_timeout_seconds
        # Announced in the A-ASSOCIATE-AC (PS3.8 D.1, Maximum Length Received): the largest
        # P-DATA-TF PDU a conformant peer sends us; never 0 ("no maximum").
        ae.maximum_pdu_size = s.max_pdu_length
        ae.add_supported_context(Verification)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def _prepare(self, assoc: Any, prefix: bytes) -> None:
        """Set up a new association before it starts: our PDU reader (deadlines, size caps,
        the bytes the lobby read), the C-STORE fast path, and the answer to C-STORE requests
        pynetdicom would leave unanswered or abort on (:func:`_guard_store_requests`)."""
        s = self.settings
        try:
            sock = assoc.dul.socket.socket
            if not hasattr(sock, "pending"):  # TLS sockets: Nagle is moot for our writes
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass
        fast = FastStore(assoc, self._serve_store) if s.fast_store else None
        reader = PduReader(assoc, prefix=prefix, setup_timeout=s.acse_timeout_seconds,
                           network_timeout=s.network_timeout_seconds,
                           max_pdata=s.max_pdu_length, fast=fast)
        reader.install()
        assoc.dicomai_reader = reader  # for tests and diagnostics
        assoc.dicomai_fast_store = fast
        _guard_store_requests(assoc, self._store)
        with self._lock:
            self._started[id(assoc)] = assoc

    def _sweep(self) -> None:
        """Finish the bookkeeping of associations whose thread ended without an end event
        (about once a second, on the lobby thread)."""
        with self._lock:
            ended = [a for a in self._started.values()
                     if a.ident is not None and not a.is_alive()]
            for assoc in ended:
                del self._started[id(assoc)]
        for assoc in ended:
            self._finish(assoc, released=bool(assoc.is_released))
            reader = getattr(assoc, "dicomai_reader", None)
            if reader is not None:
                reader.waker.close()

    def _serve_store(self, req: StoreRequest) -> int:
        """The fast path's store step (:func:`store_instance`, looked up at each call)."""
        with self._lock:
            self.fast_store_requests += 1
        return self._store(req)

    def _store(self, req: StoreRequest) -> int:
        return store_instance(req, self.spool, self.queue, lambda: self.min_free_bytes,
                              self.clock, self._tally, self.copies)

    def _tally(self, assoc_key: int, study_uid: str) -> None:
        with self._lock:
            per_study = self._transfers.setdefault(assoc_key, {})
            per_study[study_uid] = per_study.get(study_uid, 0) + 1

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._transfers.setdefault(id(event.assoc), {})
        _on_accepted(event)

    def _on_ended(self, event: evt.Event) -> None:
        """EVT_RELEASED, EVT_ABORTED or EVT_CONN_CLOSE: finish the association's bookkeeping.

        The network thread may see the connection close before the association thread reports
        the release (the peer closes as soon as it has our A-RELEASE-RP). Deciding at
        EVT_CONN_CLOSE would then miss the release, so while the association thread still
        runs, a short-lived watcher waits for it and finishes from its ``is_released``.
        """
        assoc = event.assoc
        if event.event is evt.EVT_CONN_CLOSE:
            if assoc.is_alive() and assoc is not threading.current_thread():
                threading.Thread(target=self._finish_after, args=(assoc,), daemon=True,
                                 name="assoc-end").start()
            else:
                self._finish(assoc, released=bool(assoc.is_released))
            return
        self._finish(assoc, released=event.event is evt.EVT_RELEASED)

    def _finish_after(self, assoc: Any, timeout: float = 120.0) -> None:
        assoc.join(timeout)
        self._finish(assoc, released=bool(assoc.is_released))

    def _finish(self, assoc: Any, *, released: bool) -> None:
        """One audit event per study the association delivered, and, on a release, the
        early-close mark of those studies (once per association: the first caller pops)."""
        with self._lock:
            per_study = self._transfers.pop(id(assoc), None)
            # A study another open association is still delivering is not released yet.
            still_open = {uid for other in self._transfers.values() for uid in other}
        if per_study is None:
            return
        if per_study and released:
            self._released([uid for uid in per_study if uid not in still_open])
        req, acc = assoc.requestor, assoc.acceptor
        if per_study or released:
            logger.info("association ended", extra=log_fields(
                "association.released", calling_ae=req.ae_title.strip(),
                studies=len(per_study), instances=sum(per_study.values())))
        for study_uid, count in per_study.items():
            audit.instances_transferred(
                received=True, study_uid=study_uid, count=count,
                source_ae=req.ae_title.strip(), source_address=str(req.address),
                destination_ae=acc.ae_title.strip(), destination_address=str(acc.address))

    def _released(self, study_uids: list[str]) -> None:
        if not study_uids:
            return
        try:
            self.queue.mark_released(study_uids, self.clock())
        except Exception:  # the studies then close after their quiet period instead
            logger.exception("could not mark studies released",
                             extra=log_fields("association.release_mark_failed"))
            return
        if self.on_release is not None:
            try:
                self.on_release()
            except Exception:
                logger.exception("release callback failed",
                                 extra=log_fields("association.release_mark_failed"))

    def _tls_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if self.ssl_context is not None or s.tls_cert_file is None:
            return self.ssl_context
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(s.tls_cert_file), str(s.tls_key_file))
        if s.tls_ca_file is not None:
            ctx.load_verify_locations(str(s.tls_ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED if s.tls_require_client_cert \
                else ssl.CERT_OPTIONAL
        return ctx

    def _peer_allowed(self, address: str) -> bool:
        nets = [ipaddress.ip_network(n, strict=False)
                for n in self.settings.allowed_peer_addresses]
        if not nets:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in nets)

    def start(self) -> None:
        """Bind and serve in background threads.

        Raises :class:`~dicomai.ingest.pynetdicom_seam.SeamError` when the installed
        pynetdicom is not the version our seam with it was written for."""
        seam.check()
        uid_cache.install()  # standard UIDs of association requests converted once
        self.copies.start()
        try:
            self.spool.prepare()  # the first spool files, before the first C-STORE
        except OSError:  # e.g. disk full: each C-STORE tries again and answers 0xA700
            logger.warning("could not pre-create spool files", exc_info=True,
                           extra=log_fields("spool.slots_failed"))
        s = self.settings
        if s.processes != 1:
            logger.warning("[receiver] processes is retired and ignored", extra=log_fields(
                "config.retired_key", key="receiver.processes", value=s.processes))
        ae = self._make_ae()

        handlers = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store,
             [self.spool, self.queue, lambda: self.min_free_bytes, self.clock, self._tally,
              self.copies]),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, _on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
        ]
        server = cast(Listener, ae.make_server(
            (s.host, s.port), evt_handlers=handlers,  # type: ignore[arg-type]
            server_class=listener_class(s.listen_backlog)))
        server.contexts = _SupportedContexts(server.contexts)
        server.prepare = self._prepare
        lobby = Lobby(LobbyLimits(setup_timeout=s.acse_timeout_seconds,
                                  max_pending=s.max_pending_connections,
                                  max_pending_per_address=s.max_pending_per_address),
                      ssl_context=self._tls_context(), promote=server.start_association,
                      tick=self._sweep)
        server.lobby = lobby

        def verify_request(request: Any, client_address: tuple[str, int]) -> bool:
            allowed = self._peer_allowed(client_address[0])
            if not allowed:
                logger.warning("connection refused", extra=log_fields(
                    "association.rejected", reason="peer_address", peer=client_address[0]))
                audit.security_alert(reason="connection refused: peer address not allowed",
                                     peer=client_address[0])
            return allowed

        server.verify_request = verify_request  # type: ignore[method-assign]
        lobby.start()
        threading.Thread(target=server.serve_forever, name="receiver-acceptor",
                         daemon=True).start()
        seam.register_server(ae, server)  # so that ae.shutdown() stops it too
        with self._lock:
            self.ae, self.server, self.lobby = ae, server, lobby
        logger.info("receiver listening", extra=log_fields(
            "receiver.started", ae_title=s.ae_title, host=s.host, port=self.port))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, wait (bounded) for open associations, then shut down."""
        with self._lock:
            ae, server, lobby = self.ae, self.server, self.lobby
            self.ae = self.server = self.lobby = None
        if server is None or ae is None:
            self.copies.stop(timeout)
            return
        server.shutdown()
        if lobby is not None:
            lobby.stop()
        deadline = self.clock().timestamp() + timeout
        # Wait for established associations only: a bare TCP connection (a port probe) that
        # never sent an association request would otherwise hold shutdown for acse_timeout.
        while (any(a.is_established for a in ae.active_associations)
               and self.clock().timestamp() < deadline):
            threading.Event().wait(0.05)
        ae.shutdown()
        self.copies.stop(timeout)
        logger.info("receiver stopped", extra=log_fields("receiver.stopped"))
