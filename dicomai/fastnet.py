"""Event-driven reactors for pynetdicom's acceptor associations: no 1 ms polling sleeps.

pynetdicom 3.0.4 runs two polling loops per association: the DUL reactor
(``DULServiceProvider.run_reactor``) sleeps 1 ms whenever a loop found nothing to do, and the
acceptor reactor (``Association._run_reactor``) sleeps 1 ms on every loop. Each C-STORE waits
in both of them, and both wake a thousand times a second while idle.

:func:`install` replaces both loops of one association, before it starts, with copies that
wait on events instead (nothing in pynetdicom's installed files is changed):

- the DUL thread blocks in ``select()`` on the connection's socket and a wake-up pipe, which
  is written when another thread puts an item on the DUL's ``event_queue`` or
  ``to_provider_queue`` (e.g. our C-STORE response) or stops the DUL;
- the association thread waits on a :class:`threading.Event` that is set when a DIMSE
  message is complete, an ACSE primitive arrives, or the DUL thread ends.

Both waits are bounded (:data:`MAX_WAIT`) so the ARTIM and idle timers and the kill flags are
still seen in time. TLS: an ``SSLSocket`` may hold decrypted bytes that ``select()`` cannot
see; the DUL does not wait while ``pending()`` is non-zero (as pynetdicom's
``AssociationSocket.ready`` does).

The two loops are copies of pynetdicom 3.0.4's (MIT licence, Copyright (c) 2018 pynetdicom
contributors), changed only where they slept; :func:`install` does nothing on another
pynetdicom version.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import select
import ssl
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.utils import make_target

from dicomai.fast_store import FastStore, StoreRequest

__all__ = ["MAX_WAIT", "SUPPORTED_VERSION", "install"]

# The copied loops log as pynetdicom's own loops do.
_DUL_LOGGER = logging.getLogger("pynetdicom.dul")
_ASSOC_LOGGER = logging.getLogger("pynetdicom.association")

#: The pynetdicom version whose reactor loops are copied here.
SUPPORTED_VERSION = "3.0.4"
#: Longest wait of either reactor without an event, in seconds.
MAX_WAIT = 0.05


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A ``queue.Queue`` that calls ``_on_put`` after each put (set per instance)."""

    _on_put: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._on_put()


def _make_waking(q: queue.Queue, on_put: Callable[[], None]) -> None:  # type: ignore[type-arg]
    """Turn an existing queue (items kept) into a :class:`_WakingQueue`."""
    q.__class__ = _WakingQueue
    q._on_put = on_put  # type: ignore[attr-defined]


def _close_fds(fds: list[int], lock: threading.Lock) -> None:
    with lock:
        for i, fd in enumerate(fds):
            if fd >= 0:
                os.close(fd)
                fds[i] = -1


class _Waker:
    """A non-blocking self-pipe the DUL thread selects on together with its socket."""

    def __init__(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._fds = [r, w]
        self._lock = threading.Lock()
        #: True while the DUL thread is about to wait or waiting: only then is a put
        #: worth a write (puts by the DUL thread itself never are).
        self.waiting = False
        weakref.finalize(self, _close_fds, self._fds, self._lock)  # if never started

    @property
    def fd(self) -> int:
        return self._fds[0]

    def wake(self, force: bool = False) -> None:
        """Wake the DUL thread if it waits (always with ``force``)."""
        if not (self.waiting or force):
            return
        with self._lock:
            if self._fds[1] >= 0:
                try:
                    os.write(self._fds[1], b"\0")
                except OSError:  # pipe full: a wake-up is pending anyway
                    pass

    def drain(self) -> None:
        try:
            while os.read(self._fds[0], 4096):
                pass
        except OSError:  # BlockingIOError: empty
            pass

    def close(self) -> None:
        _close_fds(self._fds, self._lock)


def _has_work(dul: Any) -> bool:
    return bool(dul._kill_thread or dul.event_queue.qsize() or dul.to_provider_queue.qsize())


def _wait_for_activity(dul: Any, waker: _Waker) -> None:
    """Block until the socket is readable, the waker is written, or :data:`MAX_WAIT`."""
    asock = dul.socket
    sock = asock.socket if asock is not None else None
    waker.waiting = True
    try:
        if _has_work(dul):
            return
        fds: list[Any] = [waker.fd]
        if sock is not None:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return
            fds.append(sock)
        try:
            ready, _, _ = select.select(fds, [], [], MAX_WAIT)
        except (OSError, ValueError):  # socket closed meanwhile: the reactor notices
            ready = select.select([waker.fd], [], [], 0.001)[0]
        if waker.fd in ready:
            waker.drain()
    finally:
        waker.waiting = False


def _dul_reactor(dul: Any, waker: _Waker, on_exit: Callable[[], None],
                 transport_event: Callable[[], bool] | None = None) -> None:
    """``DULServiceProvider.run_reactor`` of pynetdicom 3.0.4, waiting instead of sleeping;
    ``transport_event`` (default ``dul._is_transport_event``) reads the next PDU."""
    if transport_event is None:
        transport_event = dul._is_transport_event
    try:
        dul._idle_timer.start()
        sleep = False
        while True:
            if not dul.assoc._dul_ready.is_set():
                dul.assoc._dul_ready.set()
                sleep = True
            if sleep:
                _wait_for_activity(dul, waker)
            if dul._kill_thread:
                break
            # The ARTIM timer first, so its event is queued ahead of any other this loop
            if dul.artim_timer.expired:
                dul.event_queue.put("Evt18")
            try:
                # Either send one primitive or receive and decode one PDU per loop
                if dul._process_recv_primitive():
                    pass
                elif transport_event():
                    dul._idle_timer.restart()
            except Exception as exc:  # as pynetdicom: abort, bypassing the state machine
                _DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                _DUL_LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                dul.socket.send(abort_pdu.encode())
                dul.assoc.is_aborted = True
                dul.assoc.is_established = False
                dul.assoc._kill = True
                dul._kill_thread = True
                return
            try:
                event = dul.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            dul.state_machine.do_action(event)
            sleep = False
    finally:
        waker.close()
        on_exit()


def _assoc_reactor(assoc: Any, signal: threading.Event) -> None:
    """``Association._run_reactor`` of pynetdicom 3.0.4, waiting on ``signal`` instead of
    sleeping 1 ms per loop."""
    assoc._is_paused = False
    while not assoc._kill:
        if not assoc.dimse.msg_queue.qsize():
            signal.wait(MAX_WAIT)
        signal.clear()

        # Paused while a send_*() method of our own uses DIMSE (see pynetdicom)
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False

        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, context_id)

        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            _ASSOC_LOGGER.info("Association Released")
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return

        if assoc.acse.is_aborted():
            log_msg = "Association Aborted"
            if assoc.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _ASSOC_LOGGER.info(log_msg)
            assoc.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for subscribers
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return

        if not assoc.dul.is_alive():
            assoc.kill()
            return

        if assoc.dul.idle_timer_expired():
            _ASSOC_LOGGER.error("Network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return


def _stop_dul(dul: Any, waker: _Waker) -> bool:
    """``DULServiceProvider.stop_dul``, waking the DUL thread instead of waiting for its next
    poll."""
    if dul.state_machine.current_state == "Sta1":
        dul._kill_thread = True
        waker.wake(force=True)
        while dul.is_alive():
            dul.join(MAX_WAIT)
        return True
    return False


def _kill_dul(dul: Any, waker: _Waker) -> None:
    dul._kill_thread = True
    waker.wake(force=True)


def install(assoc: Any, serve_store: Callable[[StoreRequest], int] | None = None) -> bool:
    """Give a not yet started acceptor association the event-driven reactors and, with
    ``serve_store``, the C-STORE fast path of :mod:`dicomai.fast_store`.

    Call from an ``EVT_CONN_OPEN`` handler. Returns False (and changes nothing) on a
    pynetdicom version other than :data:`SUPPORTED_VERSION` or an association whose DUL
    thread already runs.
    """
    dul = assoc.dul
    if pynetdicom.__version__ != SUPPORTED_VERSION or dul.is_alive() or dul.ident is not None:
        return False
    waker = _Waker()
    signal = threading.Event()
    _make_waking(dul.event_queue, waker.wake)
    _make_waking(dul.to_provider_queue, waker.wake)
    _make_waking(dul.to_user_queue, signal.set)
    _make_waking(assoc.dimse.msg_queue, signal.set)
    transport_event = None
    if serve_store is not None:
        fast = FastStore(assoc, serve_store)
        assoc.dicomai_fast_store = fast  # for tests and diagnostics
        transport_event = fast.transport_event
    dul._target = make_target(functools.partial(_dul_reactor, dul, waker, signal.set,
                                                transport_event))
    dul.stop_dul = functools.partial(_stop_dul, dul, waker)
    dul.kill_dul = functools.partial(_kill_dul, dul, waker)
    assoc._run_reactor = functools.partial(_assoc_reactor, assoc, signal)
    return True
