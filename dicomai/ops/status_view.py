"""Drawing `dicomai status` for a terminal: rich panels and tables, or plain text (``--plain``,
``--watch`` into a file). Input: :func:`dicomai.ops.status.collect`'s dict and
:func:`dicomai.ops.health.check_health`'s result.
"""

from __future__ import annotations

from typing import Any

from dicomai.jobs.states import ACTIVE_STATES, JobState
from dicomai.ops.study_rows import study_note

__all__ = ["render_rich", "render_text"]


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


def _dest_address(dst: dict[str, Any]) -> str:
    """How status shows where a destination is."""
    if dst.get("kind") == "dicomweb":
        return f"STOW-RS {dst['url']}"
    return f"{dst['ae_title']}@{dst['host']}:{dst['port']}"


def render_rich(data: dict[str, Any], health: dict[str, Any] | None = None) -> Any:
    """A rich renderable (panels and tables) of the status data (+ the health checks)."""
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
            JobState.DONE.value,
            JobState.FAILED.value,
            JobState.SKIPPED.value,
            "studies/h",
            "latency p50",
            "latency p95",
            "max",
            "inference p50",
            "inference p95",
        ):
            hour.add_column(col, justify="right")
        hour.add_row(
            str(tp[JobState.DONE]),
            str(tp[JobState.FAILED]),
            str(tp[JobState.SKIPPED]),
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
            style = {JobState.FAILED: "red", JobState.DONE: "green", JobState.SKIPPED: "dim"}.get(
                s["state"]
            )
            st.add_row(
                str(s["job_id"]),
                str(s.get("generation", "")),
                f"[{style}]{s['state']}[/]" if style else s["state"],
                s["route"] or "-",
                s["model"] or "-",
                str(s["instances"]),
                _fmt_s(s["latency_seconds"]),
                study_note(s),
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


def render_text(data: dict[str, Any], health: dict[str, Any] | None = None) -> str:
    """A plain terminal rendering of the status data (+ the health checks)."""
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
            f"last hour: done={tp[JobState.DONE]} failed={tp[JobState.FAILED]} "
            f"skipped={tp[JobState.SKIPPED]} latency p50={_fmt_s(lat['p50_seconds'])} "
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
                f"{study_note(s)}"
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
