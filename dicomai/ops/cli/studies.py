"""`dicomai studies`: the study list (filters: state, route, since) and `studies show UID`
(series, jobs, result objects, timeline)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from dicomai.config import Settings
from dicomai.ops.cli.common import (
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    make_console,
    read_engine,
    settings_from,
)
from dicomai.ops.study_rows import study_note
from dicomai.timefmt import iso

__all__ = ["cmd_studies", "parse_since"]


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


def cmd_studies(args: argparse.Namespace) -> int:
    """List studies (filters: state, route, since) or show one study's jobs and timeline."""
    settings = settings_from(args)
    if getattr(args, "studies_cmd", None) == "show":
        return _study_show(args, settings)
    from dicomai.db import utcnow
    from dicomai.jobs import reads
    from dicomai.ops.study_rows import latency_seconds

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
    engine = read_engine(settings)
    rows: list[dict[str, Any]] = []
    if engine is not None:
        try:
            with engine.connect() as conn:
                jobs = reads.job_list(
                    conn,
                    limit=args.limit,
                    latest_only=not args.all_generations,
                    states=args.state or (),
                    routes=args.route or (),
                    since=since,
                )
            for job in jobs:
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
                        "received_at": iso(job.created_at),
                        "finished_at": iso(job.finished_at),
                        "latency_seconds": latency_seconds(job),
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
        table.add_row(
            str(r["job_id"]),
            str(r["generation"]),
            r["study_instance_uid"],
            r["state"],
            r["route"] or "-",
            str(r["instances"]),
            (r["received_at"] or "-")[:19].replace("T", " "),
            "-" if r["latency_seconds"] is None else f"{r['latency_seconds']:.1f}s",
            study_note(r),
        )
    make_console().print(table)
    return EXIT_OK


def _study_show(args: argparse.Namespace, settings: Settings) -> int:
    from dicomai.jobs import reads
    from dicomai.ops.study_rows import latency_seconds

    engine = read_engine(settings)
    if engine is None:
        print(
            f"dicomai studies show: no study with StudyInstanceUID {args.uid} (no database yet)",
            file=sys.stderr,
        )
        return EXIT_RUNTIME
    try:
        with engine.connect() as conn:
            detail = reads.study_detail(conn, args.uid.strip())
    finally:
        engine.dispose()
    if detail is None:
        print(f"dicomai studies show: no study with StudyInstanceUID {args.uid}", file=sys.stderr)
        return EXIT_RUNTIME
    study, events = detail.study, detail.events
    gen_of = {j.id: j.generation for j in detail.jobs}
    data = {
        "study_instance_uid": study.study_instance_uid,
        "first_received_at": iso(study.first_received_at),
        "last_received_at": iso(study.last_received_at),
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
            for s in detail.series
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
                "received_at": iso(j.created_at),
                "closed_at": iso(j.closed_at),
                "finished_at": iso(j.finished_at),
                "latency_seconds": latency_seconds(j),
                "inference_seconds": j.inference_seconds,
                "next_attempt_at": iso(j.not_before),
                "claimed_by": j.claimed_by,
                "destinations": j.destinations,
                "findings": j.findings,
                "last_error": j.last_error,
            }
            for j in detail.jobs
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
                "sent_at": iso(r.sent_at),
                "last_error": r.last_error,
            }
            for r in detail.results
        ],
        "timeline": [
            {
                "at": iso(e.at),
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

    console = make_console()
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
