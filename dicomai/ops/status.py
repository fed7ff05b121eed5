"""Read-only queries behind `dicomai status` and its health check; works without the daemon.

:func:`collect` reads the database (never writes it), :func:`check_health` adds the live
probes (receiver TCP connect and C-ECHO), :func:`render_rich` and :func:`render_text` draw the
result for a terminal.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, inspect, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from dicomai.config import Settings
from dicomai.db import (
    ComponentHeartbeat,
    Job,
    JobEvent,
    QuarantineEntry,
    ResultObject,
    Study,
    make_engine,
    utcnow,
)
from dicomai.jobs.states import JobState

__all__ = [
    "ACTIVE_STATES",
    "HEARTBEAT_STALE_SECONDS",
    "ROLES",
    "WINDOW_SECONDS",
    "check_health",
    "collect",
    "percentile",
    "probe_receiver",
    "render_rich",
    "render_text",
]

HEARTBEAT_STALE_SECONDS = 30.0
#: Throughput and latency are computed over jobs finished in this window.
WINDOW_SECONDS = 3600
#: The daemon's component roles (dicomai.runtime.daemon.ROLES; not imported: that pulls in torch).
ROLES = ("receiver", "worker", "sender", "scheduler")
#: States in which a job is still travelling through the pipeline (the queue).
ACTIVE_STATES = ("receiving", "queued", "running", "outbox", "sending")
_FAILURE_REASONS = ("retry.error", "retry.send")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


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
        "generated_at": _iso(now),
        "daemon": {"up": False, "components": []},
        "counts": {s.value: 0 for s in JobState},
        "studies": [],
        "destinations": [_dest(d, {}) for d in settings.destinations],
        "models": _models(settings, []),
        "disk": _disk(settings),
        "quarantine": {"count": 0, "recent": []},
        "throughput": _throughput([], now),
        "latency": _latency([], [], now),
        "recent_failures": [],
        "database": database,
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
        "pending": stats.get("pending", 0),
        "sent": stats.get("sent", 0),
        "failed": stats.get("failed", 0),
        "skipped": stats.get("skipped", 0),
        "last_sent_at": stats.get("last_sent_at"),
        "last_error": stats.get("last_error"),
    }


def _dest_address(dst: dict[str, Any]) -> str:
    """How status shows where a destination is."""
    if dst.get("kind") == "dicomweb":
        return f"STOW-RS {dst['url']}"
    return f"{dst['ae_title']}@{dst['host']}:{dst['port']}"


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
    by_state = {s: 0 for s in ("done", "failed", "skipped", "cancelled")}
    instances = 0
    for row in rows:
        by_state[row.state] = by_state.get(row.state, 0) + 1
        if row.state == JobState.DONE.value:
            instances += row.instance_count or 0
    hours = WINDOW_SECONDS / 3600.0
    return {
        "window_seconds": WINDOW_SECONDS,
        "since": _iso(now - timedelta(seconds=WINDOW_SECONDS)),
        "finished": len(rows),
        **by_state,
        "studies_per_hour": round(by_state["done"] / hours, 2),
        "instances_done": instances,
    }


def _latency(
    latencies: Sequence[float], inference: Sequence[float], now: datetime
) -> dict[str, Any]:
    return {
        "window_seconds": WINDOW_SECONDS,
        "count": len(latencies),
        "p50_seconds": _r(percentile(latencies, 50)),
        "p95_seconds": _r(percentile(latencies, 95)),
        "max_seconds": _r(max(latencies)) if latencies else None,
        "inference_p50_seconds": _r(percentile(inference, 50)),
        "inference_p95_seconds": _r(percentile(inference, 95)),
    }


def _collect(settings: Settings, engine: Engine, limit: int, now: datetime) -> dict[str, Any]:
    with engine.connect() as conn:
        latest = (
            select(Job.study_id, func.max(Job.generation).label("gen"))
            .group_by(Job.study_id)
            .subquery()
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
                latency = round(
                    (_aware(job.finished_at) - _aware(job.last_instance_at)).total_seconds(), 3
                )
            findings = job.findings or {}
            studies.append(
                {
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
                }
            )
        stats: dict[str, dict[str, Any]] = {}
        for dest, state, n, last in conn.execute(
            select(
                ResultObject.destination,
                ResultObject.state,
                func.count(),
                func.max(ResultObject.sent_at),
            ).group_by(ResultObject.destination, ResultObject.state)
        ):
            d = stats.setdefault(dest, {})
            d[state] = n
            if state == "sent" and last is not None:
                d["last_sent_at"] = _iso(_aware(last))
        for dest, err in conn.execute(
            select(ResultObject.destination, ResultObject.last_error)
            .where(ResultObject.last_error.is_not(None))
            .order_by(ResultObject.id.desc())
        ):
            stats.setdefault(dest, {}).setdefault("last_error", err)
        since = now - timedelta(seconds=WINDOW_SECONDS)
        finished = conn.execute(
            select(
                Job.state,
                Job.finished_at,
                Job.last_instance_at,
                Job.inference_seconds,
                Job.instance_count,
            ).where(Job.finished_at >= since)
        ).all()
        finished = [r for r in finished if _aware(r.finished_at) <= now]
        latencies = [
            (_aware(r.finished_at) - _aware(r.last_instance_at)).total_seconds()
            for r in finished
            if r.state == JobState.DONE.value and r.last_instance_at is not None
        ]
        inference = [
            r.inference_seconds
            for r in finished
            if r.state == JobState.DONE.value and r.inference_seconds is not None
        ]
        failures = [
            {
                "at": _iso(_aware(r.at)),
                "job_id": r.job_id,
                "generation": r.generation,
                "study_instance_uid": r.study_instance_uid,
                "kind": "failed" if r.dst == JobState.FAILED.value else "retry",
                "reason": r.reason,
                "state": r.state,
                "error": r.last_error,
            }
            for r in conn.execute(
                select(
                    JobEvent.at,
                    JobEvent.reason,
                    JobEvent.dst,
                    JobEvent.job_id,
                    Job.generation,
                    Job.state,
                    Job.last_error,
                    Study.study_instance_uid,
                )
                .join(Job, Job.id == JobEvent.job_id)
                .join(Study, Study.id == Job.study_id)
                .where(
                    or_(
                        JobEvent.dst == JobState.FAILED.value, JobEvent.reason.in_(_FAILURE_REASONS)
                    )
                )
                .order_by(JobEvent.id.desc())
                .limit(10)
            )
        ]
    with engine.connect() as conn:
        beats = [
            ComponentHeartbeat(**dict(r._mapping))
            for r in conn.execute(select(*ComponentHeartbeat.__table__.columns))
        ]
    fresh = [
        b for b in beats if now - _aware(b.beat_at) < timedelta(seconds=HEARTBEAT_STALE_SECONDS)
    ]
    last_beat = max((_aware(b.beat_at) for b in beats), default=None)
    fresh_names = {b.component for b in fresh}
    return {
        "generated_at": _iso(now),
        "daemon": {
            "up": bool(fresh),
            "last_heartbeat_at": _iso(last_beat),
            "heartbeat_age_seconds": round((now - last_beat).total_seconds(), 1)
            if last_beat
            else None,
            "components": [
                {
                    "name": b.component,
                    "role": b.role,
                    "beat_at": _iso(_aware(b.beat_at)),
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
        "quarantine": _quarantine(engine),
        "throughput": _throughput(finished, now),
        "latency": _latency(latencies, inference, now),
        "recent_failures": failures,
        "database": {"reachable": True, "error": None},
    }


def _quarantine(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        if not inspect(conn).has_table("quarantine"):
            return {"count": 0, "recent": []}
        count = conn.scalar(select(func.count()).select_from(QuarantineEntry)) or 0
        recent = conn.execute(
            select(
                QuarantineEntry.reason,
                QuarantineEntry.status_code,
                QuarantineEntry.calling_ae_title,
                QuarantineEntry.peer_address,
                QuarantineEntry.received_at,
                QuarantineEntry.path,
            )
            .order_by(QuarantineEntry.id.desc())
            .limit(10)
        ).all()
    return {
        "count": count,
        "recent": [
            {
                "reason": r.reason,
                "status": f"0x{r.status_code:04X}",
                "calling_ae": r.calling_ae_title,
                "peer": r.peer_address,
                "received_at": _iso(_aware(r.received_at)),
                "path": r.path,
            }
            for r in recent
        ],
    }


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return None  # type: ignore[return-value]
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


# -- health ------------------------------------------------------------------------------
def _connect_host(host: str) -> str:
    """Where to connect to reach a server bound to ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def probe_receiver(
    host: str,
    port: int,
    ae_title: str,
    *,
    calling_ae: str = "DICOMAI-CHECK",
    tls: bool = False,
    peer_filter: bool = False,
    timeout: float = 3.0,
) -> tuple[bool, str]:
    """Is a DICOM receiver listening at ``host:port``? ``(ok, detail)``.

    A C-ECHO association, released at once. A rejected association (a calling AE title the
    receiver does not accept) still proves that it listens and answers DICOM. Without a DICOM
    answer, a plain TCP connect tells "nothing listens" from "listens but does not answer";
    the latter counts as listening only when it may be our own address or certificate that is
    refused (``peer_filter``: the receiver restricts peer addresses; ``tls``).

    A bare TCP connect is not used as the probe itself: pynetdicom keeps such a connection as
    an association (holding one of its slots) until its network timeout.
    """
    from pynetdicom import AE

    target = _connect_host(host)
    where = f"{ae_title}@{target}:{port}"
    tls_args = None
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        tls_args = (ctx, None)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    try:
        # tls_args' server name None: no SNI and no name check (pynetdicom passes it through
        # to wrap_socket, whose type allows None; pynetdicom's annotation does not).
        assoc = ae.associate(target, port, ae_title=ae_title, tls_args=tls_args)  # type: ignore[arg-type]
        if assoc.is_established:
            rsp = assoc.send_c_echo()
            assoc.release()
            status = int(rsp.Status) if rsp and "Status" in rsp else None
            if status == 0:
                return True, f"{where} answers C-ECHO"
            return False, f"{where} C-ECHO status " + (
                f"0x{status:04X}" if status is not None else "missing"
            )
        if assoc.is_rejected:
            return True, f"{where} answers (association rejected for {calling_ae}; it listens)"
    except Exception:  # pynetdicom raises several types on broken peers; see TCP below
        pass
    finally:
        ae.shutdown()
    try:
        with socket.create_connection((target, port), timeout=timeout):
            pass
    except OSError as exc:
        return False, f"{where}: TCP connect failed ({exc.strerror or type(exc).__name__})"
    if tls:
        return True, f"{where} accepts TCP; TLS association refused (client certificate?)"
    if peer_filter:
        return True, f"{where} accepts TCP; this address may not be in allowed_peer_addresses"
    return False, f"{where} accepts TCP but gives no DICOM answer"


def _check_dicomweb(
    component: dict[str, Any], add: Callable[..., None], *, probe: bool, timeout: float
) -> None:
    """The "dicomweb" check of a component whose STOW-RS receiver is on: its port accepts a
    TCP connection (no request is sent: nothing is logged or audited as a caller)."""
    web = component["receiver"].get("dicomweb") or {}
    if not web.get("enabled"):
        return
    where = f"STOW-RS {web['host']}:{web['port']}{'' if web.get('path') == '/' else web['path']}"
    if not probe:
        add("dicomweb", True, f"{where} (reported by heartbeat; not probed)")
        return
    comp_host = component["name"].partition("@")[2].rpartition(":")[0]
    local = _connect_host(str(web["host"])) in ("127.0.0.1", "::1", "localhost")
    if local and comp_host and comp_host != socket.gethostname():
        add("dicomweb", None, f"{where} on host {comp_host}; not probed from here", critical=False)
        return
    try:
        with socket.create_connection(
            (_connect_host(str(web["host"])), int(web["port"])), timeout=timeout
        ):
            pass
    except OSError as exc:
        add(
            "dicomweb", False, f"{where}: TCP connect failed ({exc.strerror or type(exc).__name__})"
        )
        return
    add("dicomweb", True, f"{where} accepts connections")


def check_health(
    data: dict[str, Any],
    settings: Settings | None = None,
    *,
    probe: bool = True,
    timeout: float = 3.0,
    calling_ae: str | None = None,
    cache: dict[Any, Any] | None = None,
    cache_seconds: float = 30.0,
) -> dict[str, Any]:
    """Health checks over :func:`collect`'s output; C-ECHO to the receiver when ``probe``.

    Returns ``{"healthy": bool, "checks": [{"name", "ok", "critical", "detail"}]}``.
    ``healthy`` is False when a critical check fails: daemon heartbeat stale, database
    unreachable, no receiver answering (see :func:`probe_receiver`), or free disk below
    ``[receiver] min_free_disk_mb``. A component role that no live process reports is a
    warning only (roles may run in other processes or on another host).

    The probe calls with ``calling_ae`` (default ``[sender] ae_title``). A receiver that
    restricts calling AE titles rejects it, which still counts as listening but is audited as
    a rejected association: add that title to ``allowed_calling_ae_titles`` to avoid it.

    ``cache`` (a dict kept by the caller, as ``--watch`` does) reuses a probe result for
    ``cache_seconds``, so that a refreshing display does not open an association each time.
    """
    checks: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str, critical: bool = True) -> None:
        checks.append({"name": name, "ok": ok, "critical": critical, "detail": detail})

    d = data["daemon"]
    age = d.get("heartbeat_age_seconds")
    if d["up"]:
        add("heartbeat", True, f"last heartbeat {age}s ago")
    elif age is not None:
        add(
            "heartbeat",
            False,
            f"stale: last heartbeat {age}s ago (limit {HEARTBEAT_STALE_SECONDS:.0f}s)",
        )
    else:
        add("heartbeat", False, "no heartbeat: the daemon is not running")
    db = data.get("database") or {"reachable": True}
    add(
        "database",
        bool(db.get("reachable")),
        "reachable" if db.get("reachable") else (db.get("error") or "unreachable"),
    )

    fresh = [c for c in d["components"] if c.get("fresh", True) and d["up"]]
    receivers = [c for c in fresh if c.get("receiver")]
    if not receivers:
        add("receiver", False, "no running component reports a listening receiver")
    for c in receivers:
        rec = c["receiver"]
        if not probe:
            add(
                "receiver",
                True,
                f"{rec['ae_title']}@{rec['host']}:{rec['port']} "
                "(reported by heartbeat; not probed)",
            )
            continue
        comp_host = c["name"].partition("@")[2].rpartition(":")[0]
        local = _connect_host(str(rec["host"])) in ("127.0.0.1", "::1", "localhost")
        if local and comp_host and comp_host != socket.gethostname():
            add(
                "receiver",
                None,
                f"{rec['ae_title']}@{rec['host']}:{rec['port']} on host "
                f"{comp_host}; not probed from here",
                critical=False,
            )
            continue
        key = (str(rec["host"]), int(rec["port"]), str(rec["ae_title"]))
        hit = cache.get(key) if cache is not None else None
        if hit is not None and time.monotonic() - hit[0] < cache_seconds:
            ok, detail = hit[1], hit[2]
        else:
            r = settings.receiver if settings else None
            ok, detail = probe_receiver(
                key[0],
                key[1],
                key[2],
                timeout=timeout,
                calling_ae=calling_ae
                or (settings.sender.ae_title if settings else "DICOMAI-CHECK"),
                tls=bool(r and r.tls_cert_file),
                peer_filter=bool(r and r.allowed_peer_addresses),
            )
            if cache is not None:
                cache[key] = (time.monotonic(), ok, detail)
        add("receiver", ok, detail)
    for c in receivers:
        _check_dicomweb(c, add, probe=probe, timeout=timeout)
    for role in ROLES[1:]:
        running = [c for c in fresh if role in c.get("roles", [])]
        add(
            role,
            bool(running),
            f"running in {', '.join(c['name'] for c in running)}"
            if running
            else "no live process runs this role",
            critical=False,
        )
    disk = data["disk"]
    ok = disk["free_mb"] >= disk["min_free_mb"]
    add("disk", ok, f"{disk['free_mb']} MB free on the spool (floor {disk['min_free_mb']} MB)")
    healthy = all(c["ok"] for c in checks if c["critical"])
    return {"healthy": healthy, "checks": checks}


# -- rendering ---------------------------------------------------------------------------
def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return (
        f"{value:.2f}s"
        if value < 10
        else f"{value:.1f}s"
        if value < 600
        else f"{value / 60:.1f}min"
    )


def render_rich(data: dict[str, Any], health: dict[str, Any] | None = None) -> Any:
    """A rich renderable (panels and tables) of :func:`collect` (+ :func:`check_health`)."""
    from rich import box
    from rich.console import Group, JustifyMethod
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    d = data["daemon"]
    title = Text("dicomai daemon: ")
    title.append("UP" if d["up"] else "DOWN", style="bold green" if d["up"] else "bold red")
    if d.get("heartbeat_age_seconds") is not None:
        title.append(f" (last heartbeat {d['heartbeat_age_seconds']}s ago)")
    if health is not None:
        title.append(
            "  healthy" if health["healthy"] else "  UNHEALTHY",
            style="green" if health["healthy"] else "bold red",
        )
    parts.append(title)

    if health is not None:
        t = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
        t.add_column("check", style="bold")
        t.add_column("", width=4)
        t.add_column("detail", overflow="fold")
        for c in health["checks"]:
            mark = (
                "[green]ok[/]"
                if c["ok"]
                else "[yellow]n/a[/]"
                if c["ok"] is None
                else "[red]FAIL[/]"
                if c["critical"]
                else "[yellow]warn[/]"
            )
            t.add_row(c["name"], mark, c["detail"])
        parts.append(Panel(t, title="health", title_align="left", expand=False))
    comps = Table(box=box.SIMPLE, title="components", title_justify="left")
    for col in ("process", "roles", "listening", "heartbeat"):
        comps.add_column(col)
    for c in d["components"]:
        rec = c.get("receiver")
        comps.add_row(
            c["name"],
            ",".join(c.get("roles", [])),
            f"{rec['ae_title']}@{rec['host']}:{rec['port']}{_dicomweb_where(rec)}" if rec else "-",
            (c.get("beat_at") or "-") + ("" if c.get("fresh", True) else " (stale)"),
        )
    if d["components"]:
        parts.append(comps)

    q = Table(box=box.SIMPLE, title="studies by state (latest generation)", title_justify="left")
    for state in data["counts"]:
        q.add_column(state, justify="right", style="bold" if state in ACTIVE_STATES else None)
    q.add_row(*(str(n) for n in data["counts"].values()))
    parts.append(q)

    tp, lat = data.get("throughput") or {}, data.get("latency") or {}
    if tp:
        hour = Table(box=box.SIMPLE, title="last hour", title_justify="left")
        for col in (
            "done",
            "failed",
            "skipped",
            "studies/h",
            "latency p50",
            "latency p95",
            "max",
            "inference p50",
            "inference p95",
        ):
            hour.add_column(col, justify="right")
        hour.add_row(
            str(tp["done"]),
            str(tp["failed"]),
            str(tp["skipped"]),
            str(tp["studies_per_hour"]),
            _fmt_s(lat.get("p50_seconds")),
            _fmt_s(lat.get("p95_seconds")),
            _fmt_s(lat.get("max_seconds")),
            _fmt_s(lat.get("inference_p50_seconds")),
            _fmt_s(lat.get("inference_p95_seconds")),
        )
        parts.append(hour)

    if data["studies"]:
        st = Table(box=box.SIMPLE, title="recent studies", title_justify="left")
        columns: tuple[tuple[str, JustifyMethod], ...] = (
            ("job", "right"),
            ("gen", "right"),
            ("state", "left"),
            ("route", "left"),
            ("model", "left"),
            ("inst", "right"),
            ("latency", "right"),
            ("findings / error", "left"),
        )
        for col, just in columns:
            st.add_column(col, justify=just, overflow="fold")
        for s in data["studies"]:
            style = {"failed": "red", "done": "green", "skipped": "dim"}.get(s["state"])
            st.add_row(
                str(s["job_id"]),
                str(s.get("generation", "")),
                f"[{style}]{s['state']}[/]" if style else s["state"],
                s["route"] or "-",
                s["model"] or "-",
                str(s["instances"]),
                _fmt_s(s["latency_seconds"]),
                _study_note(s),
            )
        parts.append(st)

    dt = Table(box=box.SIMPLE, title="destinations", title_justify="left")
    for col in ("name", "address", "last success", "backlog", "sent", "failed", "last error"):
        dt.add_column(col, overflow="fold")
    for dst in data["destinations"]:
        dt.add_row(
            dst["name"],
            _dest_address(dst),
            dst.get("last_sent_at") or "never",
            str(dst["pending"]),
            str(dst["sent"]),
            str(dst["failed"]),
            dst["last_error"] or "-",
        )
    parts.append(dt)

    mt = Table(box=box.SIMPLE, title="models", title_justify="left")
    for col in ("name", "version", "task", "device", "loaded"):
        mt.add_column(col)
    for m in data["models"]:
        state = {"ready": "yes", "not loaded": "no"}.get(m.get("state", ""), m.get("state", "no"))
        mt.add_row(
            m["name"],
            m["version"],
            m["task"],
            m["device"] or "-",
            f"{state}: {m['load_error']}" if m.get("load_error") else state,
        )
    parts.append(mt)

    if data.get("recent_failures"):
        ft = Table(box=box.SIMPLE, title="recent failures", title_justify="left")
        for col in ("at", "job", "kind", "reason", "now", "error"):
            ft.add_column(col, overflow="fold")
        for f in data["recent_failures"]:
            ft.add_row(
                f["at"] or "-",
                str(f["job_id"]),
                f["kind"],
                f["reason"],
                f["state"],
                f["error"] or "-",
            )
        parts.append(ft)

    qu = data.get("quarantine") or {}
    if qu.get("count"):
        qt = Table(
            box=box.SIMPLE,
            title=f"quarantine: {qu['count']} refused object(s)",
            title_justify="left",
        )
        for col in ("received", "reason", "status", "from"):
            qt.add_column(col)
        for item in qu["recent"][:5]:
            qt.add_row(
                item["received_at"] or "-",
                item["reason"],
                item["status"],
                f"{item['calling_ae']}@{item['peer']}",
            )
        parts.append(qt)
    disk = data["disk"]
    parts.append(
        Text(f"spool: {disk['spool']} free={disk['free_mb']} MB (floor {disk['min_free_mb']} MB)")
    )
    return Group(*parts)


def _dicomweb_where(receiver: dict[str, Any]) -> str:
    """``", STOW-RS http://host:port/path"`` for a component whose DICOMweb receiver is on
    (the ``dicomweb`` field of its receiver info), else empty."""
    web = receiver.get("dicomweb") or {}
    if not web.get("enabled"):
        return ""
    host = f"[{web['host']}]" if ":" in str(web["host"]) else web["host"]
    path = "" if web.get("path") in (None, "/") else web["path"]
    return f", STOW-RS {'https' if web.get('tls') else 'http'}://{host}:{web['port']}{path}"


def _study_note(s: dict[str, Any]) -> str:
    note = ", ".join(s["positive_findings"]) or ("none" if s["state"] == "done" else "")
    if s["last_error"] and s["state"] not in ("done",):
        note = f"{note} {s['last_error']}".strip()
        if s["next_attempt_at"]:
            note += f" (next attempt {s['next_attempt_at']})"
    return note


def render_text(data: dict[str, Any], health: dict[str, Any] | None = None) -> str:
    """A plain terminal rendering of :func:`collect`'s output."""
    lines = []
    d = data["daemon"]
    state = "UP" if d["up"] else "DOWN"
    age = d.get("heartbeat_age_seconds")
    lines.append(f"dicomai daemon: {state}" + (f" (last heartbeat {age}s ago)" if age else ""))
    for c in d["components"]:
        rec = c.get("receiver")
        where = (
            f" listening {rec['ae_title']}@{rec['host']}:{rec['port']}{_dicomweb_where(rec)}"
            if rec
            else ""
        )
        lines.append(f"  {c['name']} roles={','.join(c.get('roles', []))}{where}")
    if health is not None:
        lines.append("health: " + ("healthy" if health["healthy"] else "UNHEALTHY"))
        for c in health["checks"]:
            mark = (
                "ok"
                if c["ok"]
                else "n/a"
                if c["ok"] is None
                else "FAIL"
                if c["critical"]
                else "warn"
            )
            lines.append(f"  {c['name']:<10} {mark:<4} {c['detail']}")
    lines.append("")
    lines.append(
        "studies by state: "
        + ("  ".join(f"{k}={v}" for k, v in data["counts"].items() if v) or "none")
    )
    tp, lat = data.get("throughput"), data.get("latency")
    if tp and lat:
        lines.append(
            f"last hour: done={tp['done']} failed={tp['failed']} "
            f"skipped={tp['skipped']} latency p50={_fmt_s(lat['p50_seconds'])} "
            f"p95={_fmt_s(lat['p95_seconds'])}"
        )
    lines.append("")
    if data["studies"]:
        lines.append(
            f"{'job':>5} {'state':<9} {'route':<11} {'model':<12} {'inst':>5} "
            f"{'latency':>8}  findings / error"
        )
        for s in data["studies"]:
            lat_s = f"{s['latency_seconds']:.1f}s" if s["latency_seconds"] is not None else "-"
            lines.append(
                f"{s['job_id']:>5} {s['state']:<9} {s['route'] or '-':<11} "
                f"{s['model'] or '-':<12} {s['instances']:>5} {lat_s:>8}  "
                f"{_study_note(s)}"
            )
        lines.append("")
    lines.append("destinations:")
    for dst in data["destinations"]:
        lines.append(
            f"  {dst['name']}: {_dest_address(dst)} "
            f"sent={dst['sent']} pending={dst['pending']} failed={dst['failed']}"
            + (f" last_success={dst['last_sent_at']}" if dst.get("last_sent_at") else "")
            + (f" last_error={dst['last_error']}" if dst["last_error"] else "")
        )
    lines.append("models:")
    for m in data["models"]:
        loaded = f"loaded on {m['device']}" if m["loaded"] else "not loaded"
        lines.append(f"  {m['name']} {m['version']} ({m['task']}) {loaded}")
    if data.get("recent_failures"):
        lines.append("recent failures:")
        for f in data["recent_failures"]:
            lines.append(
                f"  {f['at']} job {f['job_id']} {f['kind']} {f['reason']}"
                + (f": {f['error']}" if f["error"] else "")
            )
    disk = data["disk"]
    lines.append(
        f"spool: {disk['spool']} free={disk['free_mb']} MB (floor {disk['min_free_mb']} MB)"
    )
    q = data.get("quarantine") or {}
    if q.get("count"):
        lines.append(f"quarantine: {q['count']} refused object(s); latest:")
        for item in q["recent"][:5]:
            lines.append(
                f"  {item['received_at']} {item['reason']} {item['status']} "
                f"from {item['calling_ae']}@{item['peer']}"
            )
    return "\n".join(lines)
