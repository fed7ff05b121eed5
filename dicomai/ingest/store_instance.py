"""Storing one received C-STORE: checks, durable write, index, and the DIMSE status.

Success is answered only after the file is fsynced and its row committed (or, for a small
instance, its bytes committed with the row: :mod:`dicomai.ingest.copies`). A request that
cannot be served, a data set that does not match its command or cannot be an instance, or one
beyond the file limits (:mod:`dicomai.ingest.file_limits`) is quarantined with a reason code
and answered with the status the table in the README gives; resource trouble answers 0xA700
so the sender retries.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE

import dicomai.ingest.file_limits as file_limits
from dicomai import audit, metrics
from dicomai.ingest.copies import MAX_COPY_BYTES, CopyFlusher
from dicomai.ingest.fast_store import StoreRequest, uid_value
from dicomai.ingest.index import InstanceIndex, OwnResultObject
from dicomai.ingest.record import convert_all, extract_record, getter, text_value
from dicomai.ingest.spool import Spool, safe_uid
from dicomai.logs import log_fields, uid_ref

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_SUCCESS",
    "check_command",
    "check_instance",
    "file_meta_bytes",
    "handle_store",
    "request_from_event",
    "store_instance",
]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210


_ITEM_TAG = b"\xfe\xff\x00\xe0"


_PIXEL_DATA, _ROWS, _COLUMNS = 0x7FE00010, 0x00280010, 0x00280011
_BITS_ALLOCATED, _SAMPLES_PER_PIXEL, _NUMBER_OF_FRAMES = 0x00280100, 0x00280002, 0x00280008


def _value(ds: Dataset, tag: int, default: Any = None) -> Any:
    """``ds[tag].value``, or ``default`` when the element is absent."""
    return default if ds.get_item(tag) is None else ds[tag].value


def check_instance(
    ds: Dataset, transfer_syntax: UID, limits: file_limits.FileLimits | None = None
) -> str | None:
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
        rows=rows,
        columns=cols,
        frames=frames,
        samples=samples,
        bits_allocated=bits,
        transfer_syntax=transfer_syntax,
        pixel_data=data,
        limits=limits or file_limits.active(),
    )
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
    if not req.sop_class_uid or (
        req.context_sop_class is not None and req.sop_class_uid != req.context_sop_class
    ):
        return "context_mismatch", STATUS_SOP_CLASS_NOT_SUPPORTED
    if not req.sop_instance_uid:
        return "missing_affected_uid", STATUS_DATASET_MISMATCH
    return None


def _quarantine(
    req: StoreRequest,
    spool: Spool,
    index: InstanceIndex,
    reason: str,
    status: int,
    clock: Callable[[], datetime],
    min_free_bytes: int,
) -> int:
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
        index.quarantine(
            reason=reason,
            status_code=status,
            calling_ae=req.calling_ae,
            peer=req.peer,
            sop_class_uid=sop_class,
            path=path,
            size_bytes=size,
            now=clock(),
        )
    except Exception:
        logger.exception(
            "could not record quarantine", extra=log_fields("instance.quarantine_failed")
        )
    logger.warning(
        "instance refused",
        extra=log_fields(
            "instance.rejected",
            reason=reason,
            status=f"0x{status:04X}",
            calling_ae=req.calling_ae,
            peer=req.peer,
            bytes=size,
        ),
    )
    audit.security_alert(
        reason=f"instance refused: {reason}", peer=req.peer, calling_ae=req.calling_ae
    )
    return status


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _short_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian with a 2-byte length."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The encoded File Meta Information pynetdicom writes for a C-STORE (the same bytes as
    ``encode_file_meta(event.file_meta)``, without building a pydicom dataset)."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join(
        (
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _short_element(0x0002, b"UI", uid_value(sop_class_uid)),
            _short_element(0x0003, b"UI", uid_value(sop_instance_uid)),
            _short_element(0x0010, b"UI", uid_value(transfer_syntax)),
            _short_element(0x0012, b"UI", uid_value(PYNETDICOM_IMPLEMENTATION_UID)),
            _short_element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
        )
    )
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _write_instance(
    spool: Spool, req: StoreRequest, copies: bool = False
) -> tuple[Path, int, bytes | None]:
    """Write the instance as received (Part 10: preamble, file meta, the peer's dataset
    bytes); returns its path, its size and, with ``copies``, for an instance of at most
    :data:`~dicomai.ingest.copies.MAX_COPY_BYTES`, its bytes: that file is not flushed, the bytes
    are committed with the row instead (:mod:`dicomai.ingest.copies`). A larger instance is written
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
    return file_limits.read_dataset(
        req.dataset, req.transfer_syntax, limits or file_limits.active()
    )


def request_from_event(event: evt.Event) -> StoreRequest:
    """A :class:`StoreRequest` for an EVT_C_STORE event of pynetdicom."""
    assoc, request = event.assoc, cast(C_STORE, event.request)
    dataset = request.DataSet if request.DataSet is not None else BytesIO()
    return StoreRequest(
        calling_ae=assoc.requestor.ae_title.strip(),
        peer=str(assoc.requestor.address),
        assoc_key=id(assoc),
        transfer_syntax=UID(str(event.context.transfer_syntax)),
        sop_class_uid=str(request.AffectedSOPClassUID or ""),
        sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
        dataset=dataset,
        context_sop_class=str(event.context.abstract_syntax),
    )


def store_instance(
    req: StoreRequest,
    spool: Spool,
    index: InstanceIndex,
    floor: Callable[[], int],
    clock: Callable[[], datetime],
    tally: Callable[[int, str], None] | None = None,
    flusher: CopyFlusher | None = None,
    limits: file_limits.FileLimits | None = None,
) -> int:
    """Store one received instance; returns a DIMSE status and never raises.

    Success is answered only after the file is fsynced and its row committed; with a
    ``flusher``, a small instance's bytes are committed with its row instead and its file is
    fsynced afterwards (:mod:`dicomai.ingest.copies`). Refused objects (a command that cannot be
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
            return _quarantine(req, spool, index, reason, status, clock, min_free_bytes)
        try:
            ds = _read(req, limits)
            convert_all(ds, req.transfer_syntax)
        except file_limits.LimitExceeded as exceeded:
            return _quarantine(
                req, spool, index, exceeded.reason, exceeded.status, clock, min_free_bytes
            )
        except Exception:  # any decoding problem of peer-supplied bytes
            return _refuse(req, spool, index, "undecodable", clock, min_free_bytes)
        try:
            rec = extract_record(ds, req.transfer_syntax, req.sop_class_uid)
        except (AttributeError, KeyError, ValueError):
            return _refuse(req, spool, index, "missing_uid", clock, min_free_bytes)
        except Exception:
            return _refuse(req, spool, index, "undecodable", clock, min_free_bytes)
        if rec.sop_instance_uid != req.sop_instance_uid:
            return _refuse(req, spool, index, "uid_mismatch", clock, min_free_bytes)
        try:
            sop_class = text_value(getter(ds, req.transfer_syntax), "SOPClassUID")
        except Exception:
            return _refuse(req, spool, index, "undecodable", clock, min_free_bytes)
        if sop_class != req.sop_class_uid:  # PS3.4 B.2.3: 0xA900 (also when it is missing)
            return _refuse(req, spool, index, "sop_class_mismatch", clock, min_free_bytes)
        try:
            problem = check_instance(ds, req.transfer_syntax, limits)
        except Exception:
            problem = "undecodable"
        if problem:
            return _refuse(req, spool, index, problem, clock, min_free_bytes)
        if spool.free_bytes() < min_free_bytes:
            logger.error(
                "spool below free-space floor",
                extra=log_fields("instance.out_of_space", calling_ae=calling),
            )
            metrics.observe_refused("out_of_space")
            return STATUS_OUT_OF_RESOURCES
        try:
            path, size, copy = _write_instance(spool, req, copies=flusher is not None)
        except OSError:
            logger.exception(
                "could not write instance",
                extra=log_fields("instance.write_failed", calling_ae=calling),
            )
            return STATUS_OUT_OF_RESOURCES
        # Written first, then indexed: a duplicate (already stored, or one of our own results
        # sent back by the PACS) is found by the index and its copy removed. It is answered
        # Success so the sender is satisfied, but never analysed again (that would loop).
        try:
            new, job_id = index.record_instance(rec, str(path), size, calling, clock(), copy=copy)
        except OwnResultObject:
            new, job_id = False, None
        except Exception:
            spool.discard_instance(path)
            logger.exception(
                "could not record instance",
                extra=log_fields("instance.db_failed", calling_ae=calling),
            )
            metrics.observe_refused("database")
            return STATUS_OUT_OF_RESOURCES
        if new:
            metrics.observe_instance(size)
            if copy is not None and flusher is not None:
                flusher.add(str(path))
        else:  # a duplicate: keep the first copy (or none, for our own result)
            spool.discard_instance(path)
        if new and logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "instance stored",
                extra=log_fields(
                    "instance.stored",
                    job_id=job_id,
                    study=uid_ref(rec.study_instance_uid),
                    bytes=size,
                ),
            )
        elif not new:
            logger.debug(
                "duplicate instance",
                extra=log_fields(
                    "instance.duplicate",
                    sop=uid_ref(rec.sop_instance_uid),
                    kind="stored" if job_id is not None else "own_result",
                ),
            )
        if tally is not None:
            tally(req.assoc_key, rec.study_instance_uid)
        return STATUS_SUCCESS
    except Exception:  # never raise: pynetdicom would answer 0xC211
        logger.exception("store handler failed", extra=log_fields("instance.handler_failed"))
        return STATUS_OUT_OF_RESOURCES


def _refuse(
    req: StoreRequest,
    spool: Spool,
    index: InstanceIndex,
    problem: str,
    clock: Callable[[], datetime],
    min_free_bytes: int,
) -> int:
    status = (
        STATUS_CANNOT_UNDERSTAND
        if problem == "undecodable"
        else (file_limits.status_for(problem) or STATUS_DATASET_MISMATCH)
    )
    return _quarantine(req, spool, index, problem, status, clock, min_free_bytes)


def handle_store(
    event: evt.Event,
    spool: Spool,
    index: InstanceIndex,
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
    return store_instance(req, spool, index, floor, clock, tally, flusher)
