"""Sends in flight are cut short at shutdown: a destination that never answers the association
request, and one that never answers a C-STORE, both over real loopback connections."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from dicomai_tools import synthetic
from dicomai.config import DestinationSettings
from dicomai_tools.local_pacs import LocalPacs
from dicomai.delivery.dimse import send_objects
from dicomai.delivery.transport import SendCancel, SendItem, SendReport
from dicomai.jobs.policy import SendOutcome
from tests.waiting import let_time_pass, wait_until

XRAY = "1.2.840.10008.5.1.4.1.1.1"  # CR


def _send_in_thread(dest: DestinationSettings, items: list[SendItem],
                    cancel: SendCancel) -> tuple[threading.Thread, dict[str, SendReport]]:
    out: dict[str, SendReport] = {}
    thread = threading.Thread(target=lambda: out.update(report=send_objects(
        dest, items, calling_ae="DICOMAI", timeout=30, cancel=cancel)), daemon=True)
    thread.start()
    return thread, out


def _xray(tmp_path: Path) -> list[SendItem]:
    ds = synthetic.make_xray("chest", modality="CR", rows=32, cols=32, seed=5)
    (path,) = synthetic.write_study([ds], tmp_path)
    return [SendItem(1, str(path), XRAY)]


def test_a_node_that_never_answers_the_association_request(tmp_path: Path) -> None:
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(4)
    try:
        dest = DestinationSettings(name="hung", ae_title="HUNG", host="127.0.0.1",
                                   port=hung.getsockname()[1])
        cancel = SendCancel()
        thread, out = _send_in_thread(dest, _xray(tmp_path), cancel)
        let_time_pass(0.5, "the send is out and waits for an A-ASSOCIATE-AC that never comes")
        assert thread.is_alive()  # waiting for the A-ASSOCIATE-AC (30 s timeout)
        t0 = time.monotonic()
        assert cancel.cancel() == 1
        thread.join(5)
        assert not thread.is_alive() and time.monotonic() - t0 < 5
        assert out["report"].outcomes[1][0] is SendOutcome.RETRY
        # a send started after the cancel does not even connect
        assert send_objects(dest, _xray(tmp_path / "b"), calling_ae="DICOMAI", timeout=30,
                            cancel=cancel).outcomes[1][0] is SendOutcome.RETRY
    finally:
        hung.close()


def test_a_node_that_never_answers_a_c_store(tmp_path: Path) -> None:
    release = threading.Event()

    def stuck(_ds: object) -> int:
        release.wait(30)
        return 0x0000

    with LocalPacs(ae_title="STUCK") as pacs:
        pacs.status_fn = stuck
        dest = DestinationSettings(name="stuck", ae_title="STUCK", host="127.0.0.1",
                                   port=pacs.port)
        cancel = SendCancel()
        thread, out = _send_in_thread(dest, _xray(tmp_path), cancel)
        try:
            wait_until(lambda: cancel._assocs, timeout=10, interval=0.05,
                       what="the association established")
            let_time_pass(0.5, "the C-STORE-RQ is out, its response never comes")
            assert thread.is_alive()
            t0 = time.monotonic()
            assert cancel.cancel() == 1
            thread.join(5)
            assert not thread.is_alive() and time.monotonic() - t0 < 5
            assert out["report"].outcomes[1][0] is SendOutcome.RETRY
        finally:
            release.set()
