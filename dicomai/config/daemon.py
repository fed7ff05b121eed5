"""The daemon's own sections: [general], [database], [spool], [scheduler], [worker],
[sender], [logging], [metrics], [audit]."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from dicomai.config.base import Section, check_ae, check_device


class GeneralSettings(Section):
    """Where dicomai keeps its state; relative paths elsewhere resolve against ``data_dir``."""

    data_dir: Path = Path("../var")
    site_name: str = "dicomai"


class DatabaseSettings(Section):
    """Where job state lives: SQLite for one host, PostgreSQL for several."""

    url: str = ""  # empty: sqlite file dicomai.db under general.data_dir
    busy_timeout_seconds: float = Field(default=10.0, gt=0)  # wait for a locked database
    echo: bool = False


class SpoolSettings(Section):
    """Where received instances and built results are stored on disk."""

    path: Path = Path("spool")
    retention_days: float = Field(default=7.0, gt=0)


class SchedulerSettings(Section):
    """Periodic jobs: closing quiet studies, reaping stale claims, retention."""

    study_quiet_seconds: float = Field(default=30.0, ge=0)
    #: Close a study before its quiet period when the sender released its association
    #: (after ``release_grace_seconds``) or when every announced image is there (after
    #: ``complete_quiet_seconds``). Late instances still open a new generation.
    early_close: bool = True
    release_grace_seconds: float = Field(default=2.0, ge=0)
    complete_quiet_seconds: float = Field(default=1.0, ge=0)
    #: A study of a single image of these modalities (one-view X-ray) closes as soon as its
    #: association is released, without ``release_grace_seconds``.
    single_image_modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    poll_seconds: float = Field(default=1.0, gt=0)
    stale_claim_seconds: float = Field(default=300.0, gt=0)
    purge_interval_seconds: float = Field(default=3600.0, gt=0)


class WorkerSettings(Section):
    """The inference worker."""

    threads: int = Field(default=1, ge=1, le=16)
    poll_seconds: float = Field(default=0.5, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_base_seconds: float = Field(default=10.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    torch_threads: int = Field(default=0, ge=0)  # 0: torch's default
    models: list[str] = Field(default_factory=list)  # models this worker serves; empty = all
    device: str = ""  # overrides every model's device on this worker, e.g. "cuda:1"
    batch_size: int = Field(default=0, ge=0)  # overrides the models' batch size; 0 = theirs
    #: Cross-study batching: concurrent jobs (``threads`` > 1) of one model share model calls
    #: of up to this many images; 0 = off (each job runs its own batches).
    max_batch: int = Field(default=0, ge=0, le=1024)
    #: How long a request may wait for other jobs' requests to join it (only while another
    #: job of the same model is running).
    batch_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    #: Processes that read, decode and preprocess a job's images (dicomai.inference.prepare):
    #: a decode
    #: that passes its memory or time budget fails its job, not the daemon; 0 = in the worker
    #: thread, without those budgets.
    decode_processes: int = Field(default=1, ge=0, le=64)
    #: Memory one decode process may take for decoding and preprocessing, in MiB, beyond what
    #: it holds once started (its libraries): its data segment is limited to that
    #: (RLIMIT_DATA); a decode that needs more fails its job.
    decode_memory_mb: int = Field(default=4096, ge=64, le=1_048_576)
    #: Seconds one image may take to read, decode and preprocess; beyond it the decode
    #: process is replaced and the job fails (and is retried).
    decode_timeout_seconds: float = Field(default=120.0, gt=0, le=86_400)
    #: A model that failed to load is tried again after this many seconds (doubling, at most
    #: 10 minutes); its studies stay queued meanwhile.
    model_retry_seconds: float = Field(default=30.0, gt=0)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value) if value else value


class SenderSettings(Section):
    """The C-STORE SCU returning results to destinations."""

    threads: int = Field(default=4, ge=1, le=64)
    poll_seconds: float = Field(default=0.5, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    retry_base_seconds: float = Field(default=15.0, gt=0)
    retry_max_seconds: float = Field(default=1800.0, gt=0)
    timeout_seconds: float = Field(default=30.0, gt=0)
    ae_title: str = "DICOMAI"

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae(value, "sender.ae_title")


class LoggingSettings(Section):
    """Log format and level."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"  # auto: JSON under systemd, text on a tty
    file: Path | None = None
    levels: dict[str, Literal["DEBUG", "INFO", "WARNING", "ERROR"]] = Field(
        default_factory=dict
    )  # per component, e.g. {"dicomai.ingest" = "DEBUG"}


class MetricsSettings(Section):
    """Prometheus endpoint."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)


class AuditSettings(Section):
    """Audit trail (DICOM PS3.15 / IHE ATNA style JSON lines)."""

    file: Path | None = Path("audit.log")  # relative to data_dir; empty string disables
    syslog: bool = False
    syslog_address: str = "/dev/log"
