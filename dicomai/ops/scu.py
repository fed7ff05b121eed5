"""Storage SCU for sending DICOM files to a node (demo, tests, `dicomai send`)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, evt

__all__ = ["StoreResult", "echo", "send_files"]


@dataclass(frozen=True, slots=True)
class StoreResult:
    """DIMSE status per file (None: no response)."""

    statuses: tuple[int | None, ...]

    @property
    def ok(self) -> bool:
        """Every file was answered Success or Warning."""
        return all(s is not None and (s == 0 or (s & 0xF000) == 0xB000) for s in self.statuses)


def _nodelay(event: evt.Event) -> None:
    asock = event.assoc.dul.socket
    sock = asock.socket if asock is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def send_files(
    paths: Sequence[Path | str],
    host: str,
    port: int,
    *,
    called_ae: str,
    calling_ae: str = "DICOMAI-SCU",
    timeout: float = 30.0,
) -> StoreResult:
    """C-STORE ``paths`` over one association (contexts from the files' own syntaxes)."""
    metas = [
        pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"]) for p in paths
    ]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    pairs = sorted(
        {
            (str(m.file_meta.MediaStorageSOPClassUID), str(m.file_meta.TransferSyntaxUID))
            for m in metas
        }
    )
    if len(pairs) > 128:
        raise ValueError('Argument "paths" needs more than 128 presentation contexts.')
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(
        host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
    )
    statuses: list[int | None] = []
    try:
        if not assoc.is_established:
            return StoreResult(tuple(None for _ in paths))
        for p in paths:
            rsp = assoc.send_c_store(Path(p))
            statuses.append(int(rsp.Status) if rsp and "Status" in rsp else None)
        assoc.release()
    finally:
        ae.shutdown()
    return StoreResult(tuple(statuses))


def echo(
    host: str, port: int, *, called_ae: str, calling_ae: str = "DICOMAI-SCU", timeout: float = 10.0
) -> int | None:
    """C-ECHO; returns the status or None when no association could be made."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(host, port, ae_title=called_ae)
    try:
        if not assoc.is_established:
            return None
        rsp = assoc.send_c_echo()
        assoc.release()
        return int(rsp.Status) if rsp and "Status" in rsp else None
    finally:
        ae.shutdown()
