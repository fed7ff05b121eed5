"""Command line: argparse subcommands, each one function returning an exit code."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomai import __version__
from dicomai.config import Settings, default_config_path, load_settings
from dicomai.errors import ConfigError, DicomAIError
from dicomai.runtime import heap

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["main"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3
#: dicomai.jobs.queue.JobState values (not imported: keeps `dicomai --help` light).
JOB_STATES = (
    "receiving",
    "queued",
    "running",
    "outbox",
    "sending",
    "done",
    "skipped",
    "failed",
    "cancelled",
)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else default_config_path())


def _configure_logs(settings: Settings, fmt: str | None = None) -> None:
    from dicomai.logs import configure

    log = settings.logging
    configure(
        log.level, fmt or log.format, str(log.file) if log.file else None, levels=dict(log.levels)
    )


# -- serve -------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from dicomai.runtime.daemon import ROLES, Daemon

    settings = _settings(args)
    _configure_logs(settings)
    roles = ROLES
    if args.only:
        roles = tuple(r.strip() for r in args.only.split(",") if r.strip())
        unknown = set(roles) - set(ROLES)
        if unknown:
            print(f"dicomai serve: unknown role(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return EXIT_USAGE
    heap.limit_arenas()  # before the daemon's threads start: see dicomai.runtime.heap
    daemon = Daemon(settings, roles=roles)
    return daemon.run(reload_settings=lambda: _settings(args))


# -- status ------------------------------------------------------------------------------
def _console(stderr: bool = False) -> Any:
    """A rich console on the current stdout/stderr; wide enough for logs when not a tty."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, width=None if tty else 200, soft_wrap=False, highlight=False)


def _status_frame(
    args: argparse.Namespace, settings: Settings, cache: dict[Any, Any] | None = None
) -> tuple[dict, dict]:
    from dicomai.ops.status import check_health, collect

    data = collect(settings, limit=args.limit)
    health = check_health(
        data,
        settings,
        probe=True,
        timeout=args.probe_timeout,
        calling_ae=args.probe_ae,
        cache=cache,
    )
    return data, health


def cmd_status(args: argparse.Namespace) -> int:
    """Show daemon health, queue, throughput and recent studies (works without the daemon)."""
    from dicomai.ops.status import render_rich, render_text

    settings = _settings(args)
    if args.watch is not None:
        if args.check:
            print("dicomai status: --watch and --check cannot be combined", file=sys.stderr)
            return EXIT_USAGE
        if args.watch <= 0:
            print("dicomai status: --watch needs a positive number of seconds", file=sys.stderr)
            return EXIT_USAGE
        return _status_watch(args, settings)
    data, health = _status_frame(args, settings)
    if args.json:
        print(json.dumps({**data, "health": health}, indent=2))
    elif args.plain:
        print(render_text(data, health))
    else:
        _console().print(render_rich(data, health))
    if args.check and not health["healthy"]:
        failed = [c for c in health["checks"] if c["critical"] and not c["ok"]]
        for c in failed:
            print(f"dicomai status: unhealthy: {c['name']}: {c['detail']}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _status_watch(args: argparse.Namespace, settings: Settings) -> int:
    """Redraw the status every ``args.watch`` seconds until Ctrl-C (or ``--iterations``)."""
    from rich.console import Group
    from rich.text import Text

    from dicomai.ops.status import render_rich, render_text

    console = _console()
    frames = 0
    probes: dict[Any, Any] = {}  # the receiver is probed at most every 30 s

    def frame() -> Any:
        data, health = _status_frame(args, settings, probes)
        if args.json:
            return json.dumps({**data, "health": health})
        head = Text(
            f"{data['generated_at']}  refreshing every {args.watch:g}s; Ctrl-C stops", style="dim"
        )
        if args.plain:
            return f"{head.plain}\n{render_text(data, health)}\n"
        return Group(head, render_rich(data, health))

    try:
        if console.is_terminal and not args.json and not args.plain:
            from rich.live import Live

            with Live(
                console=console, auto_refresh=False, screen=False, vertical_overflow="visible"
            ) as live:
                while True:
                    live.update(frame(), refresh=True)
                    frames += 1
                    if args.iterations and frames >= args.iterations:
                        break
                    time.sleep(args.watch)
        else:
            while True:
                out = frame()
                if isinstance(out, str):
                    print(out, flush=True)
                else:
                    console.print(out)
                frames += 1
                if args.iterations and frames >= args.iterations:
                    break
                time.sleep(args.watch)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# -- check-config ------------------------------------------------------------------------
def cmd_db(args: argparse.Namespace) -> int:
    """Database schema: upgrade to the version this dicomai needs, or show where it is."""
    from dicomai.db import make_engine
    from dicomai.migrations import current_revision, head_revision, upgrade

    settings = _settings(args)
    settings.general.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    try:
        if args.db_cmd == "upgrade":
            before, after = upgrade(engine)
            print(
                f"database {_mask(settings.database_url)}: "
                + (
                    f"upgraded {before or 'empty'} -> {after}"
                    if before != after
                    else f"already at {after}"
                )
            )
            return EXIT_OK
        current, head = current_revision(engine), head_revision()
        print(
            f"database {_mask(settings.database_url)}: revision {current or 'none'} "
            f"(this version needs {head})"
        )
        return EXIT_OK if current == head else EXIT_RUNTIME
    finally:
        engine.dispose()


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the configuration and the model files it names."""
    from dicomai.inference.findings import sha256_file

    settings = _settings(args)
    problems = []
    print(f"config: {Path(args.config) if args.config else default_config_path()} (valid)")
    print(f"  data_dir: {settings.general.data_dir}")
    print(f"  database: {_mask(settings.database_url)}")
    print(
        f"  receiver: {settings.receiver.ae_title}@{settings.receiver.host}:"
        f"{settings.receiver.port}"
    )
    _limit_lines(settings)
    problems.extend(_dicomweb_lines(settings))
    for d in settings.destinations:
        problems.extend(_destination_lines(settings, d))
    for r in settings.routes:
        print(
            f"  route {r.name}: {'/'.join(r.modality)} {'/'.join(r.body_part) or '*'} "
            f"-> {r.model} -> {', '.join(r.destinations)}"
        )
    for name, m in settings.models.items():
        path = settings.model_path(name)
        if not path.exists():
            from dicomai.models.reference import REFERENCE_MODELS

            note = (
                "missing (reference model, built on first use)"
                if name in REFERENCE_MODELS
                else "MISSING"
            )
            if name not in REFERENCE_MODELS:
                problems.append(f"model {name}: file {path} missing")
            print(f"  model {name}: {path} {note}")
            continue
        digest = sha256_file(str(path))
        ok = not m.sha256 or m.sha256 == digest
        if not ok:
            problems.append(f"model {name}: sha256 mismatch")
        note = "(MISMATCH)" if not ok else "(pinned, matches)" if m.sha256 else "(not pinned)"
        print(f"  model {name}: {path} sha256={digest} {note}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return EXIT_STARTUP if problems else EXIT_OK


def _destination_lines(settings: Settings, d: Any) -> list[str]:
    """Print a destination (never a secret); return the problems of the files it names."""
    from dicomai.http_auth import file_problem, secret_file_problem

    if d.kind == "dicomweb":
        tls = (
            ""
            if not d.url.startswith("https:")
            else f", CA {settings.resolve(d.ca_file)}"
            if d.ca_file
            else ", TLS verified"
            if d.verify
            else ", TLS NOT VERIFIED"
        )
        auth = f"auth {d.auth}" + (f" as {d.user}" if d.user else "")
        print(f"  destination {d.name}: STOW-RS {d.url} ({auth}{tls}, SR {d.sr_sop_class})")
    else:
        print(f"  destination {d.name}: {d.ae_title}@{d.host}:{d.port} (SR {d.sr_sop_class})")
    problems = []
    for key, path, secret in d.files():
        problem = (secret_file_problem if secret else file_problem)(settings.resolve(path))
        if problem:
            problems.append(f"destination {d.name}: {key}: {problem}")
    return problems


def _dicomweb_lines(settings: Settings) -> list[str]:
    """Print the STOW-RS receiver ([dicomweb]; never a secret); when it is enabled, return the
    problems of the files it names (password or token file, TLS certificate and key)."""
    from dicomai.http_auth import secret_file_problem

    w = settings.dicomweb
    if not w.enabled:
        print("  dicomweb: disabled")
        return []
    scheme = "https" if w.tls_cert_file else "http"
    auth = f"auth {w.auth}" + (f" as {w.user}" if w.user else "")
    peers = ", ".join(w.allowed_peer_addresses) or "any address"
    print(
        f"  dicomweb: STOW-RS {scheme}://{w.host}:{w.port}{w.path}/studies ({auth}, from {peers})"
    )
    problems = []
    for key, path, secret in (
        ("password_file", w.password_file, True),
        ("token_file", w.token_file, True),
        ("tls_cert_file", w.tls_cert_file, False),
        ("tls_key_file", w.tls_key_file, False),
    ):
        if path is None:
            continue
        full = settings.resolve(path)
        problem = (
            secret_file_problem(full)
            if secret
            else (None if full.is_file() else f"{full} does not exist or is not a file")
        )
        if problem:
            problems.append(f"dicomweb: {key}: {problem}")
    return problems


def _limit_lines(settings: Settings) -> None:
    """Print what one received data set may cost ([receiver] limits, refused beyond) and how
    images are decoded ([worker] decode_*); warn when a frame the receiver accepts cannot be
    decoded within a decode process's memory (its job would fail)."""
    r, w = settings.receiver, settings.worker
    print(
        f"  file limits: inflated {r.max_inflated_mb} MiB, {r.max_elements} elements, "
        f"nesting {r.max_nesting_depth}, frame {r.max_frame_megapixels} Mpixel, "
        f"pixel data {r.max_pixel_data_mb} MiB"
    )
    if not w.decode_processes:
        print("  decoding: in the worker thread, without memory or time limits")
        return
    print(
        f"  decoding: {w.decode_processes} process(es), {w.decode_memory_mb} MiB and "
        f"{w.decode_timeout_seconds:g} s per image"
    )
    # A 16-bit frame decoded, then as float32 for preprocessing: 6 bytes a pixel at least.
    frame_mb = r.max_frame_megapixels * 1_000_000 * 6 // (1024 * 1024)
    if frame_mb > w.decode_memory_mb:
        print(
            f"warning: a frame of max_frame_megapixels ({r.max_frame_megapixels} Mpixel) "
            f"needs about {frame_mb} MiB to decode, more than decode_memory_mb: such "
            "images are received but their jobs fail",
            file=sys.stderr,
        )


def _mask(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


# -- models ------------------------------------------------------------------------------
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
    settings = _settings(args)
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

    if not _tools_installed("models evaluate"):
        return EXIT_USAGE
    from dicomai_tools.evaluate import (
        EvaluationError,
        evaluate,
        render_table,
        write_html,
        write_scores_csv,
    )

    settings = _settings(args)
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
        console=_console(stderr=True),
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
    _console().print(render_table(report))
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


# -- retry / cancel ----------------------------------------------------------------------
def _on_jobs(args: argparse.Namespace, action: Callable[..., str]) -> int:
    """Apply ``action(queue, job, now) -> message`` to the jobs named by --job/--study/
    --all-failed; a StateConflict is reported and makes the exit code 1."""
    from dicomai.db import make_engine, make_session_factory, utcnow
    from dicomai.errors import StateConflict
    from dicomai.jobs.queue import Queue
    from dicomai.jobs.states import JobState
    from dicomai.migrations import upgrade

    engine = make_engine(_settings(args).database_url)
    problems = 0
    try:
        upgrade(engine)
        queue = Queue(make_session_factory(engine))
        states = [JobState.FAILED] if getattr(args, "all_failed", False) else []
        jobs = queue.jobs_for(job_ids=args.job or [], study_uids=args.study or [], states=states)
        if not jobs:
            print("no matching job", file=sys.stderr)
            return EXIT_RUNTIME
        for job in jobs:
            try:
                print(action(queue, job, utcnow()))
            except StateConflict as exc:
                print(f"job {job.id}: {exc}; left alone", file=sys.stderr)
                problems += 1
    finally:
        engine.dispose()
    return EXIT_RUNTIME if problems else EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Send failed jobs round again (re-send results, or re-run the analysis)."""
    if not (args.job or args.study or args.all_failed):
        print("dicomai retry: give --job, --study or --all-failed", file=sys.stderr)
        return EXIT_USAGE
    return _on_jobs(
        args, lambda queue, job, now: f"job {job.id}: failed -> {queue.retry(job.id, now).value}"
    )


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel queued, outbox or failed jobs."""
    if not (args.job or args.study):
        print("dicomai cancel: give --job or --study", file=sys.stderr)
        return EXIT_USAGE

    def cancel(queue: Any, job: Any, now: Any) -> str:
        queue.cancel(job.id, now)
        return f"job {job.id}: {job.state} -> cancelled"

    return _on_jobs(args, cancel)


# -- studies -----------------------------------------------------------------------------
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime) -> datetime:
    """``90m``, ``2h``, ``7d`` (ago), or an ISO date/time (local time unless it has an offset).

    Raises
    ------
    ValueError
        Neither form.
    """
    m = _DURATION.match(text)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2).lower()])
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a duration such as 90m, 2h or 7d, or an ISO "
            "date/time such as 2024-05-01 or 2024-05-01T08:00"
        ) from None
    return value.astimezone(UTC) if value.tzinfo is None else value


def _read_engine(settings: Settings) -> Engine | None:
    """An engine on the existing database, or None before the daemon ever created it."""
    from sqlalchemy import inspect as sa_inspect

    from dicomai.db import make_engine

    url = settings.database_url
    if url.startswith("sqlite:///") and not Path(url[10:]).exists():
        return None
    engine = make_engine(url)
    if not sa_inspect(engine).has_table("jobs"):
        engine.dispose()
        return None
    return engine


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return value.isoformat(timespec="seconds")


def _latency(job: Any) -> float | None:
    if job.state == "done" and job.finished_at and job.last_instance_at:
        return round((job.finished_at - job.last_instance_at).total_seconds(), 3)
    return None


def cmd_studies(args: argparse.Namespace) -> int:
    """List studies (filters: state, route, since) or show one study's jobs and timeline."""
    settings = _settings(args)
    if getattr(args, "studies_cmd", None) == "show":
        return _study_show(args, settings)
    from sqlalchemy import func, select

    from dicomai.db import Job, Study, utcnow

    since = None
    if args.since:
        try:
            since = parse_since(args.since, utcnow())
        except ValueError as exc:
            print(f"dicomai studies: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.limit < 1:
        print("dicomai studies: --limit must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    engine = _read_engine(settings)
    rows: list[dict[str, Any]] = []
    if engine is not None:
        try:
            q = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
            if not args.all_generations:
                latest = (
                    select(Job.study_id, func.max(Job.generation).label("gen"))
                    .group_by(Job.study_id)
                    .subquery()
                )
                q = q.join(
                    latest, (latest.c.study_id == Job.study_id) & (latest.c.gen == Job.generation)
                )
            if args.state:
                q = q.where(Job.state.in_(args.state))
            if args.route:
                q = q.where(Job.route.in_(args.route))
            if since is not None:
                q = q.where(Job.created_at >= since)
            with engine.connect() as conn:
                for job in conn.execute(q.order_by(Job.id.desc()).limit(args.limit)):
                    findings = job.findings or {}
                    rows.append(
                        {
                            "study_instance_uid": job.study_instance_uid,
                            "job_id": job.id,
                            "generation": job.generation,
                            "state": job.state,
                            "route": job.route,
                            "model": job.model,
                            "instances": job.instance_count,
                            "received_at": _iso(job.created_at),
                            "finished_at": _iso(job.finished_at),
                            "latency_seconds": _latency(job),
                            "positive_findings": findings.get("positive", []),
                            "last_error": job.last_error,
                        }
                    )
        finally:
            engine.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no matching study")
        return EXIT_OK
    from rich import box
    from rich.table import Table

    table = Table(
        box=box.SIMPLE,
        title=f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'}"
        f" (newest first{'' if args.all_generations else ', latest generation'})",
        title_justify="left",
    )
    for col in (
        "job",
        "gen",
        "study",
        "state",
        "route",
        "inst",
        "received (UTC)",
        "latency",
        "findings / error",
    ):
        table.add_column(
            col,
            overflow="fold",
            no_wrap=col in ("study", "received (UTC)"),
            justify="right" if col in ("job", "gen", "inst", "latency") else "left",
        )
    for r in rows:
        note = ", ".join(r["positive_findings"]) or ("none" if r["state"] == "done" else "")
        if r["last_error"] and r["state"] != "done":
            note = f"{note} {r['last_error']}".strip()
        table.add_row(
            str(r["job_id"]),
            str(r["generation"]),
            r["study_instance_uid"],
            r["state"],
            r["route"] or "-",
            str(r["instances"]),
            (r["received_at"] or "-")[:19].replace("T", " "),
            "-" if r["latency_seconds"] is None else f"{r['latency_seconds']:.1f}s",
            note,
        )
    _console().print(table)
    return EXIT_OK


def _study_show(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import func, select

    from dicomai.db import Instance, Job, JobEvent, ResultObject, Study

    engine = _read_engine(settings)
    if engine is None:
        print(
            f"dicomai studies show: no study with StudyInstanceUID {args.uid} (no database yet)",
            file=sys.stderr,
        )
        return EXIT_RUNTIME
    try:
        with engine.connect() as conn:
            study = conn.execute(
                select(Study).where(Study.study_instance_uid == args.uid.strip())
            ).first()
            if study is None:
                print(
                    f"dicomai studies show: no study with StudyInstanceUID {args.uid}",
                    file=sys.stderr,
                )
                return EXIT_RUNTIME
            jobs = conn.execute(
                select(Job).where(Job.study_id == study.id).order_by(Job.generation)
            ).all()
            job_ids = [j.id for j in jobs]
            gen_of = {j.id: j.generation for j in jobs}
            series = conn.execute(
                select(
                    Instance.series_instance_uid,
                    Instance.modality,
                    Instance.body_part,
                    Instance.series_description,
                    func.min(Instance.view_position),
                    func.count(),
                    func.min(Instance.series_number),
                )
                .where(Instance.study_id == study.id)
                .group_by(
                    Instance.series_instance_uid,
                    Instance.modality,
                    Instance.body_part,
                    Instance.series_description,
                )
                .order_by(func.min(Instance.series_number))
            ).all()
            results = conn.execute(
                select(ResultObject)
                .where(ResultObject.job_id.in_(job_ids))
                .order_by(ResultObject.job_id, ResultObject.id)
            ).all()
            events = conn.execute(
                select(JobEvent)
                .where(JobEvent.job_id.in_(job_ids))
                .order_by(JobEvent.at, JobEvent.id)
            ).all()
    finally:
        engine.dispose()
    data = {
        "study_instance_uid": study.study_instance_uid,
        "first_received_at": _iso(study.first_received_at),
        "last_received_at": _iso(study.last_received_at),
        "calling_ae_title": study.calling_ae_title,
        "series": [
            {
                "series_instance_uid": s[0],
                "modality": s[1],
                "body_part": s[2],
                "description": s[3],
                "view_position": s[4],
                "instances": s[5],
                "series_number": s[6],
            }
            for s in series
        ],
        "jobs": [
            {
                "job_id": j.id,
                "generation": j.generation,
                "state": j.state,
                "route": j.route,
                "model": j.model,
                "instances": j.instance_count,
                "attempts": j.attempts,
                "send_attempts": j.send_attempts,
                "received_at": _iso(j.created_at),
                "closed_at": _iso(j.closed_at),
                "finished_at": _iso(j.finished_at),
                "latency_seconds": _latency(j),
                "inference_seconds": j.inference_seconds,
                "next_attempt_at": _iso(j.not_before),
                "claimed_by": j.claimed_by,
                "destinations": j.destinations,
                "findings": j.findings,
                "last_error": j.last_error,
            }
            for j in jobs
        ],
        "results": [
            {
                "job_id": r.job_id,
                "destination": r.destination,
                "kind": r.kind,
                "sop_instance_uid": r.sop_instance_uid,
                "state": r.state,
                "status": None if r.status_code is None else f"0x{r.status_code:04X}",
                "attempts": r.attempts,
                "sent_at": _iso(r.sent_at),
                "last_error": r.last_error,
            }
            for r in results
        ],
        "timeline": [
            {
                "at": _iso(e.at),
                "job_id": e.job_id,
                "generation": gen_of[e.job_id],
                "src": e.src,
                "dst": e.dst,
                "reason": e.reason,
            }
            for e in events
        ],
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    _print_study(data, events)
    return EXIT_OK


def _print_study(data: dict[str, Any], events: Sequence[Any]) -> None:
    from rich import box
    from rich.table import Table

    console = _console()
    console.print(
        f"[bold]study {data['study_instance_uid']}[/]  first received "
        f"{data['first_received_at']}, last {data['last_received_at']} "
        f"from {data['calling_ae_title'] or '-'}"
    )
    t = Table(box=box.SIMPLE, title="series", title_justify="left")
    for col in ("no.", "series", "modality", "body part", "view", "images", "description"):
        t.add_column(col, overflow="fold", no_wrap=col == "series")
    for s in data["series"]:
        t.add_row(
            str(s["series_number"] if s["series_number"] is not None else "-"),
            s["series_instance_uid"],
            s["modality"] or "-",
            s["body_part"] or "-",
            s["view_position"] or "-",
            str(s["instances"]),
            s["description"] or "-",
        )
    console.print(t)
    t = Table(box=box.SIMPLE, title="jobs (one per generation)", title_justify="left")
    for col in (
        "job",
        "gen",
        "state",
        "route",
        "model",
        "inst",
        "tries",
        "sends",
        "latency",
        "inference",
        "findings",
        "last error",
    ):
        t.add_column(col, overflow="fold")
    for j in data["jobs"]:
        f = j["findings"] or {}
        t.add_row(
            str(j["job_id"]),
            str(j["generation"]),
            j["state"],
            j["route"] or "-",
            j["model"] or "-",
            str(j["instances"]),
            str(j["attempts"]),
            str(j["send_attempts"]),
            "-" if j["latency_seconds"] is None else f"{j['latency_seconds']:.1f}s",
            "-" if j["inference_seconds"] is None else f"{j['inference_seconds']:.2f}s",
            ", ".join(f.get("positive", [])) or ("none" if f else "-"),
            (j["last_error"] or "-")
            + (f" (next attempt {j['next_attempt_at']})" if j["next_attempt_at"] else ""),
        )
    console.print(t)
    if data["results"]:
        t = Table(box=box.SIMPLE, title="result objects", title_justify="left")
        for col in (
            "job",
            "destination",
            "kind",
            "state",
            "status",
            "tries",
            "sent at",
            "last error",
        ):
            t.add_column(col, overflow="fold")
        for r in data["results"]:
            t.add_row(
                str(r["job_id"]),
                r["destination"],
                r["kind"],
                r["state"],
                r["status"] or "-",
                str(r["attempts"]),
                r["sent_at"] or "-",
                r["last_error"] or "-",
            )
        console.print(t)
    t = Table(box=box.SIMPLE, title="timeline", title_justify="left")
    for col in ("at", "+s", "job", "gen", "transition", "reason"):
        t.add_column(col, justify="right" if col in ("+s", "job", "gen") else "left")
    first = events[0].at if events else None
    for e, row in zip(events, data["timeline"], strict=True):
        offset = (e.at - first).total_seconds() if first else 0.0
        t.add_row(
            row["at"],
            f"{offset:.1f}",
            str(row["job_id"]),
            str(row["generation"]),
            f"{row['src'] or '-'} -> {row['dst']}",
            row["reason"] or "-",
        )
    console.print(t)


# -- echo / send -------------------------------------------------------------------------
def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a configured destination by name."""
    from dicomai.ops.scu import echo

    settings = _settings(args)
    try:
        dest = settings.destination(args.destination)
    except KeyError:
        names = ", ".join(d.name for d in settings.destinations) or "none configured"
        print(
            f"dicomai echo: no destination named {args.destination!r} (known: {names})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if dest.kind == "dicomweb":
        return _echo_dicomweb(settings, dest, args.timeout)
    where = (
        f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}, calling AE "
        f"{settings.sender.ae_title})"
    )
    t0 = time.perf_counter()
    try:
        status = echo(
            dest.host,
            int(dest.port or 0),
            called_ae=dest.ae_title,
            calling_ae=settings.sender.ae_title,
            timeout=args.timeout,
        )
    except Exception as exc:  # name resolution and socket errors come in several types
        print(f"{where}: C-ECHO failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    ms = (time.perf_counter() - t0) * 1000
    if status == 0:
        print(f"{where}: C-ECHO success in {ms:.0f} ms")
        return EXIT_OK
    if status is None:
        print(
            f"{where}: C-ECHO failed: no association (connection refused, association "
            f"rejected or no answer within {args.timeout:g} s)",
            file=sys.stderr,
        )
    else:
        print(f"{where}: C-ECHO answered status 0x{status:04X}", file=sys.stderr)
    return EXIT_RUNTIME


def _echo_dicomweb(settings: Settings, dest: Any, timeout: float) -> int:
    """The DICOMweb counterpart of C-ECHO: a QIDO-RS search for one study, with the
    destination's credentials and TLS settings."""
    import dataclasses

    from dicomai.delivery.sender import stow_target
    from dicomai.delivery.stow_client import probe

    target = dataclasses.replace(stow_target(dest, settings), timeout=timeout)
    where = f"{dest.name} (DICOMweb {dest.url}, auth {dest.auth})"
    t0 = time.perf_counter()
    status, error = probe(target)
    ms = (time.perf_counter() - t0) * 1000
    if error is None:
        print(f"{where}: QIDO-RS answered HTTP {status} in {ms:.0f} ms")
        return EXIT_OK
    print(f"{where}: QIDO-RS failed: {error}", file=sys.stderr)
    return EXIT_RUNTIME


_TARGET = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>\[[^\]]+\]|[^:@\[\]]+):(?P<port>\d{1,5})$")
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def parse_target(text: str) -> tuple[str, str, int]:
    """``AE@host:port`` (``AE@[v6]:port``) → (ae, host, port); ValueError otherwise."""
    m = _TARGET.match(text.strip())
    if not m or not 1 <= int(m.group("port")) <= 65535 or not m.group("ae").strip():
        raise ValueError(f"--to {text!r}: expected AE@host:port, e.g. DICOMAI@127.0.0.1:11112")
    return m.group("ae").strip(), m.group("host").strip("[]"), int(m.group("port"))


def _dicom_files(
    paths: Sequence[str],
) -> tuple[list[tuple[Path, str, str]], list[tuple[Path, str]], int]:
    """(sendable (path, sop class, syntax), failures (path, why), skipped in folders)."""
    import pydicom

    found: list[tuple[Path, bool]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(
                (f, False)
                for f in sorted(p.rglob("*"))
                if f.is_file() and not f.name.startswith(".")
            )
        else:
            found.append((p, True))
    ok: list[tuple[Path, str, str]] = []
    failed: list[tuple[Path, str]] = []
    skipped = 0
    for path, explicit in found:
        try:
            meta = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID"]
            ).file_meta
            sop_class = str(meta.MediaStorageSOPClassUID)
            syntax = str(meta.TransferSyntaxUID)
        except Exception:  # not DICOM, or no file meta
            if explicit:
                failed.append((path, "not a DICOM file (Part 10 with file meta)"))
            else:
                skipped += 1
            continue
        if sop_class == _DICOMDIR_CLASS:
            skipped += 1
            continue
        ok.append((path, sop_class, syntax))
    return ok, failed, skipped


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files and folders to the local receiver (or ``--to AE@host:port``)."""
    from pynetdicom import AE
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"dicomai send: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if args.to:
        try:
            called, host, port = parse_target(args.to)
        except ValueError as exc:
            print(f"dicomai send: {exc}", file=sys.stderr)
            return EXIT_USAGE
    else:
        r = _settings(args).receiver
        called, host, port = (
            r.ae_title,
            {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(r.host, r.host),
            r.port,
        )
        if port == 0:
            print(
                "dicomai send: the configured receiver port is 0 (any free port); "
                "give --to AE@host:port",
                file=sys.stderr,
            )
            return EXIT_USAGE
    files, failures, skipped = _dicom_files(args.paths)
    target = f"{called}@{host}:{port}"
    if not files and not failures:
        print(f"dicomai send: no DICOM files found in {' '.join(args.paths)}", file=sys.stderr)
        return EXIT_RUNTIME
    # One association per batch of at most 128 presentation contexts, in file order.
    batches: list[list[tuple[Path, str, str]]] = []
    contexts: set[tuple[str, str]] = set()
    for item in files:
        pair = (item[1], item[2])
        if not batches or (pair not in contexts and len(contexts) >= 128):
            batches.append([])
            contexts = set()
        contexts.add(pair)
        batches[-1].append(item)
    sent = 0
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console(stderr=True),
        transient=False,
    )
    with progress:
        task = progress.add_task(f"C-STORE to {target}", total=len(files))
        for batch in batches:
            ae = AE(ae_title=args.calling_ae)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
            for pair in sorted({(b[1], b[2]) for b in batch}):
                ae.add_requested_context(*pair)
            try:
                assoc = ae.associate(host, port, ae_title=called)
                if not assoc.is_established:
                    why = (
                        "association rejected"
                        if assoc.is_rejected
                        else "no association (refused, aborted or timed out)"
                    )
                    failures.extend((b[0], why) for b in batch)
                    progress.advance(task, len(batch))
                    continue
                for path, _, _ in batch:
                    try:
                        rsp = assoc.send_c_store(path)
                        status = int(rsp.Status) if rsp and "Status" in rsp else None
                    except Exception as exc:  # no accepted context, lost association, ...
                        failures.append((path, f"{type(exc).__name__}: {exc}"[:200]))
                        progress.advance(task)
                        continue
                    if status is not None and (status == 0 or status & 0xF000 == 0xB000):
                        sent += 1
                    else:
                        failures.append(
                            (path, "no response" if status is None else f"status 0x{status:04X}")
                        )
                    progress.advance(task)
                if assoc.is_established:
                    assoc.release()
            except Exception as exc:  # name resolution, socket errors
                failures.extend((b[0], f"{type(exc).__name__}: {exc}"[:200]) for b in batch)
            finally:
                ae.shutdown()
    total = len(files) + sum(1 for f in failures if f[1].startswith("not a DICOM"))
    note = f" ({skipped} non-DICOM file(s) skipped)" if skipped else ""
    print(f"sent {sent}/{total} file(s) to {target}{note}")
    for path, why in failures:
        print(f"FAILED {path}: {why}", file=sys.stderr)
    return EXIT_RUNTIME if failures else EXIT_OK


# -- purge -------------------------------------------------------------------------------
def cmd_purge(args: argparse.Namespace) -> int:
    """Delete spool files of studies finished more than N days ago (history rows are kept)."""
    from dicomai.db import make_session_factory, utcnow
    from dicomai.ingest.spool import Spool
    from dicomai.jobs.queue import Queue
    from dicomai.runtime.scheduler import purge_finished

    settings = _settings(args)
    days = settings.spool.retention_days if args.older_than_days is None else args.older_than_days
    if days < 0:
        print("dicomai purge: --older-than-days must not be negative", file=sys.stderr)
        return EXIT_USAGE
    engine = _read_engine(settings)
    if engine is None:
        print("nothing to purge (no database yet)")
        return EXIT_OK
    try:
        items = purge_finished(
            Queue(make_session_factory(engine)),
            Spool(settings.spool_path),
            utcnow(),
            days,
            dry_run=args.dry_run,
        )
    finally:
        engine.dispose()
    if not items:
        print(f"nothing to purge: no finished study older than {days:g} day(s) has files left")
        return EXIT_OK
    verb = "would remove" if args.dry_run else "removed"
    for item in items:
        print(
            f"{verb} study #{item.study_id} (jobs {', '.join(map(str, item.job_ids))}, "
            f"finished {_iso(item.finished_at)}): {item.instance_files} instance file(s), "
            f"{item.result_folders} results folder(s), {item.size_bytes / 1e6:.1f} MB"
        )
    print(
        f"{verb} {sum(i.instance_files for i in items)} instance file(s) and "
        f"{sum(i.result_folders for i in items)} results folder(s) of {len(items)} "
        f"stud{'y' if len(items) == 1 else 'ies'}, "
        f"{sum(i.size_bytes for i in items) / 1e6:.1f} MB"
    )
    return EXIT_OK


def _tools_installed(command: str) -> bool:
    """Whether dicomai-tools (evaluation, demo; not part of the daemon) is importable."""
    if importlib.util.find_spec("dicomai_tools") is not None:
        return True
    print(
        f"dicomai {command}: needs dicomai-tools, which a daemon install leaves out; install it "
        "with `pip install ./tools` from the dicomai source tree (scripts/setup.sh does)",
        file=sys.stderr,
    )
    return False


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole loop on local sample studies and print the results."""
    if not _tools_installed("demo"):
        return EXIT_USAGE
    from dicomai_tools.demo import run_demo

    settings = _settings(args)
    return run_demo(settings, keep=args.keep, timeout=args.timeout, verbose=args.verbose)


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="dicomai", description=__doc__)
    p.add_argument("--version", action="version", version=f"dicomai {__version__}")
    p.add_argument("--config", help="config file (default $DICOMAI_CONFIG or config/dicomai.toml)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--only", help="comma-separated roles: receiver,worker,sender,scheduler")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="daemon health, queue, throughput and recent studies")
    s.add_argument("--json", action="store_true", help="one JSON object for scripts")
    s.add_argument("--plain", action="store_true", help="plain text instead of tables")
    s.add_argument("--limit", type=int, default=20, help="recent studies to list")
    s.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when unhealthy: heartbeat stale, receiver not answering "
        "C-ECHO, database unreachable or free disk below the floor",
    )
    s.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )
    s.add_argument(
        "--iterations",
        type=int,
        default=0,
        metavar="N",
        help="with --watch: stop after N refreshes (0 = until Ctrl-C)",
    )
    s.add_argument(
        "--probe-timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="timeout of the receiver probe (C-ECHO)",
    )
    s.add_argument(
        "--probe-ae",
        metavar="AE",
        help="calling AE title of the receiver probe (default [sender] ae_title)",
    )
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("retry", help="retry failed jobs (re-send results or re-analyse)")
    s.add_argument("--job", type=int, action="append", help="job id (repeatable)")
    s.add_argument("--study", action="append", help="StudyInstanceUID (its latest generation)")
    s.add_argument("--all-failed", action="store_true", help="every failed job")
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser("cancel", help="cancel queued, outbox or failed jobs")
    s.add_argument("--job", type=int, action="append", help="job id (repeatable)")
    s.add_argument("--study", action="append", help="StudyInstanceUID (its latest generation)")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser(
        "studies",
        help="list studies; `studies show UID`: jobs and timeline",
        description="List studies (latest generation, newest first), or show "
        "one study's series, jobs, result objects and timeline.",
    )
    s.add_argument(
        "--state", action="append", choices=JOB_STATES, help="only this state (repeatable)"
    )
    s.add_argument("--route", action="append", help="only this route (repeatable)")
    s.add_argument(
        "--since",
        help="received since: a duration (90m, 2h, 7d) or an ISO "
        "date/time (local time unless it has an offset)",
    )
    s.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    s.add_argument(
        "--all-generations",
        action="store_true",
        help="every generation, not only each study's latest",
    )
    s.add_argument("--json", action="store_true")
    ssub = s.add_subparsers(dest="studies_cmd", metavar="{show}")
    m = ssub.add_parser("show", help="one study: series, jobs, result objects, timeline")
    m.add_argument("uid", help="StudyInstanceUID")
    m.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_studies)

    s = sub.add_parser(
        "echo",
        help="C-ECHO a configured destination, a QIDO-RS search for a "
        "DICOMweb one (exit 1 if it fails)",
    )
    s.add_argument("destination", help="a [[destinations]] name, e.g. pacs")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    s.set_defaults(func=cmd_echo)

    s = sub.add_parser("send", help="C-STORE DICOM files/folders to the receiver or --to")
    s.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")
    s.add_argument(
        "--to", metavar="AE@HOST:PORT", help="destination (default: this configuration's receiver)"
    )
    s.add_argument("--calling-ae", default="DICOMAI-SCU", help="our AE title (DICOMAI-SCU)")
    s.add_argument("--timeout", type=float, default=30.0, help="network timeout, seconds")
    s.set_defaults(func=cmd_send)

    s = sub.add_parser("purge", help="delete spool files of studies finished long ago")
    s.add_argument(
        "--older-than-days",
        type=float,
        default=None,
        metavar="N",
        help="finished more than N days ago (default [spool] retention_days)",
    )
    s.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    s.set_defaults(func=cmd_purge)

    s = sub.add_parser("db", help="database schema migrations")
    dsub = s.add_subparsers(dest="db_cmd", required=True)
    dsub.add_parser("upgrade", help="migrate the schema to this version (also done by serve)")
    dsub.add_parser("current", help="show the schema revision; exit 1 if not current")
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("check-config", help="validate the configuration and model files")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("demo", help="run sample studies through a local daemon and PACS")
    s.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for results")
    s.add_argument("--verbose", action="store_true", help="show the daemon's logs")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("models", help="list, verify, build or export models")
    msub = s.add_subparsers(dest="models_cmd", required=True)
    m = msub.add_parser("list", help="configured models and their files")
    m.add_argument("--json", action="store_true")
    m = msub.add_parser("verify", help="load each model and check its sha256")
    m.add_argument("--json", action="store_true")
    m = msub.add_parser("build-reference", help="(re)build the untrained reference models")
    m.add_argument("names", nargs="*", help="model names (default: all reference models)")
    m = msub.add_parser("export", help="TorchScript file from a state dict (your weights)")
    m.add_argument(
        "--architecture", required=True, choices=["densenet121", "resnet18", "densenet169"]
    )
    m.add_argument("--state-dict", required=True, help="PyTorch state dict (.pth/.pt)")
    m.add_argument("--out", required=True, help="output TorchScript file")
    m.add_argument("--name", required=True)
    m.add_argument("--version", required=True)
    m.add_argument("--labels", help="comma-separated labels (default: the architecture's)")
    m.add_argument(
        "--description", required=True, help="what these weights are (shown in every result object)"
    )
    m = msub.add_parser(
        "evaluate",
        help="AUROC, sensitivity, specificity of a model on a labelled set",
        description="Run a configured model on the studies under DIRECTORY (DICOM files, any "
        "layout) and compare with LABELS: a CSV with study_instance_uid,label,"
        "value (0/1) rows, or a study_instance_uid column and one 0/1 column per "
        "label. Reports per-label AUROC, sensitivity and specificity at the "
        "configured thresholds with bootstrap 95% confidence intervals.",
    )
    m.add_argument("directory", help="folder with the studies' DICOM files")
    m.add_argument("--model", required=True, help="a configured model name")
    m.add_argument("--labels", required=True, help="labels CSV")
    m.add_argument(
        "--suggest-thresholds",
        action="store_true",
        help="suggest per-label thresholds reaching --target-sensitivity",
    )
    m.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.9,
        help="sensitivity the suggested thresholds reach (default 0.9)",
    )
    m.add_argument(
        "--subgroups",
        action="store_true",
        help="figures per PatientSex, age band, Manufacturer and ViewPosition",
    )
    m.add_argument("--html", metavar="PATH", help="write an HTML report with ROC curves")
    m.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    m.add_argument("--scores-csv", metavar="PATH", help="write per-study scores")
    m.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for the 95%% CIs (default 1000; 0: none)",
    )
    m.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    m.add_argument("--device", help="override the model's device (auto, cpu, cuda, cuda:N)")
    s.set_defaults(func=cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"dicomai: configuration error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except DicomAIError as exc:
        print(f"dicomai: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_RUNTIME
