"""Checks of the DICOM settings of ``xrwatch serve`` and the ``AE@host:port`` notation."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from xrwatch.errors import ConfigError

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII except backslash
_DESTINATION = re.compile(
    r"^(?P<ae>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\[\]]+):(?P<port>\d{1,5})$"
)


@dataclass(frozen=True)
class Destination:
    """A DICOM peer: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def check_ae_title(value: str, what: str) -> str:
    """``value`` when it is a valid AE title (1-16 printable characters, not only spaces)."""
    if not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(
            f"{what} must be 1 to 16 printable ASCII characters without a backslash, got {value!r}"
        )
    return value.strip()


def parse_destination(text: str, what: str = "destination") -> Destination:
    """Parse ``AE@host:port`` (an IPv6 host in brackets: ``AE@[::1]:104``)."""
    m = _DESTINATION.match(text.strip())
    if m is None:
        raise ConfigError(f"{what} must look like AE@host:port, got {text!r}")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ConfigError(f"{what} {text!r}: port must be 1..65535, got {port}")
    ae = check_ae_title(m["ae"], f"{what} {text!r}: AE title")
    return Destination(ae, m["host"].strip("[]"), port)


def allowed_networks(
    values: tuple[str, ...],
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ConfigError(
                f"serve: dicom_allow_hosts: {value!r} is not an IP address or network "
                "(e.g. 10.1.2.3 or 10.1.2.0/24)"
            ) from None
    return out


def check_settings(cfg: Any) -> None:
    """Raise ConfigError for an unusable DICOM configuration of a ``ServeConfig``."""
    check_ae_title(cfg.ae_title, "serve: ae_title")
    if cfg.dicom_port is not None:
        if not 1 <= cfg.dicom_port <= 65535:
            raise ConfigError(f"serve: dicom_port must be 1..65535, got {cfg.dicom_port}")
        if cfg.once:
            raise ConfigError(
                "serve: dicom_port cannot be combined with once: a DICOM receiver needs a "
                "daemon that keeps running"
            )
        if not cfg.dicom_allow_ae:
            raise ConfigError(
                "serve: dicom_port needs dicom_allow_ae, the calling AE titles allowed to "
                "send (e.g. --dicom-allow-ae MODALITY1); every other caller is refused"
            )
    for ae in cfg.dicom_allow_ae:
        check_ae_title(ae, "serve: dicom_allow_ae")
    allowed_networks(cfg.dicom_allow_hosts)
    for dest in cfg.dicom_destinations:
        parse_destination(dest, "serve: dicom_destinations")
