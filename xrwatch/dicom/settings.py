"""Checks of the DICOM settings of ``xrwatch serve`` and the ``AE@host:port`` notation."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class ReceiverLimits:
    """What one peer, or all of them, may hold of the receiver (see ``xrwatch.dicom.gate``)."""

    max_associations: int = 10  # associations at once, from all senders
    max_per_host: int = 5  # associations at once from one source address
    max_pdu: int = 65536  # the PDU size we accept (negotiated; bytes held per read)
    acse_timeout: float = 30.0  # seconds from connect to an established association
    dimse_timeout: float = 60.0  # seconds pynetdicom waits for a DIMSE message
    network_timeout: float = 60.0  # seconds without a complete PDU before it is closed
    max_object_bytes: int = 256 * 1024 * 1024  # a larger data set is refused as it streams

    @classmethod
    def from_config(cls, cfg: Any) -> ReceiverLimits:
        return cls(
            max_associations=cfg.dicom_max_associations,
            max_per_host=cfg.dicom_max_per_host,
            max_pdu=cfg.dicom_max_pdu,
            acse_timeout=cfg.dicom_acse_timeout,
            dimse_timeout=cfg.dicom_dimse_timeout,
            network_timeout=cfg.dicom_network_timeout,
            max_object_bytes=cfg.max_file_mb * 1024 * 1024,
        )


MAX_PDU_RANGE = (4096, 16 * 1024 * 1024)


def check_limits(cfg: Any) -> None:
    """Raise ConfigError for receiver limits that cannot work (``ServeConfig`` fields)."""
    for name in ("dicom_max_associations", "dicom_max_per_host"):
        value = getattr(cfg, name)
        if not 1 <= value <= 1000:
            raise ConfigError(f"serve: {name} must be 1..1000, got {value!r}")
    if cfg.dicom_max_per_host > cfg.dicom_max_associations:
        raise ConfigError(
            f"serve: dicom_max_per_host ({cfg.dicom_max_per_host}) cannot exceed "
            f"dicom_max_associations ({cfg.dicom_max_associations})"
        )
    lo, hi = MAX_PDU_RANGE
    if not lo <= cfg.dicom_max_pdu <= hi:
        raise ConfigError(f"serve: dicom_max_pdu must be {lo}..{hi}, got {cfg.dicom_max_pdu!r}")
    for name in ("dicom_acse_timeout", "dicom_dimse_timeout", "dicom_network_timeout"):
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 1 <= value <= 3600):
            raise ConfigError(f"serve: {name} must be 1..3600 seconds, got {value!r}")
    cert, key, ca = cfg.dicom_tls_cert, cfg.dicom_tls_key, cfg.dicom_tls_ca
    if (cert is None) != (key is None):
        raise ConfigError("serve: dicom_tls_cert and dicom_tls_key go together (both or neither)")
    if ca is not None and cert is None:
        raise ConfigError("serve: dicom_tls_ca (client certificates) needs dicom_tls_cert and _key")
    for name, path in (("dicom_tls_cert", cert), ("dicom_tls_key", key), ("dicom_tls_ca", ca)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"serve: {name}: {path} is not a readable file")


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
        check_limits(cfg)
    for ae in cfg.dicom_allow_ae:
        check_ae_title(ae, "serve: dicom_allow_ae")
    allowed_networks(cfg.dicom_allow_hosts)
    for dest in cfg.dicom_destinations:
        parse_destination(dest, "serve: dicom_destinations")
