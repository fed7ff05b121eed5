"""Settings models and load_settings(): the configuration file's schema, one module per group
of sections (`receiving`, `daemon`, `routes`, `models`), the tree (`settings`) and reading it
(`loading`, the package's only I/O)."""

from dicomai.config.daemon import (
    AuditSettings,
    DatabaseSettings,
    GeneralSettings,
    LoggingSettings,
    MetricsSettings,
    SchedulerSettings,
    SenderSettings,
    SpoolSettings,
    WorkerSettings,
)
from dicomai.config.loading import DEFAULT_CONFIG, default_config_path, load_settings
from dicomai.config.models import ModelSettings, PreprocessingSettings
from dicomai.config.receiving import DicomWebSettings, ReceiverSettings
from dicomai.config.routes import DestinationSettings, RouteSettings
from dicomai.config.settings import Settings

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
