"""What a transport is handed and hands back: the files to send, one outcome per file, and the
switch that cuts sends short at shutdown. Shared by C-STORE (:mod:`dicomai.delivery.dimse`) and
STOW-RS (:mod:`dicomai.delivery.stow`)."""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import evt

from dicomai.jobs.policy import SendOutcome

__all__ = ["SendCancel", "SendItem", "SendReport"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SendItem:
    """One file to send (our result row id and its path)."""

    result_id: int
    path: str
    sop_class_uid: str
    #: Sent where the destination accepts its SOP class, skipped (not failed) elsewhere.
    optional: bool = False


@dataclass(slots=True)
class SendReport:
    """Outcome per result row, plus an association-level error if any."""

    outcomes: dict[int, tuple[SendOutcome, int | None, str | None]] = field(default_factory=dict)
    error: str | None = None

    @property
    def all_sent(self) -> bool:
        """Every object was accepted."""
        return bool(self.outcomes) and all(o[0] is SendOutcome.SENT for o in self.outcomes.values())


class SendCancel:
    """Cuts short the sends in flight (at shutdown), so a destination
    that hangs does not hold the daemon for its whole timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._assocs: set[Any] = set()
        self.cancelled = False

    def track(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN handler of a sending association."""
        with self._lock:
            self._assocs.add(event.assoc)
            cancelled = self.cancelled
        if cancelled:
            _cut(event.assoc)

    def forget(self, assoc: Any) -> None:
        with self._lock:
            self._assocs.discard(assoc)

    def cancel(self) -> int:
        """Abort every association in flight (negotiating or established); returns how
        many."""
        with self._lock:
            self.cancelled = True
            assocs = list(self._assocs)
        for assoc in assocs:
            _cut(assoc)
        return len(assocs)


def _cut(assoc: Any) -> None:
    """A-ABORT an established association; close the connection in any case (a peer that
    never answers the association request is waited for on the socket)."""
    try:
        if assoc.is_established:
            assoc.abort()
            # A C-STORE waiting for its response waits on this queue for the DIMSE timeout:
            # "no response" ends the wait now.
            assoc.dimse.msg_queue.put((None, None))
    except Exception:
        logger.debug("abort failed", exc_info=True)
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
