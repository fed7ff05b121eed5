"""The receiver's connection lobby and PDU deadlines (dicomai.ingest.lobby, .pdu_reader),
against an in-process receiver over loopback sockets.

Connections that have not sent a complete A-ASSOCIATE-RQ cost no thread, are capped (the
oldest dropped first) and timed out; a PDU whose bytes stop coming is dropped after the
network timeout; more associations than ``max_associations`` are rejected at once.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import running_daemon
from tests.integration.test_fast_store import quiet
from tests.waiting import let_time_pass, wait_until


def echo(port: int, timeout: float = 10.0) -> int | None:
    """A C-ECHO over a fresh association: its status, or None when none was established."""
    ae = AE("ECHOER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()


def associate_rq(called: str = "DICOMAI", calling: str = "HOSTILE") -> bytes:
    """A minimal A-ASSOCIATE-RQ proposing Verification, built by hand (PS3.8 9.3.2)."""

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    context = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1")
                   + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + bytes(32) + item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the other end closes ``sock`` within ``timeout`` (anything it sends first,
    e.g. an A-ABORT, is read and dropped)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


@pytest.fixture
def receiver(make_settings):
    settings = quiet(make_settings, acse_timeout_seconds=2, network_timeout_seconds=2,
                     max_pending_connections=100, max_pending_per_address=40,
                     max_associations=4)
    with running_daemon(settings, roles=["receiver"]) as daemon:
        yield daemon.receiver


def test_300_half_open_connections_neither_lock_out_nor_cost_threads(receiver):
    port = receiver.port
    threads_before = threading.active_count()
    half = associate_rq()[:40]
    held = []
    for i in range(300):
        sock = connect(port)
        if i % 2:
            sock.sendall(half)  # half an association request, then silence
        held.append(sock)
    try:
        let_time_pass(0.3, "the receiver takes in the 300 connections")
        assert receiver.lobby is not None
        assert receiver.lobby.waiting <= 40  # capped per address, oldest dropped
        assert threading.active_count() <= threads_before + 2  # no thread per connection
        started = time.monotonic()
        assert echo(port) == 0x0000  # a legitimate peer gets in while they are held
        assert time.monotonic() - started < 10
        # every held connection is closed by the receiver within the set-up timeout
        deadline = time.monotonic() + 2 + 3
        assert all(closed_by_peer(s, max(0.1, deadline - time.monotonic())) for s in held)
        assert receiver.lobby.dropped["evicted"] >= 250
        assert receiver.lobby.dropped["timeout"] >= 1
    finally:
        for sock in held:
            sock.close()
    assert echo(port) == 0x0000


def test_a_pdu_that_stops_arriving_is_dropped_after_the_network_timeout(receiver):
    sock = connect(receiver.port)
    try:
        sock.sendall(associate_rq())
        header = sock.recv(6)
        assert header[0] == 0x02  # A-ASSOCIATE-AC
        (length,) = struct.unpack(">L", header[2:6])
        while length:
            length -= len(sock.recv(length))
        # a P-DATA-TF announcing 8000 bytes (within our maximum PDU length), 22 sent
        sock.sendall(struct.pack(">BBL", 0x04, 0, 8000) + bytes(22))
        started = time.monotonic()
        assert closed_by_peer(sock, 2 + 3)
        assert time.monotonic() - started >= 1.5  # the deadline, not at once
    finally:
        sock.close()
    wait_until(lambda: receiver.server.open_acceptors() == 0, timeout=5,
               what="the stalled association to end")
    assert echo(receiver.port) == 0x0000


def test_a_pdu_larger_than_announced_is_aborted_at_once(receiver):
    sock = connect(receiver.port)
    try:
        sock.sendall(associate_rq())
        assert sock.recv(6)[0] == 0x02
        sock.recv(65536)
        sock.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + bytes(22))
        sock.settimeout(3)
        data = sock.recv(65536)
        while data and data[0] != 0x07:
            data = sock.recv(65536)
        assert data[:1] == b"\x07"  # A-ABORT
    finally:
        sock.close()


def test_first_bytes_that_are_no_association_request_get_an_abort(receiver):
    sock = connect(receiver.port)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(3)
        assert sock.recv(10)[:1] == b"\x07"
        assert closed_by_peer(sock, 3)
    finally:
        sock.close()


def test_more_associations_than_the_limit_are_rejected_without_threads(receiver):
    ae = AE("HOLDER")
    ae.add_requested_context(Verification)
    holders = [ae.associate("127.0.0.1", receiver.port, ae_title="DICOMAI") for _ in range(4)]
    try:
        assert all(a.is_established for a in holders)
        threads = threading.active_count()
        sock = connect(receiver.port)
        sock.sendall(associate_rq())
        sock.settimeout(5)
        reply = sock.recv(10)
        sock.close()
        # A-ASSOCIATE-RJ: rejected-transient (2), service provider, presentation (3),
        # local limit exceeded (2)
        assert reply == struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 2, 3, 2)
        assert threading.active_count() <= threads + 1
    finally:
        for assoc in holders:
            assoc.release()
    assert echo(receiver.port) == 0x0000
