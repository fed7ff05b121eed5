"""`dicomai demo`: the daemon and a local PACS on loopback, sample studies in, results printed."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pydicom

from dicomai.config import (
    DestinationSettings,
    GeneralSettings,
    LoggingSettings,
    ModelSettings,
    ReceiverSettings,
    SchedulerSettings,
    Settings,
)
from dicomai.jobs.states import TERMINAL_STATES, JobState
from dicomai.ops.scu import send_files
from dicomai.ops.status import collect
from dicomai.runtime.daemon import Daemon
from dicomai_tools.local_pacs import LocalPacs
from dicomai_tools.samples import demo_studies

__all__ = ["demo_settings", "run_demo"]

_DEMO_QUIET_SECONDS = 2.0


def demo_settings(base: Settings, data_dir: Path, pacs_port: int) -> Settings:
    """``base`` on a fresh data dir, free receiver port, and the local PACS as destination.

    Model files keep their configured location so reference models are built only once.
    """
    models = {
        name: ModelSettings.model_validate({**m.model_dump(), "path": base.model_path(name)})
        for name, m in base.models.items()
    }
    dests = [
        DestinationSettings.model_validate(
            {**d.model_dump(), "host": "127.0.0.1", "port": pacs_port, "ae_title": "PACS"}
        )
        for d in base.destinations
    ]
    return base.model_copy(
        update={
            "general": GeneralSettings(data_dir=data_dir, site_name=base.general.site_name),
            "database": base.database.model_copy(update={"url": ""}),
            "receiver": ReceiverSettings.model_validate(
                {
                    **base.receiver.model_dump(),
                    "host": "127.0.0.1",
                    "port": 0,
                    "allowed_calling_ae_titles": [],
                    "min_free_disk_mb": 0,
                }
            ),
            "scheduler": SchedulerSettings.model_validate(
                {
                    **base.scheduler.model_dump(),
                    "study_quiet_seconds": _DEMO_QUIET_SECONDS,
                    "poll_seconds": 0.5,
                }
            ),
            "logging": LoggingSettings(level="WARNING", format="text"),
            "models": models,
            "destinations": dests,
        }
    )


def run_demo(
    base: Settings, *, keep: bool = False, timeout: float = 600.0, verbose: bool = False
) -> int:
    """Run the demo; returns 0 when every routed sample came back as SR + SC."""
    from dicomai.logs import configure

    configure("INFO" if verbose else "WARNING", "text")
    data_dir = Path(tempfile.mkdtemp(prefix="dicomai-demo-"))
    print(f"dicomai demo: data directory {data_dir}")
    print(
        "Models are UNTRAINED REFERENCE MODELS: their findings are meaningless and NOT FOR "
        "DIAGNOSTIC USE."
    )
    pacs = LocalPacs(ae_title="PACS").start()
    daemon: Daemon | None = None
    try:
        settings = demo_settings(base, data_dir, pacs.port)
        missing = [n for n in settings.models if not settings.model_path(n).exists()]
        if missing:
            print(f"building reference models on first use: {', '.join(missing)} ...")
        daemon = Daemon(settings)
        stop = threading.Event()
        daemon.start()
        assert daemon.receiver is not None
        port = daemon.receiver.port
        print(
            f"daemon listening as {settings.receiver.ae_title}@127.0.0.1:{port}; "
            f"local PACS as PACS@127.0.0.1:{pacs.port}; quiet period "
            f"{_DEMO_QUIET_SECONDS:.0f}s"
        )
        studies = demo_studies(
            data_dir / "samples", uid_seed=uuid.uuid4().hex, include_unroutable=True
        )
        sent_at: dict[str, float] = {}
        kinds: dict[str, tuple[str, str]] = {}
        for study in studies:
            uid = str(pydicom.dcmread(study.files[0], stop_before_pixels=True).StudyInstanceUID)
            result = send_files(
                study.files,
                "127.0.0.1",
                port,
                called_ae=settings.receiver.ae_title,
                calling_ae="DEMO-SCU",
            )
            sent_at[uid] = time.monotonic()
            kinds[uid] = (study.kind, study.description)
            print(
                f"  sent {study.kind:<11} {len(study.files):>3} instance(s): "
                f"{'ok' if result.ok else 'FAILED'}"
            )
            if not result.ok:
                return 1
        deadline = time.monotonic() + timeout
        done_at: dict[str, float] = {}
        while time.monotonic() < deadline:
            data = collect(settings, limit=100, engine=daemon.engine)
            states = {s["study_instance_uid"]: s for s in data["studies"]}
            for uid in sent_at:
                if uid in states and JobState(states[uid]["state"]) in TERMINAL_STATES:
                    done_at.setdefault(uid, time.monotonic())
            if len(done_at) == len(sent_at):
                break
            stop.wait(0.5)
        data = collect(settings, limit=100, engine=daemon.engine)
        return _report(data, kinds, sent_at, done_at, pacs)
    finally:
        if daemon is not None:
            daemon.stop(10)
        pacs.stop()
        logging.shutdown()
        if keep:
            print(f"kept {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


def _report(
    data: dict,
    kinds: dict[str, tuple[str, str]],
    sent_at: dict[str, float],
    done_at: dict[str, float],
    pacs: LocalPacs,
) -> int:
    by_uid = {s["study_instance_uid"]: s for s in data["studies"]}
    print()
    print(
        f"{'study':<12} {'kind':<11} {'state':<8} {'route':<10} {'SR':>2} {'SC':>2} "
        f"{'seconds':>7}  findings (score >= threshold; untrained model)"
    )
    ok = True
    for uid, (kind, _desc) in kinds.items():
        s = by_uid.get(uid, {})
        objs = pacs.objects(uid)
        n_sr = sum(1 for o in objs if o.modality == "SR")
        n_sc = sum(1 for o in objs if o.modality == "OT")
        secs = done_at[uid] - sent_at[uid] if uid in done_at else float("nan")
        scores = s.get("scores") or {}
        positive = s.get("positive_findings") or []
        if positive:
            findings = ", ".join(f"{lab} {scores.get(lab, 0):.2f}" for lab in positive[:4])
        elif scores:
            top = max(scores, key=lambda k: scores[k])
            findings = f"none (top: {top} {scores[top]:.2f})"
        else:
            findings = "-"
        state = s.get("state", "missing")
        print(
            f"{uid[-12:]:<12} {kind:<11} {state:<8} {s.get('route') or '-':<10} "
            f"{n_sr:>2} {n_sc:>2} {secs:>7.1f}  {findings}"
        )
        if kind == "unroutable":
            ok &= state == "skipped"
        else:
            ok &= state == "done" and n_sr >= 1 and n_sc >= 1
    print()
    print(
        "demo "
        + (
            "succeeded: every routed study came back as SR + SC in its own study"
            if ok
            else "FAILED: see the table above (dicomai demo --verbose)"
        )
    )
    sys.stdout.flush()
    return 0 if ok else 1
