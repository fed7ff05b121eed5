"""The receivers' sections: [receiver] (DICOM C-STORE) and [dicomweb] (STOW-RS)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dicomai.config.base import Section, check_ae, check_networks
from dicomai.http_auth import check_auth_fields


class ReceiverSettings(Section):
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
        return check_ae(value, "receiver.ae_title")

    @field_validator("allowed_peer_addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return check_networks(value)

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
        return [check_ae(v, "receiver.allowed_calling_ae_titles entry") for v in value]


class DicomWebSettings(Section):
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
        return check_networks(value)

    @model_validator(mode="after")
    def _auth_and_tls(self) -> DicomWebSettings:
        check_auth_fields(
            self.auth, user=self.user, password_file=self.password_file, token_file=self.token_file
        )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        return self
