"""The argument parser: every subcommand, its options and help, and the function it runs."""

from __future__ import annotations

import argparse

from dicomai import __version__
from dicomai.jobs.states import JobState
from dicomai.ops.cli.config_db import cmd_check_config, cmd_db
from dicomai.ops.cli.jobs import cmd_cancel, cmd_retry
from dicomai.ops.cli.maintenance import cmd_demo, cmd_purge
from dicomai.ops.cli.models import cmd_models
from dicomai.ops.cli.serve_status import cmd_serve, cmd_status
from dicomai.ops.cli.studies import cmd_studies
from dicomai.ops.cli.transfer import cmd_echo, cmd_send

__all__ = ["build_parser"]

#: The program description `dicomai --help` prints.
DESCRIPTION = "Command line: argparse subcommands, each one function returning an exit code."


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="dicomai", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"dicomai {__version__}")
    p.add_argument("--config", help="config file (default $DICOMAI_CONFIG or config/dicomai.toml)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--only", help="comma-separated roles: receiver,worker,sender,scheduler")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("status", help="daemon health, queue, throughput and recent studies")
    s.add_argument("--json", action="store_true", help="one JSON object for scripts")
    s.add_argument("--plain", action="store_true", help="plain text instead of tables")
    s.add_argument("--limit", type=int, default=20, help="recent studies to list")
    s.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when unhealthy: heartbeat stale, receiver not answering "
        "C-ECHO, database unreachable or free disk below the floor",
    )
    s.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )
    s.add_argument(
        "--iterations",
        type=int,
        default=0,
        metavar="N",
        help="with --watch: stop after N refreshes (0 = until Ctrl-C)",
    )
    s.add_argument(
        "--probe-timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="timeout of the receiver probe (C-ECHO)",
    )
    s.add_argument(
        "--probe-ae",
        metavar="AE",
        help="calling AE title of the receiver probe (default [sender] ae_title)",
    )
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("retry", help="retry failed jobs (re-send results or re-analyse)")
    s.add_argument("--job", type=int, action="append", help="job id (repeatable)")
    s.add_argument("--study", action="append", help="StudyInstanceUID (its latest generation)")
    s.add_argument("--all-failed", action="store_true", help="every failed job")
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser("cancel", help="cancel queued, outbox or failed jobs")
    s.add_argument("--job", type=int, action="append", help="job id (repeatable)")
    s.add_argument("--study", action="append", help="StudyInstanceUID (its latest generation)")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser(
        "studies",
        help="list studies; `studies show UID`: jobs and timeline",
        description="List studies (latest generation, newest first), or show "
        "one study's series, jobs, result objects and timeline.",
    )
    s.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in JobState],
        help="only this state (repeatable)",
    )
    s.add_argument("--route", action="append", help="only this route (repeatable)")
    s.add_argument(
        "--since",
        help="received since: a duration (90m, 2h, 7d) or an ISO "
        "date/time (local time unless it has an offset)",
    )
    s.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    s.add_argument(
        "--all-generations",
        action="store_true",
        help="every generation, not only each study's latest",
    )
    s.add_argument("--json", action="store_true")
    ssub = s.add_subparsers(dest="studies_cmd", metavar="{show}")
    m = ssub.add_parser("show", help="one study: series, jobs, result objects, timeline")
    m.add_argument("uid", help="StudyInstanceUID")
    m.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_studies)

    s = sub.add_parser(
        "echo",
        help="C-ECHO a configured destination, a QIDO-RS search for a "
        "DICOMweb one (exit 1 if it fails)",
    )
    s.add_argument("destination", help="a [[destinations]] name, e.g. pacs")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    s.set_defaults(func=cmd_echo)

    s = sub.add_parser("send", help="C-STORE DICOM files/folders to the receiver or --to")
    s.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")
    s.add_argument(
        "--to", metavar="AE@HOST:PORT", help="destination (default: this configuration's receiver)"
    )
    s.add_argument("--calling-ae", default="DICOMAI-SCU", help="our AE title (DICOMAI-SCU)")
    s.add_argument("--timeout", type=float, default=30.0, help="network timeout, seconds")
    s.set_defaults(func=cmd_send)

    s = sub.add_parser("purge", help="delete spool files of studies finished long ago")
    s.add_argument(
        "--older-than-days",
        type=float,
        default=None,
        metavar="N",
        help="finished more than N days ago (default [spool] retention_days)",
    )
    s.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    s.set_defaults(func=cmd_purge)

    s = sub.add_parser("db", help="database schema migrations")
    dsub = s.add_subparsers(dest="db_cmd", required=True)
    dsub.add_parser("upgrade", help="migrate the schema to this version (also done by serve)")
    dsub.add_parser("current", help="show the schema revision; exit 1 if not current")
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("check-config", help="validate the configuration and model files")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("demo", help="run sample studies through a local daemon and PACS")
    s.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for results")
    s.add_argument("--verbose", action="store_true", help="show the daemon's logs")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("models", help="list, verify, build or export models")
    msub = s.add_subparsers(dest="models_cmd", required=True)
    m = msub.add_parser("list", help="configured models and their files")
    m.add_argument("--json", action="store_true")
    m = msub.add_parser("verify", help="load each model and check its sha256")
    m.add_argument("--json", action="store_true")
    m = msub.add_parser("build-reference", help="(re)build the untrained reference models")
    m.add_argument("names", nargs="*", help="model names (default: all reference models)")
    m = msub.add_parser("export", help="TorchScript file from a state dict (your weights)")
    m.add_argument(
        "--architecture", required=True, choices=["densenet121", "resnet18", "densenet169"]
    )
    m.add_argument("--state-dict", required=True, help="PyTorch state dict (.pth/.pt)")
    m.add_argument("--out", required=True, help="output TorchScript file")
    m.add_argument("--name", required=True)
    m.add_argument("--version", required=True)
    m.add_argument("--labels", help="comma-separated labels (default: the architecture's)")
    m.add_argument(
        "--description", required=True, help="what these weights are (shown in every result object)"
    )
    m = msub.add_parser(
        "evaluate",
        help="AUROC, sensitivity, specificity of a model on a labelled set",
        description="Run a configured model on the studies under DIRECTORY (DICOM files, any "
        "layout) and compare with LABELS: a CSV with study_instance_uid,label,"
        "value (0/1) rows, or a study_instance_uid column and one 0/1 column per "
        "label. Reports per-label AUROC, sensitivity and specificity at the "
        "configured thresholds with bootstrap 95% confidence intervals.",
    )
    m.add_argument("directory", help="folder with the studies' DICOM files")
    m.add_argument("--model", required=True, help="a configured model name")
    m.add_argument("--labels", required=True, help="labels CSV")
    m.add_argument(
        "--suggest-thresholds",
        action="store_true",
        help="suggest per-label thresholds reaching --target-sensitivity",
    )
    m.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.9,
        help="sensitivity the suggested thresholds reach (default 0.9)",
    )
    m.add_argument(
        "--subgroups",
        action="store_true",
        help="figures per PatientSex, age band, Manufacturer and ViewPosition",
    )
    m.add_argument("--html", metavar="PATH", help="write an HTML report with ROC curves")
    m.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    m.add_argument("--scores-csv", metavar="PATH", help="write per-study scores")
    m.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for the 95%% CIs (default 1000; 0: none)",
    )
    m.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    m.add_argument("--device", help="override the model's device (auto, cpu, cuda, cuda:N)")
    s.set_defaults(func=cmd_models)
    return p
