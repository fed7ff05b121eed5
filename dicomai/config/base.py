"""What every settings section shares: frozen, unknown keys refused; the value checks
more than one section uses."""

from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, ConfigDict

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


def check_ae(value: str, what: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"{what} must be 1-16 printable characters without backslash")
    return value.strip()


def check_networks(value: list[str]) -> list[str]:
    """An allow-list of IP addresses and CIDR networks, each checked."""
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise ValueError(f"not an IP address or network: {item!r}") from exc
    return value


def check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError("device must be auto, cpu, cuda or cuda:N")
    return value
