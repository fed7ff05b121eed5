"""Where studies go: [[routes]] (which model) and [[destinations]] (where its results are
sent)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from dicomai.config.base import Section, check_ae
from dicomai.http_auth import check_auth_fields


class RouteSettings(Section):
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


class DestinationSettings(Section):
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
        return check_ae(value, "destinations.ae_title") if value else value

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
