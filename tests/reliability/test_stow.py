"""STOW-RS into a real `dicomai serve` process: a 500-instance body streamed with the daemon's
memory bounded, and kill -9 during uploads losing nothing that was acknowledged.

The daemon runs with [dicomweb] enabled (environment overrides, as an operator would) and no
routes (no model loads: the daemon's memory is the receiver's). Each test prints its figures
(``pytest -s``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pydicom
import pytest

from dicomai_tools import synthetic
from tests.conftest import free_port, tcp_listen
from tests.reliability.conftest import RelRssSampler, RelServe
from tests.stow_client import body, part10, post
from tests.waiting import let_time_pass, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]


def _serve(rel_serve, local_pacs, quiet: float = 600.0) -> tuple[RelServe, int]:
    web_port = free_port()
    serve = rel_serve(local_pacs.port, quiet=quiet, routes=[], env={
        "DICOMAI_DICOMWEB__ENABLED": "true", "DICOMAI_DICOMWEB__PORT": str(web_port)})
    return serve, web_port


def _start(serve: RelServe, web_port: int) -> None:
    serve.start()
    wait_until(lambda: tcp_listen(web_port), timeout=30, what="STOW-RS port listening")


def _slices(template: pydicom.Dataset, start: int, count: int, tag: str) -> Iterator[bytes]:
    """``count`` Part 10 files of one study made from ``template`` (a new SOP instance UID
    and instance number each), one at a time."""
    for i in range(start, start + count):
        ds = template.copy()
        ds.file_meta = template.file_meta.copy()
        uid = synthetic.derive_uid("stow-reliability", tag, i)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        yield part10(ds)


def _uids(tag: str, start: int, count: int) -> list[str]:
    return [str(synthetic.derive_uid("stow-reliability", tag, i))
            for i in range(start, start + count)]


def test_500_ct_slices_in_one_request_with_memory_bounded(rel_serve, local_pacs, rel_report):
    serve, web_port = _serve(rel_serve, local_pacs)
    template = synthetic.make_head_ct(1, rows=512, cols=512, seed=201)[0]
    study = str(template.StudyInstanceUID)
    _start(serve, web_port)
    # Warm up (lazy imports, the first spool files, connection pools), then let RSS settle.
    warm = post(web_port, body(_slices(template, 10_000, 3, "warm")))
    assert warm.status == 200
    wait_until(lambda: serve.status()["daemon"]["up"], timeout=30, what="daemon heartbeat")
    let_time_pass(2.0, "the resident set settles after the warm-up: the baseline")
    baseline = RelRssSampler.rss_kb(serve.pid)
    assert baseline is not None
    n = 500
    slice_bytes = len(next(_slices(template, 0, 1, "size")))
    t0 = time.monotonic()
    with RelRssSampler(serve.pid, interval=0.05) as sampler:
        answer = post(web_port, body(_slices(template, 0, n, "big")), timeout=600)
    seconds = time.monotonic() - t0
    assert answer.status == 200, answer.raw[:300]
    assert answer.stored == _uids("big", 0, n)
    assert serve.instance_count(study) == n + 3
    peak = max(rss for _, rss, _ in sampler.samples)
    growth_mb = (peak - baseline) / 1024
    body_mb = n * slice_bytes / 2**20
    rel_report("body (MiB) / instances", f"{body_mb:.0f} / {n}")
    rel_report("daemon RSS baseline / peak (MiB)", f"{baseline / 1024:.0f} / {peak / 1024:.0f}")
    rel_report("RSS growth during the upload (MiB)", round(growth_mb, 1))
    rel_report("upload (s, img/s)", f"{seconds:.1f}, {n / seconds:.0f}")
    assert len(sampler.samples) > 10
    assert body_mb > 200  # the body would not fit in the bound below
    assert growth_mb < 150, f"daemon RSS grew {growth_mb:.0f} MiB during a {body_mb:.0f} MiB body"


def test_kill_during_stow_uploads_keeps_every_acknowledged_instance(rel_serve, local_pacs,
                                                                    rel_report):
    serve, web_port = _serve(rel_serve, local_pacs)
    template = synthetic.make_head_ct(1, rows=256, cols=256, seed=202)[0]
    study = str(template.StudyInstanceUID)
    _start(serve, web_port)
    per_request, requests = 20, 40
    acknowledged: list[str] = []
    errors: list[BaseException] = []
    answered = threading.Event()
    stop = threading.Event()

    def upload() -> None:
        for r in range(requests):
            if stop.is_set():
                return
            try:
                answer = post(web_port, body(_slices(template, r * per_request, per_request,
                                                     "kill")), timeout=60)
            except OSError as exc:  # the daemon died under this request
                errors.append(exc)
                return
            if answer.status in (200, 202):
                acknowledged.extend(answer.stored)
                if len(acknowledged) >= 3 * per_request:
                    answered.set()

    client = threading.Thread(target=upload, daemon=True)
    client.start()
    assert answered.wait(120), "no three requests answered"
    # Kill in the middle of a request: once the next one has stored some of its instances.
    wait_until(lambda: serve.instance_count(study) > len(acknowledged) + 3, timeout=60,
               interval=0.01, what="a request half stored")
    serve.kill9()
    stop.set()
    client.join(60)
    acked = set(acknowledged)
    rows = serve.instances(study)
    indexed = {uid for uid, _, _ in rows}
    assert errors, "the upload in flight did not fail: the kill proves nothing"
    assert acked <= indexed
    assert len(indexed) > len(acked)  # instances of the request in flight were stored too
    for uid, path, _ in rows:  # every indexed instance is complete on disk
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == uid and len(ds.PixelData) == ds.Rows * ds.Columns * 2

    _start(serve, web_port)
    assert {uid for uid, _, _ in serve.instances(study)} == indexed
    # The client sends the cut request again: stored or duplicate, all answered as stored.
    r = len(acknowledged) // per_request
    again = post(web_port, body(_slices(template, r * per_request, per_request, "kill")))
    assert again.status == 200 and len(again.stored) == per_request
    rel_report("acknowledged / indexed at kill", f"{len(acked)} / {len(indexed)}")
    rel_report("daemon start times (s)", serve.started)
