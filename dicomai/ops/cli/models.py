"""`dicomai models`: list, verify, build the reference models, export weights, evaluate."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from dicomai.errors import DicomAIError
from dicomai.ops.cli.common import (
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    make_console,
    settings_from,
    tools_installed,
)

__all__ = ["cmd_models"]


def cmd_models(args: argparse.Namespace) -> int:
    """List, verify, build or export models."""
    from dicomai.inference.findings import sha256_file
    from dicomai.models.reference import (
        REFERENCE_MODELS,
        build_reference,
        export_state_dict,
        read_metadata,
    )

    if args.models_cmd == "evaluate":
        return _models_evaluate(args)
    if args.models_cmd == "export":
        out = export_state_dict(
            args.architecture,
            args.state_dict,
            args.out,
            name=args.name,
            version=args.version,
            labels=args.labels.split(",") if args.labels else None,
            description=args.description,
        )
        print(f"exported {out} sha256={sha256_file(str(out))}")
        return EXIT_OK
    settings = settings_from(args)
    if args.models_cmd == "build-reference":
        names = args.names or [n for n in settings.models if n in REFERENCE_MODELS]
        for name in names:
            if name not in REFERENCE_MODELS:
                print(f"error: {name} is not a reference model", file=sys.stderr)
                return EXIT_USAGE
            path = settings.model_path(name)
            t0 = time.perf_counter()
            build_reference(name, path)
            print(
                f"built {name}: {path} sha256={sha256_file(str(path))} "
                f"({time.perf_counter() - t0:.1f}s)"
            )
        return EXIT_OK
    failures = 0
    rows = []
    for name, m in settings.models.items():
        path = settings.model_path(name)
        row = {
            "name": name,
            "task": m.task,
            "version": m.version,
            "path": str(path),
            "device": m.device,
            "present": path.exists(),
        }
        if path.exists():
            digest = sha256_file(str(path))
            meta = read_metadata(path)
            row.update(
                sha256=digest,
                architecture=meta.get("architecture"),
                weights=meta.get("weights"),
                description=meta.get("description"),
                labels=meta.get("labels"),
            )
            if m.sha256 and m.sha256 != digest:
                row["error"] = "sha256 mismatch"
                failures += 1
        elif name not in REFERENCE_MODELS:
            row["error"] = "file missing"
            failures += 1
        else:
            row["note"] = "reference model, built on first use (dicomai models build-reference)"
        if args.models_cmd == "verify" and path.exists() and "error" not in row:
            try:
                from dicomai.models.backend import TorchScriptBackend

                TorchScriptBackend.load(
                    path,
                    name=name,
                    version=m.version,
                    expected_sha256=m.sha256 or None,
                    device="cpu",
                    labels=tuple(m.labels) or None,
                )
                row["verified"] = True
            except DicomAIError as exc:
                row["error"] = str(exc)
                failures += 1
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            status = r.get("error") or (
                "verified" if r.get("verified") else r.get("note") or "present"
            )
            print(f"{r['name']:<12} {r['version']:<16} {r['task']:<12} {status}")
            if r.get("sha256"):
                print(
                    f"{'':<12} sha256={r['sha256']} {r.get('architecture')} "
                    f"weights={r.get('weights')}"
                )
                print(f"{'':<12} {r.get('description')}")
    return EXIT_RUNTIME if failures else EXIT_OK


def _models_evaluate(args: argparse.Namespace) -> int:
    """`dicomai models evaluate`: metrics of a configured model on a labelled set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if not tools_installed("models evaluate"):
        return EXIT_USAGE
    from dicomai_tools.evaluate import (
        EvaluationError,
        evaluate,
        render_table,
        write_html,
        write_scores_csv,
    )

    settings = settings_from(args)
    if args.model not in settings.models:
        print(
            f"dicomai models evaluate: no model named {args.model!r} (configured: "
            f"{', '.join(settings.models) or 'none'})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.device:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
            print(
                "dicomai models evaluate: --device must be auto, cpu, cuda or cuda:N",
                file=sys.stderr,
            )
            return EXIT_USAGE
        spec = settings.models[args.model].model_copy(update={"device": args.device})
        settings = settings.model_copy(update={"models": {**settings.models, args.model: spec}})
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=make_console(stderr=True),
        transient=True,
    )
    try:
        with progress:
            task = progress.add_task(f"evaluating {args.model}", total=None)
            report = evaluate(
                settings,
                args.model,
                Path(args.directory),
                Path(args.labels),
                subgroups=args.subgroups,
                resamples=args.bootstrap,
                seed=args.seed,
                target_sensitivity=args.target_sensitivity if args.suggest_thresholds else None,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    except EvaluationError as exc:
        print(f"dicomai models evaluate: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.usage else EXIT_RUNTIME
    make_console().print(render_table(report))
    if args.html:
        print(f"HTML report: {write_html(report, Path(args.html))}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"JSON report: {args.json}")
    if args.scores_csv:
        print(f"per-study scores: {write_scores_csv(report, Path(args.scores_csv))}")
    if not report["labels"]:
        print("dicomai models evaluate: no labelled study could be analysed", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK
