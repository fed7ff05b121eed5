"""`dicomai purge` (spool files of studies finished long ago) and `dicomai demo`."""

from __future__ import annotations

import argparse
import sys

from dicomai.ops.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    read_engine,
    settings_from,
    tools_installed,
)
from dicomai.timefmt import iso

__all__ = ["cmd_demo", "cmd_purge"]


def cmd_purge(args: argparse.Namespace) -> int:
    """Delete spool files of studies finished more than N days ago (history rows are kept)."""
    from dicomai.db import make_session_factory, utcnow
    from dicomai.ingest.index import InstanceIndex
    from dicomai.ingest.spool import Spool
    from dicomai.runtime.scheduler import purge_finished

    settings = settings_from(args)
    days = settings.spool.retention_days if args.older_than_days is None else args.older_than_days
    if days < 0:
        print("dicomai purge: --older-than-days must not be negative", file=sys.stderr)
        return EXIT_USAGE
    engine = read_engine(settings)
    if engine is None:
        print("nothing to purge (no database yet)")
        return EXIT_OK
    try:
        items = purge_finished(
            InstanceIndex(make_session_factory(engine)),
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
            f"finished {iso(item.finished_at)}): {item.instance_files} instance file(s), "
            f"{item.result_folders} results folder(s), {item.size_bytes / 1e6:.1f} MB"
        )
    print(
        f"{verb} {sum(i.instance_files for i in items)} instance file(s) and "
        f"{sum(i.result_folders for i in items)} results folder(s) of {len(items)} "
        f"stud{'y' if len(items) == 1 else 'ies'}, "
        f"{sum(i.size_bytes for i in items) / 1e6:.1f} MB"
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole loop on local sample studies and print the results."""
    if not tools_installed("demo"):
        return EXIT_USAGE
    from dicomai_tools.demo import run_demo

    settings = settings_from(args)
    return run_demo(settings, keep=args.keep, timeout=args.timeout, verbose=args.verbose)
