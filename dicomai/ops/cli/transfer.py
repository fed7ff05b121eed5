"""`dicomai echo` (C-ECHO, or QIDO-RS for a DICOMweb destination) and `dicomai send`
(C-STORE files and folders)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicomai.config import Settings
from dicomai.ops.cli.common import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, make_console, settings_from

__all__ = ["cmd_echo", "cmd_send", "parse_target"]


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a configured destination by name."""
    from dicomai.ops.scu import echo

    settings = settings_from(args)
    try:
        dest = settings.destination(args.destination)
    except KeyError:
        names = ", ".join(d.name for d in settings.destinations) or "none configured"
        print(
            f"dicomai echo: no destination named {args.destination!r} (known: {names})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if dest.kind == "dicomweb":
        return _echo_dicomweb(settings, dest, args.timeout)
    where = (
        f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}, calling AE "
        f"{settings.sender.ae_title})"
    )
    t0 = time.perf_counter()
    try:
        status = echo(
            dest.host,
            int(dest.port or 0),
            called_ae=dest.ae_title,
            calling_ae=settings.sender.ae_title,
            timeout=args.timeout,
        )
    except Exception as exc:  # name resolution and socket errors come in several types
        print(f"{where}: C-ECHO failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    ms = (time.perf_counter() - t0) * 1000
    if status == 0:
        print(f"{where}: C-ECHO success in {ms:.0f} ms")
        return EXIT_OK
    if status is None:
        print(
            f"{where}: C-ECHO failed: no association (connection refused, association "
            f"rejected or no answer within {args.timeout:g} s)",
            file=sys.stderr,
        )
    else:
        print(f"{where}: C-ECHO answered status 0x{status:04X}", file=sys.stderr)
    return EXIT_RUNTIME


def _echo_dicomweb(settings: Settings, dest: Any, timeout: float) -> int:
    """The DICOMweb counterpart of C-ECHO: a QIDO-RS search for one study, with the
    destination's credentials and TLS settings."""
    import dataclasses

    from dicomai.delivery.sender import stow_target
    from dicomai.delivery.stow_client import probe

    target = dataclasses.replace(stow_target(dest, settings), timeout=timeout)
    where = f"{dest.name} (DICOMweb {dest.url}, auth {dest.auth})"
    t0 = time.perf_counter()
    status, error = probe(target)
    ms = (time.perf_counter() - t0) * 1000
    if error is None:
        print(f"{where}: QIDO-RS answered HTTP {status} in {ms:.0f} ms")
        return EXIT_OK
    print(f"{where}: QIDO-RS failed: {error}", file=sys.stderr)
    return EXIT_RUNTIME


_TARGET = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>\[[^\]]+\]|[^:@\[\]]+):(?P<port>\d{1,5})$")
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def parse_target(text: str) -> tuple[str, str, int]:
    """``AE@host:port`` (``AE@[v6]:port``) → (ae, host, port); ValueError otherwise."""
    m = _TARGET.match(text.strip())
    if not m or not 1 <= int(m.group("port")) <= 65535 or not m.group("ae").strip():
        raise ValueError(f"--to {text!r}: expected AE@host:port, e.g. DICOMAI@127.0.0.1:11112")
    return m.group("ae").strip(), m.group("host").strip("[]"), int(m.group("port"))


def _dicom_files(
    paths: Sequence[str],
) -> tuple[list[tuple[Path, str, str]], list[tuple[Path, str]], int]:
    """(sendable (path, sop class, syntax), failures (path, why), skipped in folders)."""
    import pydicom

    found: list[tuple[Path, bool]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(
                (f, False)
                for f in sorted(p.rglob("*"))
                if f.is_file() and not f.name.startswith(".")
            )
        else:
            found.append((p, True))
    ok: list[tuple[Path, str, str]] = []
    failed: list[tuple[Path, str]] = []
    skipped = 0
    for path, explicit in found:
        try:
            meta = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID"]
            ).file_meta
            sop_class = str(meta.MediaStorageSOPClassUID)
            syntax = str(meta.TransferSyntaxUID)
        except Exception:  # not DICOM, or no file meta
            if explicit:
                failed.append((path, "not a DICOM file (Part 10 with file meta)"))
            else:
                skipped += 1
            continue
        if sop_class == _DICOMDIR_CLASS:
            skipped += 1
            continue
        ok.append((path, sop_class, syntax))
    return ok, failed, skipped


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files and folders to the local receiver (or ``--to AE@host:port``)."""
    from pynetdicom import AE
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"dicomai send: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if args.to:
        try:
            called, host, port = parse_target(args.to)
        except ValueError as exc:
            print(f"dicomai send: {exc}", file=sys.stderr)
            return EXIT_USAGE
    else:
        r = settings_from(args).receiver
        called, host, port = (
            r.ae_title,
            {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(r.host, r.host),
            r.port,
        )
        if port == 0:
            print(
                "dicomai send: the configured receiver port is 0 (any free port); "
                "give --to AE@host:port",
                file=sys.stderr,
            )
            return EXIT_USAGE
    files, failures, skipped = _dicom_files(args.paths)
    target = f"{called}@{host}:{port}"
    if not files and not failures:
        print(f"dicomai send: no DICOM files found in {' '.join(args.paths)}", file=sys.stderr)
        return EXIT_RUNTIME
    # One association per batch of at most 128 presentation contexts, in file order.
    batches: list[list[tuple[Path, str, str]]] = []
    contexts: set[tuple[str, str]] = set()
    for item in files:
        pair = (item[1], item[2])
        if not batches or (pair not in contexts and len(contexts) >= 128):
            batches.append([])
            contexts = set()
        contexts.add(pair)
        batches[-1].append(item)
    sent = 0
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=make_console(stderr=True),
        transient=False,
    )
    with progress:
        task = progress.add_task(f"C-STORE to {target}", total=len(files))
        for batch in batches:
            ae = AE(ae_title=args.calling_ae)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
            for pair in sorted({(b[1], b[2]) for b in batch}):
                ae.add_requested_context(*pair)
            try:
                assoc = ae.associate(host, port, ae_title=called)
                if not assoc.is_established:
                    why = (
                        "association rejected"
                        if assoc.is_rejected
                        else "no association (refused, aborted or timed out)"
                    )
                    failures.extend((b[0], why) for b in batch)
                    progress.advance(task, len(batch))
                    continue
                for path, _, _ in batch:
                    try:
                        rsp = assoc.send_c_store(path)
                        status = int(rsp.Status) if rsp and "Status" in rsp else None
                    except Exception as exc:  # no accepted context, lost association, ...
                        failures.append((path, f"{type(exc).__name__}: {exc}"[:200]))
                        progress.advance(task)
                        continue
                    if status is not None and (status == 0 or status & 0xF000 == 0xB000):
                        sent += 1
                    else:
                        failures.append(
                            (path, "no response" if status is None else f"status 0x{status:04X}")
                        )
                    progress.advance(task)
                if assoc.is_established:
                    assoc.release()
            except Exception as exc:  # name resolution, socket errors
                failures.extend((b[0], f"{type(exc).__name__}: {exc}"[:200]) for b in batch)
            finally:
                ae.shutdown()
    total = len(files) + sum(1 for f in failures if f[1].startswith("not a DICOM"))
    note = f" ({skipped} non-DICOM file(s) skipped)" if skipped else ""
    print(f"sent {sent}/{total} file(s) to {target}{note}")
    for path, why in failures:
        print(f"FAILED {path}: {why}", file=sys.stderr)
    return EXIT_RUNTIME if failures else EXIT_OK
