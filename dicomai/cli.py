"""Command line: argparse subcommands, each one function returning an exit code."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicomai import __version__
from dicomai.config import Settings, default_config_path, load_settings
from dicomai.errors import ConfigError, DicomAIError

__all__ = ["main"]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else default_config_path())


def _configure_logs(settings: Settings, fmt: str | None = None) -> None:
    from dicomai.logs import configure

    log = settings.logging
    configure(log.level, fmt or log.format, str(log.file) if log.file else None)


# -- serve -------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from dicomai.daemon import ROLES, Daemon

    settings = _settings(args)
    _configure_logs(settings)
    roles = ROLES
    if args.only:
        roles = tuple(r.strip() for r in args.only.split(",") if r.strip())
        unknown = set(roles) - set(ROLES)
        if unknown:
            print(f"dicomai serve: unknown role(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return EXIT_USAGE
    daemon = Daemon(settings, roles=roles)
    return daemon.run()


# -- status ------------------------------------------------------------------------------
def _console(stderr: bool = False) -> Any:
    """A rich console on the current stdout/stderr; wide enough for logs when not a tty."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, width=None if tty else 160, soft_wrap=False,
                   highlight=False)


def _status_frame(args: argparse.Namespace, settings: Settings) -> tuple[dict, dict]:
    from dicomai.status import check_health, collect

    data = collect(settings, limit=args.limit)
    health = check_health(data, settings, probe=True, echo=bool(args.check),
                          timeout=args.probe_timeout)
    return data, health


def cmd_status(args: argparse.Namespace) -> int:
    """Show daemon health, queue, throughput and recent studies (works without the daemon)."""
    from dicomai.status import render_rich, render_text

    settings = _settings(args)
    if args.watch is not None:
        if args.check:
            print("dicomai status: --watch and --check cannot be combined", file=sys.stderr)
            return EXIT_USAGE
        if args.watch <= 0:
            print("dicomai status: --watch needs a positive number of seconds",
                  file=sys.stderr)
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

    from dicomai.status import render_rich, render_text

    console = _console()
    frames = 0

    def frame() -> Any:
        data, health = _status_frame(args, settings)
        if args.json:
            return json.dumps({**data, "health": health})
        head = Text(f"{data['generated_at']}  refreshing every {args.watch:g}s; Ctrl-C stops",
                    style="dim")
        if args.plain:
            return f"{head.plain}\n{render_text(data, health)}\n"
        return Group(head, render_rich(data, health))

    try:
        if console.is_terminal and not args.json and not args.plain:
            from rich.live import Live

            with Live(console=console, auto_refresh=False, screen=False,
                      vertical_overflow="visible") as live:
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
def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the configuration and the model files it names."""
    from dicomai.findings import sha256_file

    settings = _settings(args)
    problems = []
    print(f"config: {Path(args.config) if args.config else default_config_path()} (valid)")
    print(f"  data_dir: {settings.general.data_dir}")
    print(f"  database: {_mask(settings.database_url)}")
    print(f"  receiver: {settings.receiver.ae_title}@{settings.receiver.host}:"
          f"{settings.receiver.port}")
    for d in settings.destinations:
        print(f"  destination {d.name}: {d.ae_title}@{d.host}:{d.port} (SR {d.sr_sop_class})")
    for r in settings.routes:
        print(f"  route {r.name}: {'/'.join(r.modality)} {'/'.join(r.body_part) or '*'} "
              f"-> {r.model} -> {', '.join(r.destinations)}")
    for name, m in settings.models.items():
        path = settings.model_path(name)
        if not path.exists():
            from dicomai.models.reference import REFERENCE_MODELS

            note = "missing (reference model, built on first use)" if name in REFERENCE_MODELS \
                else "MISSING"
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
    from dicomai.findings import sha256_file
    from dicomai.models.reference import (
        REFERENCE_MODELS,
        build_reference,
        export_state_dict,
        read_metadata,
    )

    if args.models_cmd == "export":
        out = export_state_dict(
            args.architecture, args.state_dict, args.out, name=args.name,
            version=args.version, labels=args.labels.split(",") if args.labels else None,
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
            print(f"built {name}: {path} sha256={sha256_file(str(path))} "
                  f"({time.perf_counter() - t0:.1f}s)")
        return EXIT_OK
    failures = 0
    rows = []
    for name, m in settings.models.items():
        path = settings.model_path(name)
        row = {"name": name, "task": m.task, "version": m.version, "path": str(path),
               "device": m.device, "present": path.exists()}
        if path.exists():
            digest = sha256_file(str(path))
            meta = read_metadata(path)
            row.update(sha256=digest, architecture=meta.get("architecture"),
                       weights=meta.get("weights"), description=meta.get("description"),
                       labels=meta.get("labels"))
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

                TorchScriptBackend.load(path, name=name, version=m.version,
                                        expected_sha256=m.sha256 or None, device="cpu",
                                        labels=tuple(m.labels) or None)
                row["verified"] = True
            except DicomAIError as exc:
                row["error"] = str(exc)
                failures += 1
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            status = r.get("error") or ("verified" if r.get("verified") else
                                        r.get("note") or "present")
            print(f"{r['name']:<12} {r['version']:<16} {r['task']:<12} {status}")
            if r.get("sha256"):
                print(f"{'':<12} sha256={r['sha256']} {r.get('architecture')} "
                      f"weights={r.get('weights')}")
                print(f"{'':<12} {r.get('description')}")
    return EXIT_RUNTIME if failures else EXIT_OK


# -- retry / cancel ----------------------------------------------------------------------
def _operator_jobs(args: argparse.Namespace, settings: Settings, failed_only: bool):
    from dicomai.db import create_all, make_engine, make_session_factory
    from dicomai.queue import JobState, Queue

    engine = make_engine(settings.database_url)
    create_all(engine)
    queue = Queue(make_session_factory(engine))
    states = [JobState.FAILED] if getattr(args, "all_failed", False) else []
    jobs = queue.jobs_for(job_ids=args.job or [], study_uids=args.study or [], states=states)
    return engine, queue, jobs


def cmd_retry(args: argparse.Namespace) -> int:
    """Send failed jobs round again (re-send results, or re-run the analysis)."""
    from dicomai.db import utcnow
    from dicomai.errors import StateConflict

    if not (args.job or args.study or args.all_failed):
        print("dicomai retry: give --job, --study or --all-failed", file=sys.stderr)
        return EXIT_USAGE
    engine, queue, jobs = _operator_jobs(args, _settings(args), True)
    problems = 0
    try:
        for job in jobs:
            try:
                dst = queue.retry(job.id, utcnow())
                print(f"job {job.id}: failed -> {dst.value}")
            except StateConflict:
                print(f"job {job.id}: is {job.state}, not failed; left alone", file=sys.stderr)
                problems += 1
        if not jobs:
            print("no matching job", file=sys.stderr)
            return EXIT_RUNTIME
    finally:
        engine.dispose()
    return EXIT_RUNTIME if problems else EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel queued, outbox or failed jobs."""
    from dicomai.db import utcnow
    from dicomai.errors import StateConflict

    if not (args.job or args.study):
        print("dicomai cancel: give --job or --study", file=sys.stderr)
        return EXIT_USAGE
    engine, queue, jobs = _operator_jobs(args, _settings(args), False)
    problems = 0
    try:
        for job in jobs:
            try:
                queue.cancel(job.id, utcnow())
                print(f"job {job.id}: {job.state} -> cancelled")
            except StateConflict as exc:
                print(f"{exc}", file=sys.stderr)
                problems += 1
        if not jobs:
            print("no matching job", file=sys.stderr)
            return EXIT_RUNTIME
    finally:
        engine.dispose()
    return EXIT_RUNTIME if problems else EXIT_OK


# -- demo --------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole loop on local sample studies and print the results."""
    from dicomai.demo import run_demo

    settings = _settings(args)
    return run_demo(settings, keep=args.keep, timeout=args.timeout, verbose=args.verbose)


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="dicomai", description=__doc__)
    p.add_argument("--version", action="version", version=f"dicomai {__version__}")
    p.add_argument("--config", help="config file (default $DICOMAI_CONFIG or "
                                    "config/dicomai.toml)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--only", help="comma-separated roles: receiver,worker,sender,scheduler")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="daemon health, queue, throughput and recent studies")
    s.add_argument("--json", action="store_true", help="one JSON object for scripts")
    s.add_argument("--plain", action="store_true", help="plain text instead of tables")
    s.add_argument("--limit", type=int, default=20, help="recent studies to list")
    s.add_argument("--check", action="store_true",
                   help="exit 1 when unhealthy: heartbeat stale, receiver not answering "
                        "C-ECHO, database unreachable or free disk below the floor")
    s.add_argument("--watch", nargs="?", type=float, const=2.0, default=None,
                   metavar="SECONDS", help="redraw every SECONDS (default 2) until Ctrl-C")
    s.add_argument("--iterations", type=int, default=0, metavar="N",
                   help="with --watch: stop after N refreshes (0 = until Ctrl-C)")
    s.add_argument("--probe-timeout", type=float, default=3.0, metavar="SECONDS",
                   help="timeout of the receiver probe")
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
    m.add_argument("--architecture", required=True,
                   choices=["densenet121", "resnet18", "densenet169"])
    m.add_argument("--state-dict", required=True, help="PyTorch state dict (.pth/.pt)")
    m.add_argument("--out", required=True, help="output TorchScript file")
    m.add_argument("--name", required=True)
    m.add_argument("--version", required=True)
    m.add_argument("--labels", help="comma-separated labels (default: the architecture's)")
    m.add_argument("--description", required=True,
                   help="what these weights are (shown in every result object)")
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
