"""`dicomai db` (schema migrations) and `dicomai check-config` (the configuration and the files
it names, printed without a secret)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dicomai.config import Settings, default_config_path
from dicomai.ops.cli.common import EXIT_OK, EXIT_RUNTIME, EXIT_STARTUP, mask, settings_from

__all__ = ["cmd_check_config", "cmd_db"]


def cmd_db(args: argparse.Namespace) -> int:
    """Database schema: upgrade to the version this dicomai needs, or show where it is."""
    from dicomai.db import make_engine
    from dicomai.migrations import current_revision, head_revision, upgrade

    settings = settings_from(args)
    settings.general.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    try:
        if args.db_cmd == "upgrade":
            before, after = upgrade(engine)
            print(
                f"database {mask(settings.database_url)}: "
                + (
                    f"upgraded {before or 'empty'} -> {after}"
                    if before != after
                    else f"already at {after}"
                )
            )
            return EXIT_OK
        current, head = current_revision(engine), head_revision()
        print(
            f"database {mask(settings.database_url)}: revision {current or 'none'} "
            f"(this version needs {head})"
        )
        return EXIT_OK if current == head else EXIT_RUNTIME
    finally:
        engine.dispose()


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the configuration and the model files it names."""
    from dicomai.inference.findings import sha256_file

    settings = settings_from(args)
    problems = []
    print(f"config: {Path(args.config) if args.config else default_config_path()} (valid)")
    print(f"  data_dir: {settings.general.data_dir}")
    print(f"  database: {mask(settings.database_url)}")
    print(
        f"  receiver: {settings.receiver.ae_title}@{settings.receiver.host}:"
        f"{settings.receiver.port}"
    )
    _limit_lines(settings)
    problems.extend(_dicomweb_lines(settings))
    for d in settings.destinations:
        problems.extend(_destination_lines(settings, d))
    for r in settings.routes:
        print(
            f"  route {r.name}: {'/'.join(r.modality)} {'/'.join(r.body_part) or '*'} "
            f"-> {r.model} -> {', '.join(r.destinations)}"
        )
    for name, m in settings.models.items():
        path = settings.model_path(name)
        if not path.exists():
            from dicomai.models.reference import REFERENCE_MODELS

            note = (
                "missing (reference model, built on first use)"
                if name in REFERENCE_MODELS
                else "MISSING"
            )
            if name not in REFERENCE_MODELS:
                problems.append(f"model {name}: file {path} missing")
            print(f"  model {name}: {path} {note}")
            continue
        digest = sha256_file(str(path))
        ok = not m.sha256 or m.sha256 == digest
        if not ok:
            problems.append(f"model {name}: sha256 mismatch")
        note = "(MISMATCH)" if not ok else "(pinned, matches)" if m.sha256 else "(not pinned)"
        print(f"  model {name}: {path} sha256={digest} {note}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return EXIT_STARTUP if problems else EXIT_OK


def _destination_lines(settings: Settings, d: Any) -> list[str]:
    """Print a destination (never a secret); return the problems of the files it names."""
    from dicomai.http_auth import file_problem, secret_file_problem

    if d.kind == "dicomweb":
        tls = (
            ""
            if not d.url.startswith("https:")
            else f", CA {settings.resolve(d.ca_file)}"
            if d.ca_file
            else ", TLS verified"
            if d.verify
            else ", TLS NOT VERIFIED"
        )
        auth = f"auth {d.auth}" + (f" as {d.user}" if d.user else "")
        print(f"  destination {d.name}: STOW-RS {d.url} ({auth}{tls}, SR {d.sr_sop_class})")
    else:
        print(f"  destination {d.name}: {d.ae_title}@{d.host}:{d.port} (SR {d.sr_sop_class})")
    problems = []
    for key, path, secret in d.files():
        problem = (secret_file_problem if secret else file_problem)(settings.resolve(path))
        if problem:
            problems.append(f"destination {d.name}: {key}: {problem}")
    return problems


def _dicomweb_lines(settings: Settings) -> list[str]:
    """Print the STOW-RS receiver ([dicomweb]; never a secret); when it is enabled, return the
    problems of the files it names (password or token file, TLS certificate and key)."""
    from dicomai.http_auth import secret_file_problem

    w = settings.dicomweb
    if not w.enabled:
        print("  dicomweb: disabled")
        return []
    scheme = "https" if w.tls_cert_file else "http"
    auth = f"auth {w.auth}" + (f" as {w.user}" if w.user else "")
    peers = ", ".join(w.allowed_peer_addresses) or "any address"
    print(
        f"  dicomweb: STOW-RS {scheme}://{w.host}:{w.port}{w.path}/studies ({auth}, from {peers})"
    )
    problems = []
    for key, path, secret in (
        ("password_file", w.password_file, True),
        ("token_file", w.token_file, True),
        ("tls_cert_file", w.tls_cert_file, False),
        ("tls_key_file", w.tls_key_file, False),
    ):
        if path is None:
            continue
        full = settings.resolve(path)
        problem = (
            secret_file_problem(full)
            if secret
            else (None if full.is_file() else f"{full} does not exist or is not a file")
        )
        if problem:
            problems.append(f"dicomweb: {key}: {problem}")
    return problems


def _limit_lines(settings: Settings) -> None:
    """Print what one received data set may cost ([receiver] limits, refused beyond) and how
    images are decoded ([worker] decode_*); warn when a frame the receiver accepts cannot be
    decoded within a decode process's memory (its job would fail)."""
    r, w = settings.receiver, settings.worker
    print(
        f"  file limits: inflated {r.max_inflated_mb} MiB, {r.max_elements} elements, "
        f"nesting {r.max_nesting_depth}, frame {r.max_frame_megapixels} Mpixel, "
        f"pixel data {r.max_pixel_data_mb} MiB"
    )
    if not w.decode_processes:
        print("  decoding: in the worker thread, without memory or time limits")
        return
    print(
        f"  decoding: {w.decode_processes} process(es), {w.decode_memory_mb} MiB and "
        f"{w.decode_timeout_seconds:g} s per image"
    )
    # A 16-bit frame decoded, then as float32 for preprocessing: 6 bytes a pixel at least.
    frame_mb = r.max_frame_megapixels * 1_000_000 * 6 // (1024 * 1024)
    if frame_mb > w.decode_memory_mb:
        print(
            f"warning: a frame of max_frame_megapixels ({r.max_frame_megapixels} Mpixel) "
            f"needs about {frame_mb} MiB to decode, more than decode_memory_mb: such "
            "images are received but their jobs fail",
            file=sys.stderr,
        )
