"""Command line: argparse subcommands, each one function returning an exit code.

``main`` is the ``dicomai`` console script (and ``python -m dicomai``). The parser is in
:mod:`.parser`; each group of subcommands in its own module, which imports what a command needs
(the database, pynetdicom, torch, rich) only when that command runs, so that ``dicomai --help``
stays quick.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dicomai.errors import ConfigError, DicomAIError
from dicomai.ops.cli.common import EXIT_RUNTIME, EXIT_STARTUP
from dicomai.ops.cli.parser import build_parser

__all__ = ["main"]


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
