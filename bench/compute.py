"""Compute per study on this machine: decode + preprocess + inference, against the targets.

* Chest X-ray, 2500×2000, JPEG 2000 lossless and uncompressed: decode (full vs reduced
  resolution), preprocess, inference and the total through :func:`dicomai.inference.processing.analyse`
  (what the worker runs) — target ≤ 250 ms. The Secondary Capture render of the key image
  (a separate full-resolution decode, not part of the target) is shown too.
* Head CT, 200 slices 512², uncompressed: reading the files, preprocessing, inference and the
  total — target ≤ 10 s.

Uses the bundled reference models (built on first use, as ``serve`` does) through the worker's
:class:`~dicomai.models.pool.ModelPool`, on CPU with ``--threads`` torch threads. Medians over
``--repeats``. Not a test: it prints figures.

    .venv/bin/python bench/compute.py [--repeats 5] [--ct-repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402

from dicomai.inference import processing as inference  # noqa: E402
from dicomai_tools import synthetic  # noqa: E402
from dicomai.config import load_settings  # noqa: E402
from dicomai.inference.decode import decode_reduced  # noqa: E402
from dicomai.inference.findings import Task  # noqa: E402
from dicomai.results.display import display_rgb  # noqa: E402
from dicomai.models.pool import ModelPool  # noqa: E402

CHEST_TARGET_MS = 250.0
CT_TARGET_S = 10.0


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _read(blob: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(blob))


def _blob(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _warm(backend: Any, batch: int, size: int) -> None:
    """TorchScript's profiling executor specialises on the first calls: keep them out."""
    for _ in range(3):
        backend.predict(np.zeros((batch, 3, size, size), dtype=np.float32))


def _machine() -> str:
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def _chest(pool: ModelPool, repeats: int) -> dict[str, dict[str, float]]:
    name = "chest-xray"
    spec = pool.settings.model_settings(name)
    backend = pool.get(name)
    pre = spec.preprocessing
    _warm(backend, 1, pre.input_size)
    native = synthetic.make_xray("chest", rows=2000, cols=2500, seed=7)
    cases = {"j2k_lossless": _blob(synthetic.recompress(native, JPEG2000Lossless)),
             "uncompressed": _blob(native)}
    out: dict[str, dict[str, float]] = {}
    for case, blob in cases.items():
        rows: dict[str, list[float]] = {k: [] for k in (
            "read", "decode_full", "decode_reduced", "preprocess", "inference", "total",
            "sc_render")}
        for _ in range(repeats):
            t, ds = _timed(lambda b=blob: _read(b))  # type: ignore[misc]
            rows["read"].append(t)
            t, _ = _timed(lambda d=ds: pydicom.pixels.pixel_array(d))  # type: ignore[misc]
            rows["decode_full"].append(t)
            t, reduced = _timed(
                lambda d=ds: decode_reduced(d, 2 * pre.input_size))  # type: ignore[misc]
            rows["decode_reduced"].append(t if reduced is not None else float("nan"))
            decoded = inference._frame_for_size(ds, 2 * pre.input_size)  # what it will use
            saved = inference._frame_for_size
            inference._frame_for_size = lambda *a, **k: decoded  # type: ignore[assignment]
            try:
                t, x = _timed(lambda d=ds: inference.preprocess_xray(d, pre))  # type: ignore[misc]
            finally:
                inference._frame_for_size = saved
            rows["preprocess"].append(t)
            t, _ = _timed(lambda x=x: backend.predict(x[None]))  # type: ignore[misc]
            rows["inference"].append(t)
            fresh = _read(blob)
            t, _ = _timed(lambda d=fresh: inference.analyse(  # type: ignore[misc]
                Task(spec.task), [d], backend, spec, datetime.now(UTC)))
            rows["total"].append(t)
            t, _ = _timed(lambda d=fresh: display_rgb(d))  # type: ignore[misc]
            rows["sc_render"].append(t)
        out[case] = {k: round(statistics.median(v) * 1000, 1) for k, v in rows.items()}
        out[case]["total_best"] = round(min(rows["total"]) * 1000, 1)
    return out


def _ct(pool: ModelPool, repeats: int) -> dict[str, float]:
    name = "head-ct-ich"
    spec = pool.settings.model_settings(name)
    backend = pool.get(name)
    pre = spec.preprocessing
    _warm(backend, pre.batch_size, pre.input_size)
    slices = synthetic.make_head_ct(200, rows=512, cols=512, seed=5)
    rows: dict[str, list[float]] = {k: [] for k in (
        "read", "preprocess", "inference", "analyse", "total")}
    with tempfile.TemporaryDirectory(prefix="dicomai-compute-") as tmp:
        files = synthetic.write_study(slices, Path(tmp))
        for _ in range(repeats):
            t_read, datasets = _timed(lambda: [pydicom.dcmread(p) for p in files])
            t_prep, inputs = _timed(lambda d=datasets: [  # type: ignore[misc]
                inference.preprocess_ct_slice(s, pre) for s in d])
            t_inf, _ = _timed(lambda x=inputs: [  # type: ignore[misc]
                backend.predict(np.stack(x[i:i + pre.batch_size]))
                for i in range(0, len(x), pre.batch_size)])
            fresh = [pydicom.dcmread(p) for p in files]
            t_all, _ = _timed(lambda d=fresh: inference.analyse(  # type: ignore[misc]
                Task(spec.task), d, backend, spec, datetime.now(UTC)))
            rows["read"].append(t_read)
            rows["preprocess"].append(t_prep)
            rows["inference"].append(t_inf)
            rows["analyse"].append(t_all)
            rows["total"].append(t_read + t_all)
    out = {k: round(statistics.median(v), 2) for k, v in rows.items()}
    out["total_best"] = round(min(rows["total"]), 2)
    out["slices"] = len(slices)
    out["batch_size"] = pre.batch_size
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="chest X-ray repeats")
    parser.add_argument("--ct-repeats", type=int, default=2, help="200-slice CT repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--skip-ct", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    settings = load_settings(REPO / "config" / "dicomai.toml", environ={}, overrides={
        "logging": {"level": "WARNING"}})
    models = {n: m.model_copy(update={"device": "cpu"}) for n, m in settings.models.items()}
    pool = ModelPool(settings.model_copy(update={"models": models}))
    print(f"machine: {_machine()}")
    figures: dict[str, Any] = {"chest_xray_2500x2000": _chest(pool, args.repeats)}
    print(f"\nchest X-ray 2500×2000 (DenseNet-121, 224²), median of {args.repeats}, ms:")
    print(f"{'case':<13} {'read':>6} {'decode full':>12} {'decode reduced':>15} "
          f"{'preprocess':>11} {'inference':>10} {'total':>7}  target {CHEST_TARGET_MS:.0f}"
          f"   {'SC render':>9}")
    for case, f in figures["chest_xray_2500x2000"].items():
        verdict = "met" if f["total"] <= CHEST_TARGET_MS else "NOT met"
        reduced = "-" if np.isnan(f["decode_reduced"]) else f"{f['decode_reduced']:.1f}"
        print(f"{case:<13} {f['read']:>6.1f} {f['decode_full']:>12.1f} {reduced:>15} "
              f"{f['preprocess']:>11.1f} {f['inference']:>10.1f} {f['total']:>7.1f}  {verdict:<10}"
              f" {f['sc_render']:>9.1f}   (best total {f['total_best']:.1f})")
    print("(total = analyse() on a freshly read dataset: decode + preprocess + inference; "
          "read and SC render are outside it)")
    if not args.skip_ct:
        ct = figures["head_ct_200x512"] = _ct(pool, args.ct_repeats)
        verdict = "met" if ct["total"] <= CT_TARGET_S else "NOT met"
        print(f"\nhead CT, {ct['slices']:.0f} slices 512² (ResNet-18, 256², batch "
              f"{ct['batch_size']:.0f}), median of {args.ct_repeats}, s:")
        print(f"read {ct['read']:.2f}  preprocess {ct['preprocess']:.2f}  inference "
              f"{ct['inference']:.2f}  analyse {ct['analyse']:.2f}  total (read + analyse) "
              f"{ct['total']:.2f} (best {ct['total_best']:.2f})  target {CT_TARGET_S:.0f}: "
              f"{verdict}")
    print(f"\nafter: load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
