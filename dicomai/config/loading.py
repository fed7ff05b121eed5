"""load_settings(): the TOML file, ``DICOMAI_<SECTION>__<KEY>`` environment overrides and
CLI overrides merged and validated; reading the file is the package's only I/O."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dicomai.config.daemon import GeneralSettings
from dicomai.config.settings import Settings
from dicomai.errors import ConfigError

#: The shipped default configuration, relative to the repository / working directory.
DEFAULT_CONFIG = Path("config/dicomai.toml")
_ENV_PREFIX = "DICOMAI_"


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
