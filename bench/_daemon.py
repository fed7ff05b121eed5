"""Settings for benchmarks that run the real daemon in-process (shared by latency/priority)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomai.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


def bench_settings(tmp: Path, pacs_port: int, **sections: dict[str, Any]) -> Settings:
    """The shipped configuration on ``tmp`` (its poll intervals too: the worker and sender
    are woken when a job of this process becomes due), the bundled reference models and every
    destination pointed at ``pacs_port``; ``sections`` override keys."""
    overrides: dict[str, dict[str, Any]] = {
        "general": {"data_dir": str(tmp)},
        "receiver": {"port": 0, "min_free_disk_mb": 0},
        "logging": {"level": "WARNING"},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    settings = load_settings(REPO / "config" / "dicomai.toml", environ={}, overrides=overrides)
    base = load_settings(REPO / "config" / "dicomai.toml", environ={})
    models = {n: m.model_copy(update={"path": base.model_path(n)})
              for n, m in settings.models.items()}
    return settings.model_copy(update={
        "models": models,
        "destinations": [d.model_copy(update={"port": pacs_port}) for d in settings.destinations],
    })
