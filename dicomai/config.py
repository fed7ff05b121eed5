"""Settings models and load_settings(): reading the TOML file is this module's only I/O."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicomai.errors import ConfigError
from dicomai.http_auth import check_auth_fields

__all__ = [
    "DEFAULT_CONFIG",
    "AuditSettings",
    "DatabaseSettings",
    "DestinationSettings",
    "DicomWebSettings",
    "GeneralSettings",
    "LoggingSettings",
    "MetricsSettings",
    "ModelSettings",
    "PreprocessingSettings",
    "ReceiverSettings",
    "RouteSettings",
    "SchedulerSettings",
    "SenderSettings",
    "Settings",
    "SpoolSettings",
    "WorkerSettings",
    "default_config_path",
    "load_settings",
]

#: The shipped default configuration, relative to the repository / working directory.
DEFAULT_CONFIG = Path("config/dicomai.toml")
_ENV_PREFIX = "DICOMAI_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


def _check_ae(value: str, what: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"{what} must be 1-16 printable characters without backslash")
    return value.strip()


def _check_networks(value: list[str]) -> list[str]:
    """An allow-list of IP addresses and CIDR networks, each checked."""
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise ValueError(f"not an IP address or network: {item!r}") from exc
    return value


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError("device must be auto, cpu, cuda or cuda:N")
    return value


class GeneralSettings(_Section):
    """Where dicomai keeps its state; relative paths elsewhere resolve against ``data_dir``."""

    data_dir: Path = Path("../var")
    site_name: str = "dicomai"


class ReceiverSettings(_Section):
    """The DICOM Storage SCP the PACS forwards studies to."""

    ae_title: str = "DICOMAI"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    max_associations: int = Field(default=16, ge=1)
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    min_free_disk_mb: int = Field(default=512, ge=0)
    allowed_peer_addresses: list[str] = Field(default_factory=list)  # IPs/CIDRs; empty = any
    tls_cert_file: Path | None = None  # set with tls_key_file: the port speaks DICOM TLS only
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None  # CA bundle to verify client certificates
    tls_require_client_cert: bool = False
    #: Serve C-STORE PDUs without pynetdicom's DIMSE layer (dicomai.ingest.fast_store); false keeps
    #: every message on pynetdicom's own path.
    fast_store: bool = True
    #: Maximum Length Received announced in the A-ASSOCIATE-AC (bytes): the largest P-DATA-TF
    #: PDU a peer may send. PS3.8 D.1 makes it a 32-bit unsigned value where 0 means "no
    #: maximum"; 0 is not allowed here, and nor is less than 4 KiB (per-PDU overhead; DCMTK
    #: accepts no less either). 256 KiB keeps PDUs few per instance.
    max_pdu_length: int = Field(default=262144, ge=4096, le=2**32 - 1)
    #: Limits one received data set is held to (dicomai.ingest.file_limits); beyond one
    #: it is refused (0xC220; a codestream whose size differs from Rows/Columns: 0xA900)
    #: and quarantined. The defaults leave room for a 14-bit 4300 x 3500 mammogram, a
    #: 3000-frame enhanced CT of 512 x 512 and large SR/RTSTRUCT objects.
    #: MiB a Deflated Explicit VR Little Endian data set may inflate to.
    max_inflated_mb: int = Field(default=512, ge=1, le=1_048_576)
    #: Elements, items and fragments of one data set, nested ones included.
    max_elements: int = Field(default=250_000, ge=1000, le=100_000_000)
    #: Sequences nested within each other (pydicom's parser stops near 200).
    max_nesting_depth: int = Field(default=32, ge=1, le=128)
    #: Rows x Columns x samples of one frame, in millions of pixels.
    max_frame_megapixels: int = Field(default=100, ge=1, le=10_000)
    #: MiB of decoded pixel data of one instance (Rows x Columns x frames x samples x
    #: BitsAllocated / 8).
    max_pixel_data_mb: int = Field(default=4096, ge=1, le=1_048_576)
    #: Retired (2026-12): several receiver processes measured no gain (bench/results/
    #: ingest-2026-12-03-processes.json) and were removed. Still accepted so existing
    #: configuration files load; a value other than 1 is logged as ignored at start.
    processes: int = Field(default=1, ge=1, le=64)
    #: Pending connections the kernel queues before we accept them (listen(2) backlog).
    listen_backlog: int = Field(default=512, ge=1, le=65535)
    #: Connections that have not sent a complete A-ASSOCIATE-RQ yet, in total and per peer
    #: address (dicomai.ingest.lobby): the oldest is dropped to make room for a new one.
    #: They are dropped after acse_timeout_seconds and never count against max_associations.
    max_pending_connections: int = Field(default=256, ge=1, le=100_000)
    max_pending_per_address: int = Field(default=64, ge=1, le=100_000)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value, "receiver.ae_title")

    @field_validator("allowed_peer_addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return _check_networks(value)

    @model_validator(mode="after")
    def _tls(self) -> ReceiverSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_require_client_cert and self.tls_ca_file is None:
            raise ValueError("tls_require_client_cert needs tls_ca_file")
        return self

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _allowed(cls, value: list[str]) -> list[str]:
        return [_check_ae(v, "receiver.allowed_calling_ae_titles entry") for v in value]


class DicomWebSettings(_Section):
    """The DICOMweb STOW-RS receiver (HTTP), beside the DIMSE one; off by default.

    ``POST {path}/studies`` and ``POST {path}/studies/{study}`` store each instance of a
    ``multipart/related; type="application/dicom"`` body as a C-STORE would
    (dicomai.ingest.stow_server). Relative file paths resolve against ``general.data_dir``.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: Service root, e.g. "/dicomweb": the routes are {path}/studies[/{study}]; "" = "/".
    path: str = "/dicomweb"
    #: How callers authenticate: none, basic (user and the password in password_file) or
    #: bearer (the token in token_file). The files are read again when they change.
    auth: Literal["none", "basic", "bearer"] = "none"
    user: str = ""
    password_file: Path | None = None
    token_file: Path | None = None
    #: Set both to serve HTTPS only.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    allowed_peer_addresses: list[str] = Field(default_factory=list)  # IPs/CIDRs; empty = any
    #: A request body larger than this is refused (413); 0 = no limit.
    max_request_mb: int = Field(default=0, ge=0)
    #: One part (instance) larger than this fails (0xA700) and is not stored.
    max_instance_mb: int = Field(default=4096, ge=1, le=1_048_576)
    #: Requests served at once; more are answered 503.
    max_connections: int = Field(default=32, ge=1, le=10_000)
    #: A request whose body stops coming for this long is dropped (what came before stays).
    network_timeout_seconds: float = Field(default=60.0, gt=0)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and (
            not value.startswith("/")
            or not re.fullmatch(r"[A-Za-z0-9_./~-]*", value)
            or "//" in value
        ):
            raise ValueError('path must be empty or start with "/" (letters, digits, _ . - ~ /)')
        return value

    @field_validator("allowed_peer_addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return _check_networks(value)

    @model_validator(mode="after")
    def _auth_and_tls(self) -> DicomWebSettings:
        check_auth_fields(
            self.auth, user=self.user, password_file=self.password_file, token_file=self.token_file
        )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        return self


class DatabaseSettings(_Section):
    """Where job state lives: SQLite for one host, PostgreSQL for several."""

    url: str = ""  # empty: sqlite file dicomai.db under general.data_dir
    busy_timeout_seconds: float = Field(default=10.0, gt=0)  # wait for a locked database
    echo: bool = False


class SpoolSettings(_Section):
    """Where received instances and built results are stored on disk."""

    path: Path = Path("spool")
    retention_days: float = Field(default=7.0, gt=0)


class SchedulerSettings(_Section):
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


class WorkerSettings(_Section):
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
        return _check_device(value) if value else value


class SenderSettings(_Section):
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
        return _check_ae(value, "sender.ae_title")


class DestinationSettings(_Section):
    """A node results are sent to (usually the PACS): over DIMSE (C-STORE) or DICOMweb
    (STOW-RS). Relative file paths resolve against ``general.data_dir``."""

    name: str
    #: "dimse": C-STORE to ae_title@host:port; "dicomweb": STOW-RS to url.
    kind: Literal["dimse", "dicomweb"] = "dimse"
    # -- DIMSE (kind = "dimse" only, and required there)
    ae_title: str = ""
    host: str = ""
    port: int | None = Field(default=None, ge=1, le=65535)
    # -- DICOMweb (kind = "dicomweb" only)
    #: The DICOMweb service root, e.g. "https://pacs.example.org/dicom-web"; results are
    #: POSTed to {url}/studies. No credentials in it: they go in auth.
    url: str = ""
    #: none, basic (user + password_file) or bearer (token_file); the files hold the secret
    #: alone and are read again when they change (dicomai.http_auth).
    auth: Literal["none", "basic", "bearer"] = "none"
    user: str = ""
    password_file: Path | None = None
    token_file: Path | None = None
    #: CA bundle (PEM) to verify an https server with, instead of the system's.
    ca_file: Path | None = None
    #: Verify an https server's certificate (false only for a test bench).
    verify: bool = True
    # -- both kinds
    #: Seconds to connect, and to wait for each answer; default [sender] timeout_seconds.
    timeout_seconds: float | None = Field(default=None, gt=0)
    sr_sop_class: Literal["comprehensive3d", "comprehensive", "enhanced", "none"] = (
        "comprehensive3d"
    )
    emit_sc: bool = True
    emit_text_sr: bool = False
    emit_failure_notice: bool = False  # Basic Text SR when a routed study fails for good
    emit_ko: bool = False  # Key Object Selection flagging the images the SR refers to
    # Segmentation of where present findings are, overlaid by the viewer; skipped (not failed)
    # when the destination does not accept the Segmentation Storage SOP class.
    emit_seg: bool = True
    sc_heatmap: Literal["positive", "always", "never"] = "positive"  # when the SC shows a map

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value, "destinations.ae_title") if value else value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "url must not hold credentials: use auth, user and password_file (or token_file)"
            )
        if parts.query or parts.fragment:
            raise ValueError("url must be the service root, without ?query or #fragment")
        try:
            parts.port  # noqa: B018  (raises on a port out of range)
        except ValueError as exc:
            raise ValueError(f"url has an invalid port: {exc}") from exc
        return value.rstrip("/")

    @model_validator(mode="after")
    def _kind(self) -> DestinationSettings:
        dimse = {"ae_title": self.ae_title, "host": self.host, "port": self.port}
        web = {
            "url": self.url,
            "auth": self.auth != "none",
            "user": self.user,
            "password_file": self.password_file,
            "token_file": self.token_file,
            "ca_file": self.ca_file,
            "verify": not self.verify,
        }
        if self.kind == "dimse":
            if missing := [k for k, v in dimse.items() if not v]:
                raise ValueError(
                    f'destination {self.name!r} (kind "dimse") needs {", ".join(missing)}'
                )
            if extra := [k for k, v in web.items() if v]:
                raise ValueError(
                    f'destination {self.name!r}: {", ".join(extra)} only apply to kind = "dicomweb"'
                )
            return self
        if not self.url:
            raise ValueError(f'destination {self.name!r} (kind "dicomweb") needs url')
        if extra := [k for k, v in dimse.items() if v]:
            raise ValueError(
                f'destination {self.name!r}: {", ".join(extra)} only apply to kind = "dimse"'
            )
        try:
            check_auth_fields(
                self.auth,
                user=self.user,
                password_file=self.password_file,
                token_file=self.token_file,
            )
        except ValueError as exc:
            raise ValueError(f"destination {self.name!r}: {exc}") from exc
        if self.ca_file is not None and not self.url.startswith("https:"):
            raise ValueError(f"destination {self.name!r}: ca_file needs an https:// url")
        return self

    def files(self) -> list[tuple[str, Path, bool]]:
        """(key, path, holds a secret) of the files this destination reads."""
        return [
            (k, p, secret)
            for k, p, secret in (
                ("password_file", self.password_file, True),
                ("token_file", self.token_file, True),
                ("ca_file", self.ca_file, False),
            )
            if p is not None
        ]

    @property
    def address(self) -> str:
        """Where results go, without credentials: ae@host:port, or the URL."""
        return self.url if self.kind == "dicomweb" else f"{self.ae_title}@{self.host}:{self.port}"


class RouteSettings(_Section):
    """Which studies go to which model; the first matching route wins."""

    name: str
    model: str
    modality: list[str]
    body_part: list[str] = Field(default_factory=list)  # empty: any body part
    study_description: list[str] = Field(default_factory=list)  # regexes, case-insensitive
    series_description: list[str] = Field(default_factory=list)
    destinations: list[str] = Field(default_factory=lambda: ["pacs"])
    series_rule: Literal["xray_frontal", "ct_axial_most_slices", "all"] = "all"
    priority: int = Field(default=0, ge=0, le=100)  # higher is claimed first (urgent routes)

    @field_validator("modality", "body_part")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [v.strip().upper() for v in value]

    @field_validator("study_description", "series_description")
    @classmethod
    def _regex(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        return value


class PreprocessingSettings(_Section):
    """How pixels become a model input."""

    input_size: int = Field(default=224, ge=32, le=2048)
    # CT: (center, width) per channel; default brain, subdural, bone windows.
    windows: list[tuple[float, float]] = Field(
        default_factory=lambda: [(40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)]
    )
    normalize_mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    normalize_std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    batch_size: int = Field(default=8, ge=1, le=512)
    ct_aggregation: Literal["max", "top3_mean"] = "max"


class ModelSettings(_Section):
    """A TorchScript model and how to run it."""

    path: Path
    version: str
    sha256: str = ""  # empty: not pinned (dicomai records the actual hash in every result)
    device: str = "auto"
    task: Literal["chest_xray", "head_ct_ich", "bone_xray"]
    labels: list[str] = Field(default_factory=list)  # empty: from the model file's metadata
    threshold: float = Field(default=0.5, gt=0, le=1)
    thresholds: dict[str, float] = Field(default_factory=dict)
    preprocessing: PreprocessingSettings = Field(default_factory=PreprocessingSettings)
    body_part: str = ""
    #: Autocast precision on CUDA (on CPU the model always runs in float32).
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for label, t in value.items():
            if not 0 < t <= 1:
                raise ValueError(f"threshold of {label!r} must be in (0, 1]")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        if value and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("sha256 must be 64 lower-case hex digits or empty")
        return value

    def threshold_for(self, label: str) -> float:
        """Operating point of ``label``."""
        return self.thresholds.get(label, self.threshold)


class LoggingSettings(_Section):
    """Log format and level."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"  # auto: JSON under systemd, text on a tty
    file: Path | None = None
    levels: dict[str, Literal["DEBUG", "INFO", "WARNING", "ERROR"]] = Field(
        default_factory=dict
    )  # per component, e.g. {"dicomai.ingest" = "DEBUG"}


class MetricsSettings(_Section):
    """Prometheus endpoint."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)


class AuditSettings(_Section):
    """Audit trail (DICOM PS3.15 / IHE ATNA style JSON lines)."""

    file: Path | None = Path("audit.log")  # relative to data_dir; empty string disables
    syslog: bool = False
    syslog_address: str = "/dev/log"


class Settings(_Section):
    """The whole configuration tree."""

    general: GeneralSettings = Field(default_factory=GeneralSettings)
    receiver: ReceiverSettings = Field(default_factory=ReceiverSettings)
    dicomweb: DicomWebSettings = Field(default_factory=DicomWebSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    sender: SenderSettings = Field(default_factory=SenderSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    destinations: list[DestinationSettings] = Field(default_factory=list)
    routes: list[RouteSettings] = Field(default_factory=list)
    models: dict[str, ModelSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destination names must be unique")
        route_names = [r.name for r in self.routes]
        if len(set(route_names)) != len(route_names):
            raise ValueError("route names must be unique")
        for name in self.worker.models:
            if name not in self.models:
                raise ValueError(f"worker.models names unknown model {name!r}")
        for route in self.routes:
            if route.model not in self.models:
                raise ValueError(f"route {route.name!r} names unknown model {route.model!r}")
            for dest in route.destinations:
                if dest not in names:
                    raise ValueError(f"route {route.name!r} names unknown destination {dest!r}")
        return self

    # -- derived paths -------------------------------------------------------------------
    def resolve(self, path: Path) -> Path:
        """``path`` if absolute, else relative to ``general.data_dir``."""
        return path if path.is_absolute() else self.general.data_dir / path

    @property
    def spool_path(self) -> Path:
        """Absolute spool directory."""
        return self.resolve(self.spool.path)

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL; SQLite under the data directory by default."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.general.data_dir / 'dicomai.db'}"

    def served_models(self) -> list[str]:
        """Models this process's worker loads and claims jobs for."""
        routed = sorted({r.model for r in self.routes})
        return [m for m in routed if m in self.worker.models] if self.worker.models else routed

    def model_settings(self, name: str) -> ModelSettings:
        """Model ``name``'s settings with this worker's device and batch-size overrides."""
        spec = self.models[name]
        update: dict[str, Any] = {}
        if self.worker.device:
            update["device"] = self.worker.device
        if self.worker.batch_size:
            update["preprocessing"] = spec.preprocessing.model_copy(
                update={"batch_size": self.worker.batch_size}
            )
        return spec.model_copy(update=update) if update else spec

    def model_path(self, name: str) -> Path:
        """Absolute path of model ``name``'s file."""
        return self.resolve(self.models[name].path)

    def destination(self, name: str) -> DestinationSettings:
        """The destination called ``name``."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)


def default_config_path() -> Path:
    """``$DICOMAI_CONFIG`` if set, else ``config/dicomai.toml``."""
    return Path(os.environ.get("DICOMAI_CONFIG", str(DEFAULT_CONFIG)))


def _coerce(raw: str) -> Any:
    """Parse an environment value as a TOML scalar or list, else keep it a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for key, raw in environ.items():
        if not key.startswith(_ENV_PREFIX) or "__" not in key:
            continue
        section, _, field = key[len(_ENV_PREFIX) :].lower().partition("__")
        if not section or not field or "__" in field:
            continue
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"environment variable {key} overrides a non-table section")
        target[field] = _coerce(raw)


def load_settings(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Read, merge and validate the configuration.

    Parameters
    ----------
    path
        TOML file; default :func:`default_config_path`.
    environ
        Environment to read ``DICOMAI_<SECTION>__<KEY>`` overrides from; default ``os.environ``.
    overrides
        Section → key → value applied last (CLI flags, tests).

    Returns
    -------
    Settings
        Validated settings with ``general.data_dir`` made absolute (relative to the file).

    Raises
    ------
    ConfigError
        The file is missing or unreadable, or a value or key is invalid.
    """
    path = path or default_config_path()
    try:
        with open(path, "rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    _apply_env(data, os.environ if environ is None else environ)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    general = data.setdefault("general", {})
    data_dir = Path(general.get("data_dir", GeneralSettings().data_dir)).expanduser()
    if not data_dir.is_absolute():
        data_dir = (path.resolve().parent / data_dir).resolve()
    general["data_dir"] = str(data_dir)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {where}: {msg}")
        raise ConfigError(f"invalid configuration in {path}:\n" + "\n".join(lines)) from exc
