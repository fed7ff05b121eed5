"""Cross-study batching (dicomai.inference.batching), the decode processes (dicomai.inference.prepare), the new
worker/model keys, and CUDA precision options of the backend that can be checked on CPU."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import Tensor, nn

from dicomai_tools import synthetic
from dicomai.inference.batching import BatchingPredictor
from dicomai.config import ModelSettings, PreprocessingSettings, WorkerSettings
from dicomai.errors import InferenceError, Interrupted, UnsupportedInput
from dicomai.inference.findings import ModelIdentity, Task
from dicomai.inference.processing import analyse, preprocess_ct_slice, preprocess_xray
from dicomai.models.backend import TorchScriptBackend
from dicomai.inference.prepare import DecodePool, PreparedInputs
from tests.waiting import wait_until

LABELS = ("a", "b", "c")
IDENTITY = ModelIdentity(name="tiny", version="1", sha256="0" * 64, task=Task.CHEST_XRAY,
                         architecture="tiny-cnn", description="test model")


class _Tiny(nn.Module):
    """A small CAM classifier: conv features, 1x1 conv to label maps, mean-pooled logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, len(LABELS), 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cams = self.head(self.features(x))
        return cams.mean(dim=(2, 3)), cams


def tiny_backend() -> TorchScriptBackend:
    module = torch.jit.script(_Tiny().eval())
    return TorchScriptBackend(module, identity=IDENTITY, labels=LABELS,
                              device=torch.device("cpu"))


class Counting:
    """Wraps a backend: counts calls and batch sizes, can hold the first call on a gate, and
    fails any batch that holds an image marked with a huge value. ``entered`` has the size of
    each call as it comes in, before the gate."""

    def __init__(self, backend: TorchScriptBackend, gate: threading.Event | None = None) -> None:
        self.backend = backend
        self.gate = gate
        self.sizes: list[int] = []
        self.entered: list[int] = []
        self.lock = threading.Lock()

    identity = property(lambda self: self.backend.identity)
    labels = property(lambda self: self.backend.labels)
    device = property(lambda self: self.backend.device)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self.lock:
            self.entered.append(len(batch))
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.sizes.append(len(batch))
        if (batch > 1e6).any():
            raise InferenceError("poisoned input")
        return self.backend.predict(batch)


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def queued(batcher: BatchingPredictor) -> list[int]:
    """The image counts of the requests waiting in the batcher (a test's look at its queue)."""
    with batcher._cond:
        return [len(r.batch) for r in batcher._pending]


def wait_held(counting: Counting) -> None:
    """Wait until the first model call has come in (and is held on the gate)."""
    wait_until(lambda: counting.entered, timeout=10, interval=0.01,
               what="the first model call held on the gate")


# -- batching ----------------------------------------------------------------------------------


def test_concurrent_callers_share_model_calls_and_get_their_own_rows() -> None:
    backend = tiny_backend()
    gate = threading.Event()
    counting = Counting(backend, gate)
    batcher = BatchingPredictor(counting, max_batch=64, max_wait_ms=200)
    callers, per_caller = 6, 3
    requests = {(c, k): images(1 + (c + k) % 4, seed=10 * c + k)
                for c in range(callers) for k in range(per_caller)}
    got: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
    errors: list[BaseException] = []
    started = threading.Barrier(callers)

    def job(c: int) -> None:
        try:
            with batcher.session() as predictor:
                started.wait(5)
                for k in range(per_caller):  # sequential, like _run_batches
                    got[(c, k)] = predictor.predict(requests[(c, k)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(c,)) for c in range(callers)]
    for t in threads:
        t.start()
    wait_held(counting)
    firsts = sum(len(requests[(c, 0)]) for c in range(callers))
    wait_until(lambda: counting.entered[0] + sum(queued(batcher)) == firsts, timeout=10,
               interval=0.01, what="every caller's first request held or queued")
    gate.set()
    for t in threads:
        t.join(10)
    batcher.close()
    assert not errors
    assert len(got) == callers * per_caller
    # Fewer model calls than requests, and every image run exactly once.
    assert len(counting.sizes) < callers * per_caller
    assert max(counting.sizes) > 4
    assert sum(counting.sizes) == sum(len(b) for b in requests.values())
    for key, batch in requests.items():
        probs, cams = got[key]
        ref_probs, ref_cams = backend.predict(batch)  # unbatched
        assert probs.shape == ref_probs.shape and probs.dtype == np.float32
        np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
        assert cams is not None and ref_cams is not None
        np.testing.assert_allclose(cams, ref_cams, atol=1e-5)


def test_a_failing_input_fails_only_its_caller() -> None:
    gate = threading.Event()
    counting = Counting(tiny_backend(), gate)
    batcher = BatchingPredictor(counting, max_batch=32, max_wait_ms=500)
    poisoned = images(2, seed=1)
    poisoned[1, 0, 0, 0] = 1e9
    inputs = {"good1": images(3, seed=2), "bad": poisoned, "good2": images(1, seed=3)}
    outcome: dict[str, object] = {}

    def job(name: str) -> None:
        with batcher.session() as predictor:
            try:
                outcome[name] = predictor.predict(inputs[name])
            except Exception as exc:
                outcome[name] = exc

    holder = threading.Thread(target=batcher.predict, args=(images(1, seed=0),))
    holder.start()  # holds the model on the gate while the three queue up
    wait_held(counting)
    threads = [threading.Thread(target=job, args=(n,)) for n in inputs]
    for t in threads:
        t.start()
    wait_until(lambda: len(queued(batcher)) == 3, timeout=10, interval=0.01,
               what="the three requests queued")
    gate.set()
    for t in [holder, *threads]:
        t.join(10)
    batcher.close()
    assert isinstance(outcome["bad"], InferenceError)
    for name in ("good1", "good2"):
        probs, _ = outcome[name]  # type: ignore[misc]
        np.testing.assert_allclose(probs, counting.backend.predict(inputs[name])[0], atol=1e-5)
    assert counting.sizes[:2] == [1, 6]  # merged first, then split up after the failure
    assert sorted(counting.sizes[2:]) == [1, 2, 3]


def test_a_lone_job_does_not_wait() -> None:
    batcher = BatchingPredictor(tiny_backend(), max_batch=64, max_wait_ms=2000)
    with batcher.session() as predictor:
        t0 = time.monotonic()
        for k in range(3):
            predictor.predict(images(2, seed=k))
        assert time.monotonic() - t0 < 1.0
    batcher.close()


def test_stop_interrupts_a_waiting_caller_and_close_drains() -> None:
    gate = threading.Event()
    counting = Counting(tiny_backend(), gate)
    batcher = BatchingPredictor(counting, max_batch=1, max_wait_ms=0)
    first: dict[str, object] = {}
    holder = threading.Thread(target=lambda: first.setdefault("out", batcher.predict(images(1, 0))))
    holder.start()  # its call holds the model on the gate
    wait_held(counting)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with batcher.session(stop.is_set) as predictor, pytest.raises(Interrupted):
        predictor.predict(images(1, seed=1))
    # A request still pending when closing is run before the thread ends.
    late: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: late.setdefault("out", batcher.predict(images(1, 2))))
    waiter.start()
    wait_until(lambda: queued(batcher) == [1], timeout=10, interval=0.01,
               what="the late request queued")
    gate.set()
    batcher.close(timeout=5)
    holder.join(5)
    waiter.join(5)
    assert "out" in first and "out" in late
    assert not any(t.name.startswith("batcher-") for t in threading.enumerate())
    # After close, calls go to the model directly.
    probs, _ = batcher.predict(images(1, seed=3))
    assert probs.shape == (1, 3)
    # The interrupted request never reached the model.
    assert sum(counting.sizes) == 3


def test_different_shapes_are_not_merged() -> None:
    counting = Counting(tiny_backend())
    batcher = BatchingPredictor(counting, max_batch=64, max_wait_ms=0)
    small, large = images(2, 0), np.zeros((3, 3, 48, 48), np.float32)
    out: dict[str, object] = {}
    threads = [threading.Thread(target=lambda n=n, b=b: out.setdefault(n, batcher.predict(b)))
               for n, b in (("small", small), ("large", large))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batcher.close()
    assert out["small"][0].shape == (2, 3) and out["large"][0].shape == (3, 3)  # type: ignore[index]


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        BatchingPredictor(tiny_backend(), max_batch=0)
    with pytest.raises(ValueError):
        BatchingPredictor(tiny_backend(), max_batch=4, max_wait_ms=-1)


# -- backend precision (the CUDA path itself is exercised by bench/gpu.py) -----------------------


def test_cpu_ignores_the_cuda_precision() -> None:
    module = torch.jit.script(_Tiny().eval())
    x = images(4, seed=5)
    outs = []
    for precision in ("fp32", "fp16", "bf16"):
        b = TorchScriptBackend(module, identity=IDENTITY, labels=LABELS,
                               device=torch.device("cpu"), precision=precision)
        assert b.precision == "fp32"
        outs.append(b.predict(x))
    for probs, cams in outs[1:]:
        np.testing.assert_array_equal(probs, outs[0][0])
        np.testing.assert_array_equal(cams, outs[0][1])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TorchScriptBackend(module, identity=IDENTITY, labels=LABELS, device=torch.device("cpu"),
                           precision="fp8")


def test_channels_last_gives_the_same_result() -> None:
    module = torch.jit.script(_Tiny().eval())
    x = images(3, seed=6)
    plain = TorchScriptBackend(module, identity=IDENTITY, labels=LABELS,
                               device=torch.device("cpu"))
    nhwc = TorchScriptBackend(module.to(memory_format=torch.channels_last), identity=IDENTITY,
                              labels=LABELS, device=torch.device("cpu"), channels_last=True)
    np.testing.assert_allclose(nhwc.predict(x)[0], plain.predict(x)[0], atol=1e-5)


def test_new_keys_default_to_todays_behaviour() -> None:
    w = WorkerSettings()
    assert w.max_batch == 0
    # Decoding moved out of the worker's process by default, within memory and time budgets.
    assert (w.decode_processes, w.decode_memory_mb, w.decode_timeout_seconds) == (1, 4096, 120)
    m = ModelSettings(path=Path("m.pt"), version="1", task="chest_xray")
    assert m.precision == "fp16"
    with pytest.raises(ValueError):
        ModelSettings(path=Path("m.pt"), version="1", task="chest_xray", precision="fp8")
    with pytest.raises(ValueError):
        WorkerSettings(max_batch=-1)


# -- decode processes --------------------------------------------------------------------------


def test_decode_pool_gives_the_in_thread_inputs(tmp_path: Path) -> None:
    xray = synthetic.make_xray("chest", rows=300, cols=260, seed=4)
    ct = synthetic.make_head_ct(3, rows=64, cols=64, seed=2)
    no_pixels = synthetic.make_xray("chest", rows=64, cols=64, seed=5)
    del no_pixels.PixelData
    paths = [str(p) for p in synthetic.write_study([xray, no_pixels], tmp_path / "x")]
    ct_paths = [str(p) for p in synthetic.write_study(ct, tmp_path / "ct")]
    pre = PreprocessingSettings(input_size=64)
    pool = DecodePool(1)
    try:
        x_futs = pool.submit(paths, Task.CHEST_XRAY, pre)
        ct_futs = pool.submit(ct_paths, "head_ct_ich", pre)
        datasets = [pydicom.dcmread(p) for p in paths]
        ct_datasets = [pydicom.dcmread(p) for p in ct_paths]
        prepared = PreparedInputs(datasets, x_futs)
        by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
        xray_ds = by_uid[str(xray.SOPInstanceUID)]
        np.testing.assert_array_equal(prepared(xray_ds, pre), preprocess_xray(xray_ds, pre))
        with pytest.raises(UnsupportedInput):
            prepared(by_uid[str(no_pixels.SOPInstanceUID)], pre)
        ct_prepared = PreparedInputs(ct_datasets, ct_futs)
        for ds in ct_datasets:
            np.testing.assert_array_equal(ct_prepared(ds, pre), preprocess_ct_slice(ds, pre))

        # analyse gives the same findings either way (CT: slices reordered inside analyse).
        spec = ModelSettings(path=Path("m.pt"), version="1", task="head_ct_ich",
                             labels=list(LABELS), preprocessing=pre)
        backend = tiny_backend()
        now = datetime.now(UTC)
        a = analyse(Task.HEAD_CT_ICH, ct_datasets, backend, spec, now)
        b = analyse(Task.HEAD_CT_ICH, ct_datasets, backend, spec, now, preprocess=ct_prepared)
        assert a.image_scores == b.image_scores and a.key_image_uids == b.key_image_uids

        # Stopping while waiting for a result raises Interrupted.
        stopping = PreparedInputs(ct_datasets, pool.submit(ct_paths, "head_ct_ich", pre),
                                  should_stop=lambda: True)
        with pytest.raises(Interrupted):
            stopping(ct_datasets[0], pre)

        # A process that dies while idle is replaced before the next image.
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pool.pids(), timeout=60, interval=0.01,
                   what="the killed process gone, before the next image")
        again = PreparedInputs(datasets, pool.submit(paths, Task.CHEST_XRAY, pre))
        np.testing.assert_array_equal(again(xray_ds, pre), preprocess_xray(xray_ds, pre))
        assert pool.restarts == 1 and pool.pids() != [pid]
    finally:
        pool.shutdown()
