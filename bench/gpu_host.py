"""A GPU host end to end: decode processes feeding cross-study batching (issue 6, GPU path).

Chest X-ray studies (one 2500x2000 JPEG 2000 lossless image each) are analysed as the worker
runs a job: read the file with pydicom, decode and preprocess in a
:class:`~dicomai.inference.prepare.DecodePool` of P processes (reduced-resolution JPEG 2000 decoding),
then :func:`dicomai.inference.processing.analyse` through one shared
:class:`~dicomai.inference.batching.BatchingPredictor` on the device. J jobs run at once (worker
threads). For each P it prints:

- ``pipeline``: studies/s with J concurrent jobs (P = 0: decoding in the job threads, as
  with ``worker.decode_processes = 0``);
- ``decode_only``: images/s of the same pool with nothing else running (the feed's ceiling);
- the mean merged batch of the batcher, and the model-only images/s at that batch size,
  so it shows whether the decode side or the device is the limit.

Needs PyTorch, numpy, pydicom, pylibjpeg(-openjpeg/-libjpeg), Pillow and pydantic (no
database, no network stack). Not a test: it prints figures.

    python3 bench/gpu_host.py --json gpu_host.json                  # on the GPU machine
    .venv/bin/python bench/gpu_host.py --quick --json /tmp/gh.json  # smoke test on CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomai_tools import synthetic  # noqa: E402
from dicomai.inference.batching import BatchingPredictor  # noqa: E402
from dicomai.config import load_settings  # noqa: E402
from dicomai.inference.findings import Task  # noqa: E402
from dicomai.inference.processing import analyse  # noqa: E402
from dicomai.models.backend import TorchScriptBackend  # noqa: E402
from dicomai.models.reference import REFERENCE_MODELS, build_reference  # noqa: E402
from dicomai.inference.prepare import DecodePool, PreparedInputs  # noqa: E402

MODEL = "chest-xray"


def make_inputs(n: int, rows: int, cols: int, directory: Path) -> list[Path]:
    """``n`` distinct chest X-ray studies, JPEG 2000 lossless, one file each."""
    from pydicom.uid import JPEG2000Lossless

    paths = []
    for i in range(n):
        native = synthetic.make_xray("chest", rows=rows, cols=cols, seed=300 + i)
        (path,) = synthetic.write_study([synthetic.recompress(native, JPEG2000Lossless)],
                                        directory / str(i))
        paths.append(path)
    return paths


def pipeline(paths: list[Path], spec: Any, batcher: BatchingPredictor,
             pool: DecodePool | None, jobs: int, seconds: float) -> dict[str, Any]:
    """``jobs`` threads analysing one study after another until ``seconds`` are up."""
    stop = threading.Event()
    counts = [0] * jobs
    latencies: list[float] = []
    errors: list[BaseException] = []
    task = Task(spec.task)

    def job(j: int) -> None:
        k = j
        try:
            while not stop.is_set():
                path = str(paths[k % len(paths)])
                k += jobs
                t0 = time.perf_counter()
                ds = pydicom.dcmread(path)  # as the worker reads a job's files
                prepared = None
                if pool is not None:
                    prepared = PreparedInputs(
                        [ds], pool.submit([path], spec.task, spec.preprocessing))
                with batcher.session() as predictor:
                    findings = analyse(task, [ds], predictor, spec, datetime.now(UTC),
                                       preprocess=prepared)
                assert findings.study_scores
                latencies.append(time.perf_counter() - t0)
                counts[j] += 1
        except BaseException as exc:  # reported
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(j,), daemon=True) for j in range(jobs)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    elapsed = time.perf_counter() - t0
    out: dict[str, Any] = {"studies_per_s": round(sum(counts) / elapsed, 1),
                           "studies": sum(counts), "jobs": jobs,
                           "latency_p50_ms": round(1000 * statistics.median(latencies), 1)
                           if latencies else None}
    if errors:
        out["error"] = repr(errors[0])
    return out


def decode_only(paths: list[Path], spec: Any, pool: DecodePool, n: int) -> dict[str, Any]:
    work = [str(paths[i % len(paths)]) for i in range(n)]
    t0 = time.perf_counter()
    for fut in pool.submit(work, spec.task, spec.preprocessing):
        fut.result()
    elapsed = time.perf_counter() - t0
    return {"images_per_s": round(n / elapsed, 1), "images": n}


def model_only(backend: TorchScriptBackend, batch: int, size: int, seconds: float) -> float:
    x = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32)
    backend.predict(x)
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        backend.predict(x)
        calls += 1
    return round(calls * batch / (time.perf_counter() - t0), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu")
    parser.add_argument("--processes", default="0,4,8,14",
                        help="decode processes per run (0 = decode in the job threads)")
    parser.add_argument("--jobs", type=int, default=16, help="concurrent jobs (threads)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per pipeline run")
    parser.add_argument("--inputs", type=int, default=8, help="distinct studies, cycled")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true",
                        help="small images and short runs: a smoke test on CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, cols = (400, 500) if args.quick else (2000, 2500)
    seconds = 2.0 if args.quick else args.seconds

    def log(line: str) -> None:
        print(line, flush=True)

    settings = load_settings(REPO / "config" / "dicomai.toml", environ={})
    spec = settings.model_settings(MODEL)
    size = spec.preprocessing.input_size
    env = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(),
           "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
           "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "image": f"{cols}x{rows} JPEG 2000 lossless", "model": MODEL,
           "precision": spec.precision, "max_batch": args.max_batch, "wait_ms": args.wait_ms}
    log(f"device {device} ({env['gpu'] or platform.processor()}), {env['cpus']} CPUs, "
        f"torch {env['torch']}, python {env['python']}")
    out: dict[str, Any] = {"environment": env, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = make_inputs(args.inputs, rows, cols, Path(tmp) / "in")
        log(f"{len(paths)} inputs of {paths[0].stat().st_size / 1e6:.1f} MB made in "
            f"{time.perf_counter() - t0:.1f} s")
        model_path = build_reference(MODEL, Path(tmp) / REFERENCE_MODELS[MODEL].filename)
        backend = TorchScriptBackend.load(model_path, name=MODEL, device=device,
                                          warmup_size=size, precision=spec.precision)
        for p in (int(x) for x in args.processes.split(",") if x.strip()):
            if p > (os.cpu_count() or 1):
                continue
            pool = DecodePool(p) if p else None
            batcher = BatchingPredictor(backend, max_batch=args.max_batch,
                                        max_wait_ms=args.wait_ms, name=MODEL)
            try:
                row: dict[str, Any] = {}
                if pool is not None:
                    decode_only(paths, spec, pool, 2 * p)  # warm every process
                    row["decode_only"] = decode_only(paths, spec, pool,
                                                     max(4 * p, 16 if args.quick else 64))
                pipeline(paths, spec, batcher, pool, args.jobs, min(2.0, seconds))  # warm
                calls_before = batcher.calls
                row["pipeline"] = pipeline(paths, spec, batcher, pool, args.jobs, seconds)
                calls = batcher.calls - calls_before
                if calls:  # one image per study
                    row["mean_merged_batch"] = round(row["pipeline"]["studies"] / calls, 1)
                out["runs"][str(p)] = row
                dec = row.get("decode_only", {}).get("images_per_s", "-")
                log(f"decode processes {p:2d}, {args.jobs} jobs: pipeline "
                    f"{row['pipeline']['studies_per_s']} studies/s (p50 "
                    f"{row['pipeline']['latency_p50_ms']} ms), decode only {dec} img/s"
                    + (f", mean merged batch {row['mean_merged_batch']}"
                       if "mean_merged_batch" in row else "")
                    + (f"  ERROR {row['pipeline']['error']}" if "error" in row["pipeline"]
                       else ""))
            finally:
                batcher.close()
                if pool is not None:
                    pool.shutdown()
        for bs in (8, args.max_batch):
            out.setdefault("model_only_images_per_s", {})[str(bs)] = model_only(
                backend, bs, size, 0.5 if args.quick else 3.0)
        log(f"model only: {out['model_only_images_per_s']} images/s by batch size")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    log(f"results in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
