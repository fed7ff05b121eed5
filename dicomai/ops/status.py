"""What `dicomai status` shows, read from the database (never written) as one JSON-ready dict.

:func:`collect` works without the daemon: from the database's job, result, event, heartbeat and
quarantine rows (queries in :mod:`dicomai.jobs.reads`), the configuration and the spool's free
disk. :mod:`dicomai.ops.health` adds the live probes, :mod:`dicomai.ops.status_view` draws it.
The dict's keys are what `dicomai status --json` prints: a contract with operators' scripts.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from dicomai.config import Settings
from dicomai.db import ComponentHeartbeat, make_engine, utcnow
from dicomai.jobs import reads
from dicomai.jobs.states import JobState, ResultState
from dicomai.ops.study_rows import latency_seconds
from dicomai.timefmt import aware, iso

__all__ = ["HEARTBEAT_STALE_SECONDS", "WINDOW_SECONDS", "collect", "percentile"]

HEARTBEAT_STALE_SECONDS = 30.0
#: Throughput and latency are computed over jobs finished in this window.
WINDOW_SECONDS = 3600
#: The finished states counted in ``throughput``, in the order its JSON has always listed them.
_FINISHED = (JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED)


def collect(
    settings: Settings,
    *,
    limit: int = 20,
    engine: Engine | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Everything `dicomai status` shows, as one JSON-ready dict.

    Keys: ``daemon`` (up, heartbeat age, components), ``counts`` (state → studies, by each
    study's latest generation), ``studies`` (latest first), ``destinations``, ``models``,
    ``disk``, ``quarantine``, ``throughput`` and ``latency`` (jobs finished in the last
    hour), ``recent_failures`` and ``database`` (reachable, error).
    """
    now = now or utcnow()
    url = settings.database_url
    if engine is None and url.startswith("sqlite:///") and not Path(url[10:]).exists():
        # fresh install: nothing to read, and create nothing
        return _empty(
            settings, now, database={"reachable": False, "error": "database not created yet"}
        )
    own_engine = engine is None
    engine = engine or make_engine(settings.database_url)
    try:
        if not inspect(engine).has_table("jobs"):
            return _empty(settings, now, database={"reachable": True, "error": None})
        return _collect(settings, engine, limit, now)
    except SQLAlchemyError as exc:
        return _empty(
            settings,
            now,
            database={
                "reachable": False,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"[:300],
            },
        )
    finally:
        if own_engine:
            engine.dispose()


def _empty(settings: Settings, now: datetime, database: dict[str, Any]) -> dict[str, Any]:
    return {
        "generated_at": iso(now),
        "daemon": {"up": False, "components": []},
        "counts": {s.value: 0 for s in JobState},
        "studies": [],
        "destinations": [_dest(d, {}) for d in settings.destinations],
        "models": _models(settings, []),
        "disk": _disk(settings),
        "quarantine": {"count": 0, "recent": []},
        "throughput": _throughput([], now),
        "latency": _latency([], []),
        "recent_failures": [],
        "database": database,
    }


def _collect(settings: Settings, engine: Engine, limit: int, now: datetime) -> dict[str, Any]:
    with engine.connect() as conn:
        counts = {s.value: 0 for s in JobState}
        counts.update(reads.state_counts(conn))
        studies = [_study(row) for row in reads.job_list(conn, limit=limit)]
        stats = _destination_stats(conn)
        since = now - timedelta(seconds=WINDOW_SECONDS)
        finished = [r for r in reads.finished_since(conn, since) if aware(r.finished_at) <= now]
        done = [r for r in finished if r.state == JobState.DONE]
        latencies = [
            (aware(r.finished_at) - aware(r.last_instance_at)).total_seconds()
            for r in done
            if r.last_instance_at is not None
        ]
        inference = [r.inference_seconds for r in done if r.inference_seconds is not None]
        failures = [_failure(r) for r in reads.recent_failures(conn, limit=10)]
    with engine.connect() as conn:
        beats = reads.heartbeats(conn)
    with engine.connect() as conn:
        quarantine = _quarantine(conn)
    fresh = [
        b for b in beats if now - aware(b.beat_at) < timedelta(seconds=HEARTBEAT_STALE_SECONDS)
    ]
    last_beat = max((aware(b.beat_at) for b in beats), default=None)
    fresh_names = {b.component for b in fresh}
    return {
        "generated_at": iso(now),
        "daemon": {
            "up": bool(fresh),
            "last_heartbeat_at": iso(last_beat),
            "heartbeat_age_seconds": round((now - last_beat).total_seconds(), 1)
            if last_beat
            else None,
            "components": [
                {
                    "name": b.component,
                    "role": b.role,
                    "beat_at": iso(b.beat_at),
                    "fresh": b.component in fresh_names,
                    **{k: v for k, v in (b.info or {}).items() if k != "models"},
                }
                for b in beats
            ],
        },
        "counts": counts,
        "studies": studies,
        "destinations": [_dest(d, stats.get(d.name, {})) for d in settings.destinations],
        "models": _models(settings, fresh),
        "disk": _disk(settings),
        "quarantine": quarantine,
        "throughput": _throughput(finished, now),
        "latency": _latency(latencies, inference),
        "recent_failures": failures,
        "database": {"reachable": True, "error": None},
    }


def _study(job: Any) -> dict[str, Any]:
    """One recent study (its latest job) as status lists it."""
    findings = job.findings or {}
    return {
        "study_instance_uid": job.study_instance_uid,
        "job_id": job.id,
        "generation": job.generation,
        "state": job.state,
        "route": job.route,
        "model": job.model,
        "instances": job.instance_count,
        "latency_seconds": latency_seconds(job),
        "inference_seconds": job.inference_seconds,
        "positive_findings": findings.get("positive", []),
        "scores": findings.get("scores", {}),
        "received_at": iso(job.created_at),
        "finished_at": iso(job.finished_at),
        "attempts": job.attempts,
        "send_attempts": job.send_attempts,
        "next_attempt_at": iso(job.not_before),
        "last_error": job.last_error,
    }


def _destination_stats(conn: reads.Reader) -> dict[str, dict[str, Any]]:
    """Destination → result objects per state, ``last_sent_at`` and its latest ``last_error``."""
    stats: dict[str, dict[str, Any]] = {}
    for dest, state, n, last in reads.result_counts(conn):
        d = stats.setdefault(dest, {})
        d[state] = n
        if state == ResultState.SENT and last is not None:
            d["last_sent_at"] = iso(last)
    for dest, err in reads.result_errors(conn):
        stats.setdefault(dest, {}).setdefault("last_error", err)
    return stats


def _failure(r: Any) -> dict[str, Any]:
    """One of ``recent_failures``: a move to FAILED ("failed") or an attempt put back ("retry")."""
    return {
        "at": iso(r.at),
        "job_id": r.job_id,
        "generation": r.generation,
        "study_instance_uid": r.study_instance_uid,
        "kind": JobState.FAILED.value if r.dst == JobState.FAILED else "retry",
        "reason": r.reason,
        "state": r.state,
        "error": r.last_error,
    }


def _quarantine(conn: reads.Reader) -> dict[str, Any]:
    count, recent = reads.quarantine_recent(conn, limit=10)
    return {
        "count": count,
        "recent": [
            {
                "reason": r.reason,
                "status": f"0x{r.status_code:04X}",
                "calling_ae": r.calling_ae_title,
                "peer": r.peer_address,
                "received_at": iso(r.received_at),
                "path": r.path,
            }
            for r in recent
        ],
    }


def _disk(settings: Settings) -> dict[str, Any]:
    path = settings.spool_path if settings.spool_path.exists() else settings.general.data_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return {
        "spool": str(settings.spool_path),
        "free_mb": usage.free // (1024 * 1024),
        "min_free_mb": settings.receiver.min_free_disk_mb,
    }


def _dest(d: Any, stats: dict[str, Any]) -> dict[str, Any]:
    """One destination's entry: ``kind`` "dimse" (ae_title, host, port) or "dicomweb" (url;
    host and port are the URL's, ae_title is null). Never credentials: a url holds none."""
    host, port, url = d.host, d.port, None
    if d.kind == "dicomweb":
        parts = urlsplit(d.url)
        host, url = parts.hostname, d.url
        port = parts.port or (443 if parts.scheme == "https" else 80)
    return {
        "name": d.name,
        "kind": d.kind,
        "ae_title": d.ae_title or None,
        "host": host,
        "port": port,
        "url": url,
        "pending": stats.get(ResultState.PENDING, 0),
        "sent": stats.get(ResultState.SENT, 0),
        "failed": stats.get(ResultState.FAILED, 0),
        "skipped": stats.get(ResultState.SKIPPED, 0),
        "last_sent_at": stats.get("last_sent_at"),
        "last_error": stats.get("last_error"),
    }


def _models(settings: Settings, beats: list[ComponentHeartbeat]) -> list[dict[str, Any]]:
    loaded: dict[str, Any] = {}
    pending: dict[str, Any] = {}
    for b in beats:
        loaded.update((b.info or {}).get("models", {}))
        pending.update((b.info or {}).get("models_not_ready", {}))
    out = []
    for name, m in settings.models.items():
        info = loaded.get(name, {})
        state = "ready" if name in loaded else pending.get(name, {}).get("state", "not loaded")
        out.append(
            {
                "name": name,
                "task": m.task,
                "version": m.version,
                "path": str(settings.model_path(name)),
                "sha256_pinned": m.sha256 or None,
                "sha256": info.get("sha256"),
                "device": info.get("device"),
                "loaded": name in loaded,
                "state": state,
                "load_error": None if name in loaded else pending.get(name, {}).get("error"),
                "description": info.get("description"),
            }
        )
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default); None if
    ``values`` is empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _throughput(rows: Sequence[Any], now: datetime) -> dict[str, Any]:
    by_state = {s.value: 0 for s in _FINISHED}
    instances = 0
    for row in rows:
        by_state[row.state] = by_state.get(row.state, 0) + 1
        if row.state == JobState.DONE:
            instances += row.instance_count or 0
    hours = WINDOW_SECONDS / 3600.0
    return {
        "window_seconds": WINDOW_SECONDS,
        "since": iso(now - timedelta(seconds=WINDOW_SECONDS)),
        "finished": len(rows),
        **by_state,
        "studies_per_hour": round(by_state[JobState.DONE] / hours, 2),
        "instances_done": instances,
    }


def _latency(latencies: Sequence[float], inference: Sequence[float]) -> dict[str, Any]:
    return {
        "window_seconds": WINDOW_SECONDS,
        "count": len(latencies),
        "p50_seconds": _r(percentile(latencies, 50)),
        "p95_seconds": _r(percentile(latencies, 95)),
        "max_seconds": _r(max(latencies)) if latencies else None,
        "inference_p50_seconds": _r(percentile(inference, 50)),
        "inference_p95_seconds": _r(percentile(inference, 95)),
    }
