"""The whole configuration tree and the paths derived from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from dicomai.config.base import Section
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
from dicomai.config.models import ModelSettings
from dicomai.config.receiving import DicomWebSettings, ReceiverSettings
from dicomai.config.routes import DestinationSettings, RouteSettings


class Settings(Section):
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
