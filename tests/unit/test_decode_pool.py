"""dicomai.inference.prepare.DecodePool: a decode that passes its memory or time budget, or a decode
process that dies, fails that image's job with a clear error; the process is replaced (or goes
on) and later images are served. Real processes, real files."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomai_tools import synthetic
from dicomai.config import PreprocessingSettings
from dicomai.errors import DecodeFailed, DecodeOverBudget, PermanentError, RetryableError
from dicomai.inference.findings import Task
from dicomai.inference.processing import preprocess_xray
from dicomai.inference.prepare import DecodePool, PreparedInputs
from tests.waiting import wait_until

PRE = PreprocessingSettings(input_size=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A small radiograph, and one whose decoding and preprocessing need well over 64 MB
    (6000 x 6000 x 16 bits: 72 MB of pixels, read, copied and converted to float)."""
    root = tmp_path_factory.mktemp("decode")
    small = synthetic.make_xray("chest", rows=128, cols=112, seed=1)
    large = synthetic.make_xray("chest", rows=64, cols=64, seed=2)
    large.Rows = large.Columns = 6000
    large.PixelData = np.full((6000, 6000), 1000, dtype=np.uint16).tobytes()
    return {"small": str(synthetic.write_study([small], root / "small")[0]),
            "large": str(synthetic.write_study([large], root / "large")[0])}


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    p = DecodePool(1, memory_mb=64, timeout_seconds=60)
    try:
        yield p
    finally:
        p.shutdown()


def _input(pool: DecodePool, path: str) -> np.ndarray:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    (fut,) = pool.submit([path], Task.CHEST_XRAY, PRE)
    return PreparedInputs([ds], [fut])(ds, PRE)


def test_memory_budget_fails_the_image_and_the_process_goes_on(
        pool: DecodePool, files: dict[str, str]) -> None:
    want = preprocess_xray(pydicom.dcmread(files["small"]), PRE)
    np.testing.assert_array_equal(_input(pool, files["small"]), want)
    (pid,) = pool.pids()
    with pytest.raises(DecodeOverBudget, match="decode_memory_mb") as failed:
        _input(pool, files["large"])
    assert isinstance(failed.value, PermanentError)  # the same image needs the same again
    # The same process serves the next image; nothing was replaced.
    np.testing.assert_array_equal(_input(pool, files["small"]), want)
    assert pool.pids() == [pid] and pool.restarts == 0


def test_time_budget_replaces_the_process(files: dict[str, str]) -> None:
    pool = DecodePool(1, memory_mb=1024, timeout_seconds=1.0)
    try:
        wait_until(lambda: len(pool.pids()) == 1, timeout=120, interval=0.05,
                   what="the decode process started")
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGSTOP)  # a decoder that never returns
        try:
            with pytest.raises(DecodeFailed, match="decode_timeout_seconds") as failed:
                _input(pool, files["small"])
        finally:
            with contextlib.suppress(ProcessLookupError):  # killed and reaped by then
                os.kill(pid, signal.SIGCONT)
        assert isinstance(failed.value, RetryableError)
        assert pool.restarts == 1
        want = preprocess_xray(pydicom.dcmread(files["small"]), PRE)
        np.testing.assert_array_equal(_input(pool, files["small"]), want)
        assert pool.pids() != [pid]
    finally:
        pool.shutdown()


def test_a_process_that_dies_mid_image_fails_that_image_only(files: dict[str, str]) -> None:
    pool = DecodePool(1, memory_mb=1024, timeout_seconds=60)
    try:
        wait_until(lambda: len(pool.pids()) == 1, timeout=120, interval=0.05,
                   what="the decode process started")
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGSTOP)
        path = files["small"]
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        first, second = pool.submit([path, path], Task.CHEST_XRAY, PRE)
        wait_until(first.running, timeout=120, interval=0.05,
                   what="the image sent to the stopped process")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(DecodeFailed, match="died"):
            PreparedInputs([ds], [first])(ds, PRE)
        # The next image, queued behind it, is served by the new process.
        want = preprocess_xray(pydicom.dcmread(path), PRE)
        np.testing.assert_array_equal(PreparedInputs([ds], [second])(ds, PRE), want)
        assert pool.restarts == 1
    finally:
        pool.shutdown()


def test_unsupported_input_and_missing_files_are_reported_as_before(
        pool: DecodePool, files: dict[str, str], tmp_path: Path) -> None:
    no_pixels = synthetic.make_xray("chest", rows=64, cols=64, seed=3)
    del no_pixels.PixelData
    (path,) = synthetic.write_study([no_pixels], tmp_path)
    (fut,) = pool.submit([str(path)], Task.CHEST_XRAY, PRE)
    assert fut.result(timeout=120)[0] == "unsupported"
    (missing,) = pool.submit([str(tmp_path / "gone.dcm")], Task.CHEST_XRAY, PRE)
    with pytest.raises(DecodeFailed, match="FileNotFoundError"):
        missing.result(timeout=120)
    assert pool.restarts == 0


def test_shutdown_cancels_queued_images(files: dict[str, str]) -> None:
    pool = DecodePool(1, timeout_seconds=60)
    wait_until(lambda: len(pool.pids()) == 1, timeout=120, interval=0.05,
               what="the decode process started")
    (pid,) = pool.pids()
    os.kill(pid, signal.SIGSTOP)
    futures = pool.submit([files["small"]] * 3, Task.CHEST_XRAY, PRE)
    wait_until(futures[0].running, timeout=120, interval=0.05,
               what="the first image sent to the stopped process")
    pool.shutdown(timeout=1.0)  # the stopped process does not finish: it is killed
    assert all(f.cancelled() for f in futures[1:])
    with pytest.raises(DecodeFailed):
        futures[0].result(timeout=30)
    assert pool.pids() == []
    with pytest.raises(RuntimeError):
        pool.submit([files["small"]], Task.CHEST_XRAY, PRE)
