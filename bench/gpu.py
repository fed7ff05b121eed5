"""GPU throughput of the reference models: precision, batch size, cross-study batching.

Runs on a machine with only Python, numpy and PyTorch (no DICOM stack): it imports just
``dicomai.models`` and ``dicomai.inference.batching``. It builds the untrained reference models itself
(or takes them from ``--model-dir``) and, per model, prints and records:

- images/s of ``TorchScriptBackend.predict`` (host array in, probabilities and CAMs out, so
  the copies and CAM normalisation are included) on the device, for fp32 and fp16/bf16
  autocast, at batch sizes 1, 8, 32 and 64; and at batch 32 in fp16 with channels-last
  layout and with the TorchScript optimiser off;
- the largest |probability| and |CAM| difference between CPU float32 and each device
  precision on the same inputs;
- cross-study batching: images/s with 1 job, with 8 concurrent jobs calling the model
  directly (serialised), and with 8 jobs through a ``BatchingPredictor``.

Usage (from the repository root)::

    python3 bench/gpu.py --json gpu.json              # on the GPU machine, < 4 minutes
    python3 bench/gpu.py --quick --json /tmp/g.json   # smoke test, on CPU too
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomai.inference.batching import BatchingPredictor  # noqa: E402
from dicomai.models.backend import TorchScriptBackend  # noqa: E402
from dicomai.models.reference import REFERENCE_MODELS, build_reference  # noqa: E402

#: Model name -> input size the daemon's default configuration uses.
INPUT_SIZES = {"chest-xray": 224, "head-ct-ich": 256, "bone-xray": 224}
BATCH_SIZES = (1, 8, 32, 64)
PRECISIONS = ("fp32", "fp16", "bf16")
JOB_BATCH = 8  # images per request of one job (the default preprocessing batch size)


def images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth, normalised-looking inputs [n, 3, size, size] float32 (like preprocessed images)."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.standard_normal((n, 3, 16, 16)).astype(np.float32))
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                         align_corners=False)
    return np.ascontiguousarray(up.numpy() * 1.2, dtype=np.float32)


class Budget:
    """A global time budget; measurements past it are skipped and recorded as such."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def throughput(backend: TorchScriptBackend, batch: np.ndarray, seconds: float,
               warmup: int, min_calls: int) -> dict[str, float]:
    """Warm-up calls (timed separately: the first calls at a new shape re-optimise), then
    ``predict`` in a loop for ``seconds`` (at least ``min_calls`` calls)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        backend.predict(batch)
    warm = time.perf_counter() - t0
    calls = 0
    t0 = time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < seconds:
        backend.predict(batch)  # returns host arrays, so the device is synchronised
        calls += 1
    elapsed = time.perf_counter() - t0
    return {"images_per_s": round(calls * len(batch) / elapsed, 1),
            "ms_per_batch": round(1000 * elapsed / calls, 3), "calls": calls,
            "warmup_s": round(warm, 3)}


def concurrent_jobs(predict_for_job: Any, n_jobs: int, size: int, seconds: float
                    ) -> dict[str, float]:
    """``n_jobs`` threads, each sending requests of JOB_BATCH images one after another (as a
    worker thread does for one study) until the time is up; total images/s."""
    stop = threading.Event()
    counts = [0] * n_jobs
    errors: list[BaseException] = []

    def job(i: int) -> None:
        batch = images(JOB_BATCH, size, seed=100 + i)
        try:
            with predict_for_job() as predict:
                while not stop.is_set():
                    probs, _ = predict(batch)
                    assert probs.shape[0] == JOB_BATCH
                    counts[i] += JOB_BATCH
        except BaseException as exc:  # reported in the result
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(n_jobs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - t0
    out: dict[str, float] = {"images_per_s": round(sum(counts) / elapsed, 1),
                             "images": sum(counts)}
    if errors:
        out["error"] = repr(errors[0])  # type: ignore[assignment]
    return out


class _Direct:
    """A job calling the backend directly (the daemon without cross-study batching)."""

    def __init__(self, backend: TorchScriptBackend) -> None:
        self.backend = backend

    def __enter__(self) -> Any:
        return self.backend.predict

    def __exit__(self, *exc: object) -> None:
        return None


def bench_model(name: str, path: Path, device: str, args: argparse.Namespace,
                budget: Budget, log: Any) -> dict[str, Any]:
    """All measurements of one model, most important first, within ``budget``."""
    quick = args.quick
    size = 64 if quick else INPUT_SIZES[name]  # quick: the smallest input the models take
    seconds = 0.05 if quick else args.seconds
    batch_sizes = (1, 4) if quick else BATCH_SIZES
    result: dict[str, Any] = {"model": name, "architecture": REFERENCE_MODELS[name].architecture,
                              "input_size": size, "throughput": {}, "cpu_difference": {},
                              "variants": {}, "batching": {}, "skipped": []}

    def over(what: str, need: float) -> bool:
        if quick or budget.left() >= need:
            return False
        result["skipped"].append(f"{what}: time budget")
        log(f"{name:12s} {what}: skipped (time budget)")
        return True

    probe = images(8, size, seed=1)
    t0 = time.perf_counter()
    cpu = TorchScriptBackend.load(path, name=name, device="cpu", warmup_size=size)
    ref_probs, ref_cams = cpu.predict(probe)
    result["cpu_fp32_probe_s"] = round(time.perf_counter() - t0, 3)
    del cpu

    loaded: dict[str, TorchScriptBackend] = {}

    def measure_precision(precision: str) -> None:
        t0 = time.perf_counter()
        backend = TorchScriptBackend.load(path, name=name, device=device, warmup_size=size,
                                          precision=precision)
        load_s = time.perf_counter() - t0
        loaded[precision] = backend
        probs, cams = backend.predict(probe)
        diff = {"effective_precision": backend.precision, "load_s": round(load_s, 3),
                "max_abs_prob": float(np.abs(probs - ref_probs).max()),
                "max_abs_cam": (float(np.abs(cams - ref_cams).max())
                                if cams is not None and ref_cams is not None else None)}
        result["cpu_difference"][precision] = diff
        log(f"{name:12s} {precision:5s} max |p_dev - p_cpu32| = {diff['max_abs_prob']:.2e}, "
            f"max |cam| diff = {diff['max_abs_cam']}")
        rows: dict[str, Any] = {}
        result["throughput"][precision] = rows
        for bs in batch_sizes:
            if over(f"{precision} batch {bs}", 5):
                continue
            batch = images(bs, size, seed=bs)
            rows[str(bs)] = throughput(backend, batch, seconds, warmup=1 if quick else 3,
                                       min_calls=1 if quick else 3)
            log(f"{name:12s} {precision:5s} ({backend.precision}) batch {bs:3d}: "
                f"{rows[str(bs)]['images_per_s']:9.1f} img/s "
                f"({rows[str(bs)]['ms_per_batch']:.2f} ms/batch, "
                f"warm-up {rows[str(bs)]['warmup_s']:.2f} s)")

    # 1. The daemon's default precision and the fp32 baseline.
    for precision in ("fp16", "fp32"):
        if not over(precision, 10):
            measure_precision(precision)

    # 2. Cross-study batching, in the default precision.
    backend = loaded.get("fp16") or next(iter(loaded.values()), None)
    job_seconds = 0.2 if quick else min(args.seconds * 2, 2.0)
    max_batch = 16 if quick else 64
    jobs = 2 if quick else 8
    configs = [("1_job_direct", 1, None), (f"{jobs}_jobs_direct", jobs, None),
               (f"{jobs}_jobs_batched", jobs, max_batch)]
    for label, n_jobs, mb in configs if backend is not None else ():
        if over(f"batching {label}", 6):
            continue
        if mb is None:
            row = concurrent_jobs(lambda: _Direct(backend), n_jobs, size, job_seconds)
        else:
            batcher = BatchingPredictor(backend, max_batch=mb, max_wait_ms=args.wait_ms)
            # Warm the merged shapes first (TorchScript re-optimises per new batch shape).
            warm = concurrent_jobs(lambda: _session(batcher), n_jobs, size,
                                   0.05 if quick else 1.5)
            calls0, images0 = batcher.calls, batcher.images
            row = concurrent_jobs(lambda: _session(batcher), n_jobs, size, job_seconds)
            calls = batcher.calls - calls0
            row["model_calls"] = calls
            row["mean_batch"] = round((batcher.images - images0) / calls, 1) if calls else 0.0
            row["max_batch"] = mb
            row["wait_ms"] = args.wait_ms
            row["warmup_images_per_s"] = warm["images_per_s"]
            batcher.close()
        result["batching"][label] = row
        log(f"{name:12s} {label:16s}: {row['images_per_s']:9.1f} img/s"
            + (f" (mean merged batch {row['mean_batch']})" if "mean_batch" in row else ""))

    # 3. bf16.
    if not over("bf16", 10):
        measure_precision("bf16")
    for b in list(loaded):
        del loaded[b]

    # 4. Variants at one batch size, fp16.
    bs = 4 if quick else 32
    batch = images(bs, size, seed=bs)
    for label, kwargs in (("fp16_channels_last", {"channels_last": True}),
                          ("fp16_no_jit_optimize", {"jit_optimize": False})):
        if over(label, 6):
            continue
        variant = TorchScriptBackend.load(path, name=name, device=device, warmup_size=size,
                                          precision="fp16", **kwargs)
        row = throughput(variant, batch, seconds, warmup=1 if quick else 3,
                         min_calls=1 if quick else 3)
        probs, _ = variant.predict(probe)
        row["max_abs_prob_vs_cpu"] = float(np.abs(probs - ref_probs).max())
        row["batch"] = bs
        result["variants"][label] = row
        log(f"{name:12s} {label} batch {bs}: {row['images_per_s']:9.1f} img/s")
        del variant
    return result


class _session:  # noqa: N801 - used like a function
    """A job's bound predictor on a batcher, as a context manager giving its ``predict``."""

    def __init__(self, batcher: BatchingPredictor) -> None:
        self.bound = batcher.bind()

    def __enter__(self) -> Any:
        return self.bound.predict

    def __exit__(self, *exc: object) -> None:
        self.bound.release()


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "device": device, "cpu_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update({
            "gpu": torch.cuda.get_device_name(torch.device(device)),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        })
    else:
        env["gpu"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--quick", action="store_true",
                        help="64² inputs, batch 1 and 4, tiny timings (a smoke test for CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    parser.add_argument("--models", default=",".join(INPUT_SIZES),
                        help="comma-separated reference model names")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="directory with the reference .pt files (default: build them)")
    parser.add_argument("--seconds", type=float, default=0.8,
                        help="timed seconds per measurement (default 0.8)")
    parser.add_argument("--wait-ms", type=float, default=2.0,
                        help="batch_wait_ms of the batching runs (default 2)")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="stop measuring after this many seconds (default 180)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    budget = Budget(args.budget_s)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in INPUT_SIZES:
            parser.error(f"unknown model {n!r}; choose from {sorted(INPUT_SIZES)}")

    def log(line: str) -> None:
        print(line, flush=True)

    env = environment(device)
    log(f"device {device} ({env.get('gpu') or env['cpu']}), torch {env['torch']}, "
        f"python {env['python']}")
    out: dict[str, Any] = {"environment": env, "quick": args.quick, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            if budget.left() < 25 and not args.quick:
                out["models"][name] = {"skipped": ["time budget"]}
                continue
            # An equal share of what is left, so that one slow model cannot starve the rest.
            share = Budget(budget.left() / (len(names) - i))
            path = (args.model_dir / REFERENCE_MODELS[name].filename) if args.model_dir \
                else None
            if path is None or not path.exists():
                t0 = time.perf_counter()
                path = build_reference(name, Path(tmp) / REFERENCE_MODELS[name].filename)
                log(f"{name}: reference model built in {time.perf_counter() - t0:.1f} s")
            try:
                out["models"][name] = bench_model(name, path, device, args, share, log)
            except Exception as exc:  # record and go on with the next model
                log(f"{name}: FAILED {exc!r}")
                out["models"][name] = {"error": repr(exc)}
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    out["total_s"] = round(time.monotonic() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    log(f"total {out['total_s']} s; results in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
