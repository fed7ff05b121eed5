"""A hostile DICOM peer over raw sockets.

The upper-layer PDUs (PS3.8 section 9.3) and the few DIMSE command sets the attacks need
(PS3.7 section 9.3, Implicit VR Little Endian) are built here byte by byte with ``struct``, so
a test can stop anywhere inside them: half an A-ASSOCIATE-RQ, a P-DATA-TF header announcing
4 GiB, a command where a data set fragment belongs. A normal client (pynetdicom, DCMTK) cannot
be made to do that.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.uid import generate_uid

__all__ = [
    "EXPLICIT_VR_LE",
    "IMPLICIT_VR_LE",
    "VERIFICATION",
    "AssociateAC",
    "Context",
    "HeldConnection",
    "PeerClosed",
    "RawPeer",
    "Siege",
    "associate_rq",
    "c_echo_rq",
    "c_store_rq",
    "command_status",
    "p_data_tf",
    "pdv",
    "release_rq",
    "still_open",
    "wait_all_closed",
]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
#: Our implementation class UID in the A-ASSOCIATE-RQ (a fixed value derived from a name).
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["dicomai tests hostile peer"])

# PDU types (PS3.8 table 9-11)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

# Message control header of a PDV (PS3.8 annex E.2): bit 0 command, bit 1 last fragment.
DATASET_MORE, DATASET_LAST, COMMAND_MORE, COMMAND_LAST = 0x00, 0x02, 0x01, 0x03


class PeerClosed(ConnectionError):
    """The daemon closed or aborted the connection where an answer was expected."""


@dataclass(frozen=True, slots=True)
class Context:
    """A presentation context we propose."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...] = (IMPLICIT_VR_LE,)


@dataclass(frozen=True, slots=True)
class AssociateAC:
    """What the A-ASSOCIATE-AC said: Maximum Length Received (0 = unlimited) and the
    accepted presentation contexts (context id -> transfer syntax)."""

    max_pdu_length: int | None
    accepted: dict[int, str]


# -- encoding ---------------------------------------------------------------------------------
def _item(item_type: int, body: bytes) -> bytes:
    """An item or sub-item: type, reserved, 2-byte big-endian length, body."""
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def associate_rq(contexts: Sequence[Context], *, called_ae: str = "DICOMAI",
                 calling_ae: str = "HOSTILE", max_pdu_length: int = 16384) -> bytes:
    """A complete A-ASSOCIATE-RQ PDU."""
    body = struct.pack(">HH16s16s32s", 1, 0, _ae(called_ae), _ae(calling_ae), bytes(32))
    body += _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
    for cx in contexts:
        subs = _item(0x30, cx.abstract_syntax.encode("ascii")) + b"".join(
            _item(0x40, ts.encode("ascii")) for ts in cx.transfer_syntaxes)
        body += _item(0x20, struct.pack(">BBBB", cx.context_id, 0, 0, 0) + subs)
    user = (_item(0x51, struct.pack(">I", max_pdu_length))
            + _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii"))
            + _item(0x55, b"HOSTILE_PEER"))
    body += _item(0x50, user)
    return struct.pack(">BBI", ASSOCIATE_RQ, 0, len(body)) + body


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One presentation data value item: length (of context id, control and data) first."""
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def p_data_tf(*pdvs: bytes) -> bytes:
    """A P-DATA-TF PDU carrying the given PDV items."""
    body = b"".join(pdvs)
    return struct.pack(">BBI", P_DATA_TF, 0, len(body)) + body


def release_rq() -> bytes:
    return struct.pack(">BBII", RELEASE_RQ, 0, 4, 0)


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _command(elements: dict[int, bytes]) -> bytes:
    """A command set (group 0000, Implicit VR Little Endian) with its group length first."""
    body = b"".join(struct.pack("<HHI", 0x0000, number, len(value)) + value
                    for number, value in sorted(elements.items()))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def c_echo_rq(message_id: int) -> bytes:
    """A C-ECHO-RQ command set (no data set)."""
    return _command({0x0002: _ui(VERIFICATION), 0x0100: _us(0x0030),
                     0x0110: _us(message_id), 0x0800: _us(0x0101)})


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set announcing a data set."""
    return _command({0x0002: _ui(sop_class_uid), 0x0100: _us(0x0001),
                     0x0110: _us(message_id), 0x0700: _us(0x0000), 0x0800: _us(0x0000),
                     0x1000: _ui(sop_instance_uid)})


def command_status(command: bytes) -> int | None:
    """The Status (0000,0900) of a response command set, or None when it has none."""
    pos = 0
    while pos + 8 <= len(command):
        group, number, length = struct.unpack_from("<HHI", command, pos)
        value = command[pos + 8 : pos + 8 + length]
        if (group, number) == (0x0000, 0x0900) and length == 2:
            return int(struct.unpack("<H", value)[0])
        pos += 8 + length
    return None


# -- decoding ---------------------------------------------------------------------------------
def _items(data: bytes) -> Iterable[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(data):
        item_type, _, length = struct.unpack_from(">BBH", data, pos)
        yield item_type, data[pos + 4 : pos + 4 + length]
        pos += 4 + length


def parse_associate_ac(body: bytes) -> AssociateAC:
    """The A-ASSOCIATE-AC's variable items (after the 68 fixed bytes of its body)."""
    max_pdu: int | None = None
    accepted: dict[int, str] = {}
    for item_type, value in _items(body[68:]):
        if item_type == 0x21 and len(value) >= 4:
            context_id, _, result, _ = struct.unpack_from(">BBBB", value)
            syntaxes = [v.decode("ascii").rstrip("\x00") for t, v in _items(value[4:])
                        if t == 0x40]
            if result == 0 and syntaxes:
                accepted[context_id] = syntaxes[0]
        elif item_type == 0x50:
            for sub_type, sub in _items(value):
                if sub_type == 0x51 and len(sub) == 4:
                    max_pdu = int(struct.unpack(">I", sub)[0])
    return AssociateAC(max_pdu, accepted)


# -- a connection -----------------------------------------------------------------------------
@dataclass
class RawPeer:
    """One TCP connection to the daemon, driven by hand."""

    port: int
    host: str = "127.0.0.1"
    timeout: float = 10.0
    sock: socket.socket = field(init=False)
    max_pdu_length: int = field(init=False, default=16384)

    def __post_init__(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            try:
                chunk = self.sock.recv(min(left, 1 << 20))
            except ConnectionResetError as exc:
                raise PeerClosed("connection reset") from exc
            if not chunk:
                raise PeerClosed("connection closed")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def read_pdu(self) -> tuple[int, bytes]:
        """The next PDU: (type, body). Raises :class:`PeerClosed` on EOF or an A-ABORT."""
        pdu_type, _, length = struct.unpack(">BBI", self._recv_exact(6))
        body = self._recv_exact(length)
        if pdu_type == A_ABORT:
            raise PeerClosed("A-ABORT")
        return pdu_type, body

    def associate(self, contexts: Sequence[Context], **kwargs: str) -> AssociateAC:
        """Send an A-ASSOCIATE-RQ and read the answer; an A-ASSOCIATE-RJ raises."""
        self.send(associate_rq(contexts, **kwargs))
        pdu_type, body = self.read_pdu()
        if pdu_type != ASSOCIATE_AC:
            raise PeerClosed(f"association not accepted (PDU type 0x{pdu_type:02X})")
        ac = parse_associate_ac(body)
        if ac.max_pdu_length:
            self.max_pdu_length = ac.max_pdu_length
        return ac

    def read_command(self) -> bytes:
        """Read P-DATA-TF PDUs until a complete command set arrived; return it."""
        parts: list[bytes] = []
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type != P_DATA_TF:
                raise PeerClosed(f"unexpected PDU type 0x{pdu_type:02X}")
            pos = 0
            while pos + 6 <= len(body):
                length, _, control = struct.unpack_from(">IBB", body, pos)
                data = body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & 0x01:
                    parts.append(data)
                    if control & 0x02:
                        return b"".join(parts)

    def echo(self, context_id: int, message_id: int = 1) -> int | None:
        """A C-ECHO on ``context_id``; the response's status."""
        self.send(p_data_tf(pdv(context_id, COMMAND_LAST, c_echo_rq(message_id))))
        return command_status(self.read_command())

    def store(self, context_id: int, sop_class_uid: str, sop_instance_uid: str,
              dataset: bytes, message_id: int = 1) -> int | None:
        """A C-STORE of ``dataset`` (encoded in the context's transfer syntax), split into
        PDUs within the daemon's announced maximum length; the response's status."""
        self.send(p_data_tf(pdv(context_id, COMMAND_LAST,
                                c_store_rq(message_id, sop_class_uid, sop_instance_uid))))
        room = self.max_pdu_length - 6
        for start in range(0, len(dataset), room):
            last = start + room >= len(dataset)
            self.send(p_data_tf(pdv(context_id, DATASET_LAST if last else DATASET_MORE,
                                    dataset[start : start + room])))
        return command_status(self.read_command())

    def release(self) -> None:
        """A-RELEASE-RQ, then wait for the A-RELEASE-RP."""
        self.send(release_rq())
        pdu_type, _ = self.read_pdu()
        if pdu_type != RELEASE_RP:
            raise PeerClosed(f"unexpected PDU type 0x{pdu_type:02X}")

    def wait_closed(self, timeout: float) -> float | None:
        """Seconds until the daemon closed the connection (EOF or reset; anything it sends
        first, such as an A-ABORT, is read and dropped), or None if still open after
        ``timeout``."""
        held = HeldConnection(self.sock, time.monotonic())
        wait_all_closed([held], timeout)
        return None if held.closed_at is None else held.closed_at - held.since


# -- many connections -------------------------------------------------------------------------
@dataclass
class HeldConnection:
    """A connection we keep open and never finish; ``closed_at`` is when we saw the daemon
    close it (``time.monotonic()``), None while it is open."""

    sock: socket.socket
    since: float
    closed_at: float | None = None


def _open_stalled(port: int, host: str, half_rq: bool) -> HeldConnection:
    """A new connection that sends nothing, or the first half of an A-ASSOCIATE-RQ."""
    sock = socket.create_connection((host, port), timeout=10)
    held = HeldConnection(sock, time.monotonic())
    if half_rq:
        rq = associate_rq([Context(1, VERIFICATION)])
        try:
            sock.sendall(rq[: len(rq) // 2])
        except OSError:  # already dropped by the daemon: seen as closed later
            pass
    sock.setblocking(False)
    return held


def _mark_closed(held: Sequence[HeldConnection], timeout: float) -> list[HeldConnection]:
    """Wait up to ``timeout`` for any of ``held`` to become readable; mark and return those
    the daemon closed (EOF or reset; what it sent before, e.g. an A-ABORT, is dropped)."""
    closed = []
    with selectors.DefaultSelector() as sel:
        for h in held:
            if h.closed_at is None:
                sel.register(h.sock, selectors.EVENT_READ, h)
        if not sel.get_map():
            return closed
        for key, _ in sel.select(timeout):
            h = key.data
            try:
                gone = not h.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                gone = False
            except OSError:  # reset
                gone = True
            if gone:
                h.closed_at = time.monotonic()
                closed.append(h)
    return closed


def wait_all_closed(held: Sequence[HeldConnection], timeout: float) -> None:
    """Wait until the daemon has closed every connection in ``held`` (or ``timeout`` passed),
    setting each one's ``closed_at``."""
    deadline = time.monotonic() + timeout
    for h in held:
        h.sock.setblocking(False)
    while any(h.closed_at is None for h in held) and (left := deadline - time.monotonic()) > 0:
        _mark_closed(held, min(left, 0.5))


def still_open(held: Sequence[HeldConnection]) -> int:
    """How many of ``held`` the daemon has neither closed nor answered yet (a look without
    waiting: anything it sent to a connection we never finished, an A-ABORT or an
    A-ASSOCIATE-RJ, means it is being dropped; it is left unread)."""
    count = 0
    for h in held:
        if h.closed_at is not None:
            continue
        h.sock.setblocking(False)  # (with a timeout, recv would wait for data first)
        try:
            h.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            count += 1  # nothing to read: still held
        except OSError:
            pass  # reset
    return count


class Siege:
    """``count`` connections to the daemon that never finish an association: every
    ``half_rq_every``-th sends the first half of an A-ASSOCIATE-RQ (1: all; 0: none), the
    others nothing. With ``replace``, each one the daemon drops is replaced by a new one, so
    that ``count`` are held for as long as the siege lasts. All are closed on exit."""

    def __init__(self, port: int, count: int, *, half_rq_every: int = 2,
                 replace: bool = False, host: str = "127.0.0.1") -> None:
        self.port, self.count, self.host = port, count, host
        self.half_rq_every = half_rq_every
        self.replace = replace
        #: Every connection opened, replacements included, in order.
        self.held: list[HeldConnection] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="siege")

    def _open(self) -> None:
        n = len(self.held)
        half = bool(self.half_rq_every) and n % self.half_rq_every == 0
        self.held.append(_open_stalled(self.port, self.host, half))

    def __enter__(self) -> Siege:
        try:
            for _ in range(self.count):
                self._open()
        except BaseException:
            self.close()
            raise
        if self.replace:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for _ in _mark_closed(list(self.held), 0.1):
                if not self._stop.is_set():
                    self._open()

    def stop_replacing(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def held_now(self) -> int:
        """Connections the daemon has neither closed nor answered yet."""
        return still_open(list(self.held))

    def wait_all_closed(self, timeout: float) -> None:
        """Stop replacing; wait until the daemon closed every connection ever opened."""
        self.stop_replacing()
        wait_all_closed(self.held, timeout)

    def late(self, limit: float) -> list[str]:
        """Connections not closed by the daemon within ``limit`` seconds of being opened."""
        return [f"#{i}: " + ("still open" if h.closed_at is None
                             else f"closed after {h.closed_at - h.since:.1f} s")
                for i, h in enumerate(self.held)
                if h.closed_at is None or h.closed_at - h.since > limit]

    def close(self) -> None:
        self.stop_replacing()
        for h in self.held:
            h.sock.close()
