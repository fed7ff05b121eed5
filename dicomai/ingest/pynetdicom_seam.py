"""The one place dicomai reaches past pynetdicom's public API.

dicomai reads every PDU of an accepted association itself (:mod:`dicomai.ingest.pdu_reader`:
deadlines on every read, size caps, the C-STORE fast path) and hands the rest to
pynetdicom's state machine, and it answers C-STORE requests pynetdicom would leave
unanswered. That needs a few of pynetdicom's private names. They are all here, each behind a
small function saying what it relies on, for exactly one pynetdicom version: the one pinned
in ``pyproject.toml`` (:data:`PINNED_VERSION`).

:func:`check` verifies the version and every assumption below against the installed
pynetdicom; the receiver calls it before it listens and refuses to start when it fails
(:class:`SeamError`), and ``tests/unit/test_pynetdicom_seam.py`` runs it, so an upgrade of
pynetdicom fails loudly instead of silently running on changed internals. Upgrading means:
read the new version's DUL reactor, association reactor and request handler, adapt the
functions here, and move the pin.

What is relied on (pynetdicom 3.0.4):

- ``DULServiceProvider.run_reactor`` calls ``self._is_transport_event()`` to read from the
  network when it has nothing to send, and sleeps ``self._run_loop_delay`` seconds after a
  loop without an event. We replace the former per instance with our reader and set the
  latter to a short delay (our reader waits on the socket instead).
- ``DULServiceProvider._decode_pdu(bytes)`` returns ``(pdu, event name)`` for a raw PDU, and
  the state machine takes received PDUs from ``_recv_pdu`` after their event is queued on
  ``event_queue``.
- ``DULServiceProvider._kill_thread`` is the reactor's stop flag; ``to_provider_queue`` holds
  the primitives the association wants sent.
- ``Association.run_reactor`` runs ``self._run_reactor()`` once an acceptor is established:
  we replace it per instance with :func:`serve_association`, our own loop, which waits on an
  event instead of waking every millisecond. It relies on ``_kill`` (stop flag),
  ``_reactor_checkpoint``/``_is_paused`` (the pause pynetdicom's ``send_*`` methods ask
  for), ``dimse.msg_queue``/``dimse.get_msg`` (complete DIMSE messages), ``dul.to_user_queue``
  (ACSE primitives), ``acse.is_release_requested``/``is_aborted``/``send_release``,
  ``dul.receive_pdu`` and ``network_timeout_response``.
- ``Association._serve_request(msg, context_id)`` serves one received DIMSE request;
  ``_accepted_cx`` maps accepted context IDs to contexts; ``_sent_release`` is set once the
  association started a release; ``dimse.message`` is a message being reassembled.
- ``RequestHandler._create_association()`` builds an acceptor association for the handler's
  socket with the server's contexts and handlers.
- ``ApplicationEntity._servers`` lists the servers ``AE.shutdown()`` stops.
- ``pynetdicom.utils.set_uid`` (imported by name into several modules), ``_config.VALIDATORS``
  and ``PresentationContext._transfer_syntax``: wrapped by :mod:`dicomai.ingest.uid_cache`.
- ``_config.LOG_REQUEST_IDENTIFIERS``, ``LOG_RESPONSE_IDENTIFIERS`` and ``LOG_HANDLER_LEVEL``:
  turned off so pynetdicom never logs identifiers (patient data).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler

__all__ = [
    "PINNED_VERSION",
    "SeamError",
    "accepted_context",
    "check",
    "create_acceptor",
    "dul_state",
    "events_pending",
    "has_outgoing",
    "pass_pdu_to_pynetdicom",
    "quiet_identifier_logging",
    "reassembling",
    "register_server",
    "release_started",
    "replace_association_loop",
    "replace_read_step",
    "serve_association",
    "set_ui_validator",
    "stop_requested",
    "transfer_syntax_list",
    "ui_validator",
    "wake_on_send",
    "wrap_serve_request",
]

#: The pynetdicom version this module was written for (pinned in pyproject.toml).
PINNED_VERSION = "3.0.4"


class SeamError(RuntimeError):
    """The installed pynetdicom is not the one this module's assumptions hold for."""


# -- checks ------------------------------------------------------------------------------------


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise SeamError(
            f"pynetdicom {pynetdicom.__version__}: {what} (dicomai's seam with "
            f"pynetdicom was written for {PINNED_VERSION}; see "
            "dicomai/ingest/pynetdicom_seam.py)"
        )


def _calls(function: Any, *names: str) -> bool:
    """Whether ``function``'s code looks up every attribute name of ``names``."""
    code = getattr(function, "__code__", None)
    return code is not None and all(name in code.co_names for name in names)


def check() -> None:
    """Raise :class:`SeamError` unless the installed pynetdicom is :data:`PINNED_VERSION` and
    every assumption in this module's docstring holds for it."""
    _require(
        pynetdicom.__version__ == PINNED_VERSION,
        f"version {pynetdicom.__version__} installed, {PINNED_VERSION} expected",
    )
    _require(
        _calls(
            DULServiceProvider.run_reactor,
            "_is_transport_event",
            "_run_loop_delay",
            "_kill_thread",
            "_process_recv_primitive",
            "event_queue",
        ),
        "DULServiceProvider.run_reactor no longer reads through _is_transport_event",
    )
    _require(
        _calls(DULServiceProvider._decode_pdu, "decode"), "DULServiceProvider._decode_pdu changed"
    )
    _require(
        _calls(DULServiceProvider.receive_pdu, "to_user_queue"),
        "DULServiceProvider.receive_pdu changed",
    )
    _require(
        _calls(Association._run_reactor, "_serve_request", "get_msg"),
        "Association._run_reactor no longer serves requests through _serve_request",
    )
    _require(
        _calls(Association.run_reactor, "_run_reactor", "is_acceptor"),
        "Association.run_reactor no longer runs _run_reactor",
    )
    _require(
        _calls(RequestHandler._create_association, "set_socket", "_server"),
        "RequestHandler._create_association changed",
    )
    from pynetdicom import AE

    ae = AE()
    assoc = Association(ae, "acceptor")
    dul = assoc.dul
    for name in (
        "_recv_pdu",
        "event_queue",
        "to_provider_queue",
        "_kill_thread",
        "_run_loop_delay",
        "state_machine",
    ):
        _require(hasattr(dul, name), f"DULServiceProvider has no {name}")
    _require(isinstance(dul._recv_pdu, queue.Queue), "DUL._recv_pdu is not a queue")
    _require(type(dul.to_provider_queue) is queue.Queue, "DUL.to_provider_queue is not a Queue")
    _require(isinstance(dul.state_machine.current_state, str), "no state machine state")
    for name in (
        "_accepted_cx",
        "_sent_release",
        "_serve_request",
        "dimse",
        "_kill",
        "_reactor_checkpoint",
        "_is_paused",
        "network_timeout_response",
    ):
        _require(hasattr(assoc, name), f"Association has no {name}")
    _require(type(assoc.dimse.msg_queue) is queue.Queue, "DIMSE msg_queue is not a Queue")
    _require(type(dul.to_user_queue) is queue.Queue, "DUL.to_user_queue is not a Queue")
    for name in ("is_release_requested", "is_aborted", "send_release"):
        _require(callable(getattr(assoc.acse, name, None)), f"ACSE has no {name}")
    _require(isinstance(assoc._accepted_cx, dict), "Association._accepted_cx is not a dict")
    _require(hasattr(assoc.dimse, "message"), "DIMSE provider has no message")
    _require(isinstance(getattr(ae, "_servers", None), list), "AE._servers is not a list")
    _require(callable(getattr(pynetdicom.utils, "set_uid", None)), "utils.set_uid missing")
    _require(callable(_config.VALIDATORS.get("UI")), "_config.VALIDATORS['UI'] missing")
    _require(
        isinstance(getattr(PresentationContext(), "_transfer_syntax", None), list),
        "PresentationContext._transfer_syntax is not a list",
    )
    for name in ("LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS", "LOG_HANDLER_LEVEL"):
        _require(hasattr(_config, name), f"_config.{name} missing")


# -- the DUL (network) side --------------------------------------------------------------------

#: Seconds pynetdicom's DUL reactor sleeps after a loop without an event once our reader
#: waits on the socket itself (its own default is 1 ms, every idle loop).
_LOOP_DELAY = 0.0


def replace_read_step(assoc: Any, read_step: Callable[[], bool]) -> None:
    """Make ``read_step`` the DUL reactor's network read: called when nothing waits to be
    sent, it returns True when it read (or closed) something. It may block briefly: the
    reactor's own idle sleep is dropped."""
    dul = assoc.dul
    dul._is_transport_event = read_step
    dul._run_loop_delay = _LOOP_DELAY


def pass_pdu_to_pynetdicom(assoc: Any, raw: bytes | bytearray) -> str:
    """Decode one received PDU with pynetdicom and queue it for its state machine, as its own
    reader does; returns the event name (``Evt19``, an invalid PDU, when decoding failed)."""
    dul = assoc.dul
    try:
        pdu, event = dul._decode_pdu(bytearray(raw))
    except Exception:
        dul.event_queue.put("Evt19")
        return "Evt19"
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)
    return str(event)


def dul_state(assoc: Any) -> str:
    """The upper layer state machine's state (``Sta1`` .. ``Sta13``, PS3.8 9.2)."""
    return str(assoc.dul.state_machine.current_state)


def events_pending(assoc: Any) -> bool:
    """Whether events wait for the state machine (its reactor handles one per loop)."""
    return not assoc.dul.event_queue.empty()


def has_outgoing(assoc: Any) -> bool:
    """Whether the association has queued a primitive for the network thread to send."""
    return not assoc.dul.to_provider_queue.empty()


def stop_requested(assoc: Any) -> bool:
    """Whether the DUL reactor was told to stop."""
    return bool(assoc.dul._kill_thread)


class _NotifyingQueue(queue.Queue[Any]):
    """A queue that calls ``notify`` after every put."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self.notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.notify()


def wake_on_send(assoc: Any, wake: Callable[[], None]) -> None:
    """Call ``wake`` whenever the association queues a primitive to send (so a DUL thread
    waiting in our reader sends it at once), and when the DUL is told to stop. Call before
    the association starts."""
    dul = assoc.dul
    _notify_on_put(dul, "to_provider_queue", wake)
    kill, stop = dul.kill_dul, dul.stop_dul

    def kill_dul() -> None:
        kill()
        wake()

    def stop_dul() -> bool:
        wake()
        return bool(stop())

    dul.kill_dul = kill_dul
    dul.stop_dul = stop_dul


# -- the association side ----------------------------------------------------------------------


def _notify_on_put(owner: Any, name: str, notify: Callable[[], None]) -> None:
    """Replace the queue ``owner.<name>`` by a :class:`_NotifyingQueue` (items kept)."""
    old = getattr(owner, name)
    new = _NotifyingQueue(notify)
    while True:
        try:
            new.put_nowait(old.get_nowait())
        except queue.Empty:
            break
    setattr(owner, name, new)


def replace_association_loop(assoc: Any, poll: float) -> None:
    """Serve this acceptor association with :func:`serve_association` (before it starts)."""
    wake = threading.Event()
    _notify_on_put(assoc.dimse, "msg_queue", wake.set)
    _notify_on_put(assoc.dul, "to_user_queue", wake.set)
    assoc._run_reactor = functools.partial(serve_association, assoc, wake, poll)


def serve_association(assoc: Any, wake: threading.Event, poll: float) -> None:
    """An established acceptor association's loop, ours: it sleeps until the DIMSE layer has
    a complete message or an ACSE primitive arrives (``wake``), or ``poll`` seconds pass (for
    the idle timer and the DUL thread's end), and ends the association the way pynetdicom
    does (the same responses and events)."""
    assoc._is_paused = False
    while not assoc._kill:
        if assoc.dimse.msg_queue.empty():
            wake.wait(poll)
        wake.clear()
        # A send_*() call of ours on this association pauses the loop until it is done.
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, context_id)
        if _finished(assoc):
            return


def _finished(assoc: Any) -> bool:
    """End the association if the peer released or aborted it, the network thread ended, or
    it was idle too long; True when it ended."""
    if assoc.is_established and assoc.acse.is_release_requested():
        assoc.acse.send_release(is_response=True)
        assoc.is_released, assoc.is_established = True, False
        evt.trigger(assoc, evt.EVT_RELEASED, {})
    elif assoc.acse.is_aborted():
        assoc.dul.receive_pdu(wait=False)  # the A-ABORT's EVT_ACSE_RECV, for subscribers
        assoc.is_aborted, assoc.is_established = True, False
        evt.trigger(assoc, evt.EVT_ABORTED, {})
    elif not assoc.dul.is_alive():
        pass
    elif assoc.dul.idle_timer_expired():
        if assoc.network_timeout_response == "A-RELEASE":
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc.release()
            assoc._is_paused = False
        else:
            assoc.abort()
    else:
        return False
    assoc.kill()
    return True


def accepted_context(assoc: Any, context_id: int) -> Any | None:
    """The accepted presentation context with this ID, or None."""
    return assoc._accepted_cx.get(context_id)


def release_started(assoc: Any) -> bool:
    """Whether this association has sent an A-RELEASE request or response."""
    return bool(assoc._sent_release)


def reassembling(assoc: Any) -> bool:
    """Whether pynetdicom's DIMSE layer holds part of a message."""
    return assoc.dimse.message is not None


def wrap_serve_request(
    assoc: Any, wrapper: Callable[[Callable[[Any, int], None], Any, int], None]
) -> None:
    """Route every DIMSE request this association's reactor serves through
    ``wrapper(original, msg, context_id)``."""
    original = assoc._serve_request

    def serve(msg: Any, context_id: int) -> None:
        wrapper(original, msg, context_id)

    assoc._serve_request = serve


def create_acceptor(handler: RequestHandler) -> Association:
    """The acceptor association pynetdicom builds for a request handler's socket."""
    return handler._create_association()


def register_server(ae: Any, server: Any) -> None:
    """Let ``ae.shutdown()`` stop ``server`` too (as for pynetdicom's own servers)."""
    ae._servers.append(server)


# -- module-level settings ---------------------------------------------------------------------


def quiet_identifier_logging() -> None:
    """Never log request/response identifiers (they hold patient data)."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


def ui_validator() -> Callable[[Any], tuple[bool, str]]:
    """pynetdicom's validator of UI values."""
    return cast("Callable[[Any], tuple[bool, str]]", _config.VALIDATORS["UI"])


def set_ui_validator(validator: Callable[[Any], tuple[bool, str]]) -> None:
    _config.VALIDATORS["UI"] = validator


def transfer_syntax_list(context: PresentationContext) -> list[Any]:
    """The list a presentation context keeps its transfer syntaxes in (appended to in
    place, as ``add_transfer_syntax`` does)."""
    return cast("list[Any]", context._transfer_syntax)
