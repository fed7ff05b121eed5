"""Health of a dicomai installation over `dicomai status`'s data: heartbeat, database, disk, and
live probes of the receivers the heartbeats report (C-ECHO, and a TCP connect to STOW-RS).

:func:`check_health` is what ``dicomai status --check`` exits on.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from dicomai.config import Settings
from dicomai.ops.status import HEARTBEAT_STALE_SECONDS
from dicomai.runtime.roles import ROLES

__all__ = ["check_health", "probe_receiver"]


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
    """Health checks over :func:`dicomai.ops.status.collect`'s output; C-ECHO to the receiver
    when ``probe``.

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
