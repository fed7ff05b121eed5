"""`dicomai serve` (the daemon) and `dicomai status` (once, as JSON or text, or ``--watch``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from dicomai.config import Settings
from dicomai.ops.cli.common import (
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    configure_logs,
    make_console,
    settings_from,
)

__all__ = ["cmd_serve", "cmd_status"]


# -- serve -------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from dicomai.runtime import heap
    from dicomai.runtime.daemon import Daemon
    from dicomai.runtime.roles import ROLES

    settings = settings_from(args)
    configure_logs(settings)
    roles = ROLES
    if args.only:
        roles = tuple(r.strip() for r in args.only.split(",") if r.strip())
        unknown = set(roles) - set(ROLES)
        if unknown:
            print(f"dicomai serve: unknown role(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return EXIT_USAGE
    heap.limit_arenas()  # before the daemon's threads start: see dicomai.runtime.heap
    daemon = Daemon(settings, roles=roles)
    return daemon.run(reload_settings=lambda: settings_from(args))


# -- status ------------------------------------------------------------------------------
def _status_frame(
    args: argparse.Namespace, settings: Settings, cache: dict[Any, Any] | None = None
) -> tuple[dict, dict]:
    from dicomai.ops.health import check_health
    from dicomai.ops.status import collect

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
    from dicomai.ops.status_view import render_rich, render_text

    settings = settings_from(args)
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
        make_console().print(render_rich(data, health))
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

    from dicomai.ops.status_view import render_rich, render_text

    console = make_console()
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
