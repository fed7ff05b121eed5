"""Read-only queries behind `dicomai status` and its health check; works without the daemon."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Engine

from dicomai.config import Settings
from dicomai.db import (
    ComponentHeartbeat,
    Job,
    QuarantineEntry,
    ResultObject,
    Study,
    make_engine,
    utcnow,
)
from dicomai.queue import JobState

__all__ = ["HEARTBEAT_STALE_SECONDS", "collect", "render_text"]

HEARTBEAT_STALE_SECONDS = 30.0


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def collect(settings: Settings, *, limit: int = 20, engine: Engine | None = None,
            now: datetime | None = None) -> dict[str, Any]:
    """Everything `dicomai status` shows, as one JSON-ready dict.

    Keys: ``daemon`` (up, heartbeat age, components), ``counts`` (state → studies, by each
    study's latest generation), ``studies`` (latest first), ``destinations``, ``models``,
    ``disk``.
    """
    now = now or utcnow()
    url = settings.database_url
    if engine is None and url.startswith("sqlite:///") and not Path(url[10:]).exists():
        return _empty(settings, now)  # fresh install: nothing to read, and create nothing
    own_engine = engine is None
    engine = engine or make_engine(settings.database_url)
    try:
        if not inspect(engine).has_table("jobs"):
            return _empty(settings, now)
        return _collect(settings, engine, limit, now)
    finally:
        if own_engine:
            engine.dispose()


def _empty(settings: Settings, now: datetime) -> dict[str, Any]:
    return {
        "generated_at": _iso(now),
        "daemon": {"up": False, "components": []},
        "counts": {s.value: 0 for s in JobState},
        "studies": [],
        "destinations": [_dest(d, {}) for d in settings.destinations],
        "models": _models(settings, []),
        "disk": _disk(settings),
        "quarantine": {"count": 0, "recent": []},
    }


def _disk(settings: Settings) -> dict[str, Any]:
    path = settings.spool_path if settings.spool_path.exists() else settings.general.data_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return {"spool": str(settings.spool_path), "free_mb": usage.free // (1024 * 1024),
            "min_free_mb": settings.receiver.min_free_disk_mb}


def _dest(d: Any, stats: dict[str, Any]) -> dict[str, Any]:
    return {"name": d.name, "ae_title": d.ae_title, "host": d.host, "port": d.port,
            "pending": stats.get("pending", 0), "sent": stats.get("sent", 0),
            "failed": stats.get("failed", 0), "last_sent_at": stats.get("last_sent_at"),
            "last_error": stats.get("last_error")}


def _models(settings: Settings, beats: list[ComponentHeartbeat]) -> list[dict[str, Any]]:
    loaded: dict[str, Any] = {}
    for b in beats:
        loaded.update((b.info or {}).get("models", {}))
    out = []
    for name, m in settings.models.items():
        info = loaded.get(name, {})
        out.append({"name": name, "task": m.task, "version": m.version,
                    "path": str(settings.model_path(name)), "sha256_pinned": m.sha256 or None,
                    "sha256": info.get("sha256"), "device": info.get("device"),
                    "loaded": name in loaded, "description": info.get("description")})
    return out


def _collect(settings: Settings, engine: Engine, limit: int, now: datetime) -> dict[str, Any]:
    with engine.connect() as conn:
        latest = (
            select(Job.study_id, func.max(Job.generation).label("gen"))
            .group_by(Job.study_id).subquery()
        )
        latest_jobs = (
            select(Job, Study.study_instance_uid)
            .join(latest, (latest.c.study_id == Job.study_id) & (latest.c.gen == Job.generation))
            .join(Study, Study.id == Job.study_id)
        )
        counts = {s.value: 0 for s in JobState}
        lj = latest_jobs.subquery()
        for state, n in conn.execute(select(lj.c.state, func.count()).group_by(lj.c.state)):
            counts[state] = n
        rows = conn.execute(latest_jobs.order_by(Job.id.desc()).limit(limit)).all()
        studies = []
        for row in rows:
            job = row
            latency = None
            if job.finished_at and job.last_instance_at and job.state == JobState.DONE.value:
                latency = round((_aware(job.finished_at) - _aware(job.last_instance_at))
                                .total_seconds(), 3)
            findings = job.findings or {}
            studies.append({
                "study_instance_uid": row.study_instance_uid,
                "job_id": job.id,
                "generation": job.generation,
                "state": job.state,
                "route": job.route,
                "model": job.model,
                "instances": job.instance_count,
                "latency_seconds": latency,
                "inference_seconds": job.inference_seconds,
                "positive_findings": findings.get("positive", []),
                "scores": findings.get("scores", {}),
                "received_at": _iso(_aware(job.created_at)),
                "finished_at": _iso(_aware(job.finished_at)),
                "attempts": job.attempts,
                "send_attempts": job.send_attempts,
                "next_attempt_at": _iso(_aware(job.not_before)),
                "last_error": job.last_error,
            })
        stats: dict[str, dict[str, Any]] = {}
        for dest, state, n, last in conn.execute(
            select(ResultObject.destination, ResultObject.state, func.count(),
                   func.max(ResultObject.sent_at))
            .group_by(ResultObject.destination, ResultObject.state)
        ):
            d = stats.setdefault(dest, {})
            d[state] = n
            if state == "sent" and last is not None:
                d["last_sent_at"] = _iso(_aware(last))
        for dest, err in conn.execute(
            select(ResultObject.destination, ResultObject.last_error)
            .where(ResultObject.last_error.is_not(None)).order_by(ResultObject.id.desc())
        ):
            stats.setdefault(dest, {}).setdefault("last_error", err)
    with engine.connect() as conn:
        beats = [ComponentHeartbeat(**dict(r._mapping)) for r in
                 conn.execute(select(*ComponentHeartbeat.__table__.columns))]
    fresh = [b for b in beats
             if now - _aware(b.beat_at) < timedelta(seconds=HEARTBEAT_STALE_SECONDS)]
    last_beat = max((_aware(b.beat_at) for b in beats), default=None)
    return {
        "generated_at": _iso(now),
        "daemon": {
            "up": bool(fresh),
            "last_heartbeat_at": _iso(last_beat),
            "heartbeat_age_seconds": round((now - last_beat).total_seconds(), 1)
            if last_beat else None,
            "components": [{"name": b.component, "role": b.role, "beat_at": _iso(_aware(b.beat_at)),
                            **{k: v for k, v in (b.info or {}).items() if k != "models"}}
                           for b in beats],
        },
        "counts": counts,
        "studies": studies,
        "destinations": [_dest(d, stats.get(d.name, {})) for d in settings.destinations],
        "models": _models(settings, fresh),
        "disk": _disk(settings),
        "quarantine": _quarantine(engine),
    }


def _quarantine(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        if not inspect(conn).has_table("quarantine"):
            return {"count": 0, "recent": []}
        count = conn.scalar(select(func.count()).select_from(QuarantineEntry)) or 0
        recent = conn.execute(
            select(QuarantineEntry.reason, QuarantineEntry.status_code,
                   QuarantineEntry.calling_ae_title, QuarantineEntry.peer_address,
                   QuarantineEntry.received_at, QuarantineEntry.path)
            .order_by(QuarantineEntry.id.desc()).limit(10)
        ).all()
    return {"count": count, "recent": [
        {"reason": r.reason, "status": f"0x{r.status_code:04X}", "calling_ae": r.calling_ae_title,
         "peer": r.peer_address, "received_at": _iso(_aware(r.received_at)), "path": r.path}
        for r in recent]}


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return None  # type: ignore[return-value]
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def render_text(data: dict[str, Any]) -> str:
    """A plain terminal rendering of :func:`collect`'s output."""
    lines = []
    d = data["daemon"]
    state = "UP" if d["up"] else "DOWN"
    age = d.get("heartbeat_age_seconds")
    lines.append(f"dicomai daemon: {state}" + (f" (last heartbeat {age}s ago)" if age else ""))
    for c in d["components"]:
        rec = c.get("receiver")
        where = f" listening {rec['ae_title']}@{rec['host']}:{rec['port']}" if rec else ""
        lines.append(f"  {c['name']} roles={','.join(c.get('roles', []))}{where}")
    lines.append("")
    lines.append("studies by state: " + "  ".join(
        f"{k}={v}" for k, v in data["counts"].items() if v) or "studies by state: none")
    lines.append("")
    if data["studies"]:
        lines.append(f"{'job':>5} {'state':<9} {'route':<11} {'model':<12} {'inst':>5} "
                     f"{'latency':>8}  findings / error")
        for s in data["studies"]:
            lat = f"{s['latency_seconds']:.1f}s" if s["latency_seconds"] is not None else "-"
            note = ", ".join(s["positive_findings"]) or ("none" if s["state"] == "done" else "")
            if s["last_error"] and s["state"] not in ("done",):
                note = f"{note} {s['last_error']}".strip()
                if s["next_attempt_at"]:
                    note += f" (next attempt {s['next_attempt_at']})"
            lines.append(f"{s['job_id']:>5} {s['state']:<9} {s['route'] or '-':<11} "
                         f"{s['model'] or '-':<12} {s['instances']:>5} {lat:>8}  {note}")
        lines.append("")
    lines.append("destinations:")
    for dst in data["destinations"]:
        lines.append(f"  {dst['name']}: {dst['ae_title']}@{dst['host']}:{dst['port']} "
                     f"sent={dst['sent']} pending={dst['pending']} failed={dst['failed']}"
                     + (f" last_error={dst['last_error']}" if dst["last_error"] else ""))
    lines.append("models:")
    for m in data["models"]:
        loaded = f"loaded on {m['device']}" if m["loaded"] else "not loaded"
        lines.append(f"  {m['name']} {m['version']} ({m['task']}) {loaded}")
    disk = data["disk"]
    lines.append(f"spool: {disk['spool']} free={disk['free_mb']} MB "
                 f"(floor {disk['min_free_mb']} MB)")
    q = data.get("quarantine") or {}
    if q.get("count"):
        lines.append(f"quarantine: {q['count']} refused object(s); latest:")
        for item in q["recent"][:5]:
            lines.append(f"  {item['received_at']} {item['reason']} {item['status']} "
                         f"from {item['calling_ae']}@{item['peer']}")
    return "\n".join(lines)
