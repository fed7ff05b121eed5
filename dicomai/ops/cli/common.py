"""What every subcommand shares: exit codes, the settings, logs, a console, a read-only engine."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomai.config import Settings, default_config_path, load_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = [
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_STARTUP",
    "EXIT_USAGE",
    "configure_logs",
    "make_console",
    "mask",
    "read_engine",
    "settings_from",
    "tools_installed",
]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings of ``--config`` (default $DICOMAI_CONFIG or config/dicomai.toml)."""
    return load_settings(Path(args.config) if args.config else default_config_path())


def configure_logs(settings: Settings, fmt: str | None = None) -> None:
    """Logging as [logging] configures it (``fmt`` overrides its format)."""
    from dicomai.logs import configure

    log = settings.logging
    configure(
        log.level, fmt or log.format, str(log.file) if log.file else None, levels=dict(log.levels)
    )


def make_console(stderr: bool = False) -> Any:
    """A rich console on the current stdout/stderr; wide enough for logs when not a tty."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, width=None if tty else 200, soft_wrap=False, highlight=False)


def read_engine(settings: Settings) -> Engine | None:
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


def mask(url: str) -> str:
    """A database URL with its password replaced by ``***``."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def tools_installed(command: str) -> bool:
    """Whether dicomai-tools (evaluation, demo; not part of the daemon) is importable."""
    if importlib.util.find_spec("dicomai_tools") is not None:
        return True
    print(
        f"dicomai {command}: needs dicomai-tools, which a daemon install leaves out; install it "
        "with `pip install ./tools` from the dicomai source tree (scripts/setup.sh does)",
        file=sys.stderr,
    )
    return False
