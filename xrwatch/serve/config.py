"""``xrwatch serve`` configuration: a frozen dataclass from TOML (``[serve]`` table) + CLI.

Every option of ``xrwatch serve`` is a field here; the CLI overrides the file and unknown
keys are an error (see :func:`xrwatch.config.build_config`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from xrwatch import defaults
from xrwatch.config import build_config, merge, read_toml, unknown_keys_error
from xrwatch.errors import ConfigError
from xrwatch.flags import ScopeGuard
from xrwatch.inputs import IGNORE_PATTERNS

DEFAULT_IGNORE = IGNORE_PATTERNS  # hidden and temporary names, DICOMDIR
DecodeIn = Literal["auto", "threads", "processes"]  # where decodes run (xrwatch.serve.decoders)

# The range of each number (lowest, highest; the lowest excluded for OPEN_BELOW): a value
# outside cannot run as meant (a wait of an hour or more per batch, a lease shorter than two
# of the daemon's 5 s heartbeats, which would let another host take over live claims).
LIMITS: dict[str, tuple[float, float]] = {
    "stable_seconds": (0, 3600),
    "truncated_timeout": (0, 7 * 86400),
    "rescan_interval": (0, 86400),
    "poll_interval": (0, 3600),
    "max_wait": (0, 3600),
    "lease_seconds": (10, 86400),
    "batch_size": (1, 1024),
    "workers": (1, 64),
    "max_file_mb": (1, 65536),
    # the results sender (xrwatch.dicom.sender): tries before a result is parked, seconds
    # before the first retry (doubled per failure, at most 5 min), and the seconds one
    # association may wait (connect, each C-STORE's answer, network silence)
    "dicom_send_attempts": (1, 1000),
    "dicom_send_retry": (0.1, 300),
    "dicom_send_timeout": (1, 3600),
}
OPEN_BELOW = frozenset({"stable_seconds", "truncated_timeout", "rescan_interval", "poll_interval"})
TLS_FILES = ("dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca")


@dataclass(frozen=True)
class ServeConfig:
    """Every setting of the folder daemon; the defaults are the documented ones."""

    incoming: Path  # the watched folder (and its subfolders)
    model: Path  # exported ONNX model with xrwatch metadata
    reports: Path  # predictions.csv and json/ go here
    state_dir: Path | None = None  # ledger location; default: REPORTS/.xrwatch-state
    archive: Path | None = None  # move inputs to ARCHIVE/processed|failed; default: leave them
    poll: bool = False  # PollingObserver, for SMB/NFS shares where inotify sees nothing
    once: bool = False  # process the backlog, write reports, exit 0 (all ok) or 1
    stable_seconds: float = 2.0  # size+mtime unchanged this long => the file is complete
    truncated_timeout: float = 300.0  # a file still truncated after this long is an error
    rescan_interval: float = 60.0  # full rescan catches events lost to overflow or remounts
    poll_interval: float = 1.0  # PollingObserver's scan period (with --poll)
    batch_size: int = 8  # files per inference call
    max_wait: float = 0.25  # seconds a partial batch waits for more files
    workers: int = 2  # threads that hash, claim and decode files (overlap with inference)
    # where those threads' decodes run: "processes" (one per thread, off the interpreter lock
    # the DICOM receiver needs), "threads", or "auto": processes with dicom_port, else threads
    decode_in: DecodeIn = "auto"
    # a larger file is an error row, never read: 100 MP at 16 bits (the pixel limit) is 200 MB
    max_file_mb: int = 256
    provider: Literal["auto", "cpu", "cuda"] = "auto"  # ONNX Runtime execution provider
    lease_seconds: float = 30.0  # claims of a daemon on another host silent this long are retaken
    ignore: tuple[str, ...] = ()  # extra glob patterns to ignore, on top of DEFAULT_IGNORE
    metrics_port: int | None = None  # serve Prometheus /metrics and /healthz on this port
    metrics_host: str = "127.0.0.1"  # address for the metrics server
    log_format: Literal["text", "json"] = "text"  # json: one object per line (journald/ELK)
    log_level: str = "INFO"
    # -- DICOM node (xrwatch.dicom); off unless dicom_port, dicom_destinations or dicom_sr --
    dicom_port: int | None = None  # C-STORE/C-ECHO SCP on this port (above 1024: no root)
    dicom_host: str = "127.0.0.1"  # address the SCP listens on (0.0.0.0: every interface)
    ae_title: str = "XRWATCH"  # our AE title: called AE of the SCP, calling AE of sends
    dicom_allow_ae: tuple[str, ...] = ()  # calling AE titles allowed to send (required)
    dicom_allow_hosts: tuple[str, ...] = ()  # source addresses/networks allowed; () = any
    dicom_accept_other: bool = False  # keep CT, MR ... too (errors); else acknowledged, dropped
    dicom_destinations: tuple[str, ...] = ()  # send each SR to AE@host:port (C-STORE)
    dicom_sr: bool = False  # write REPORTS/dicom SRs even without port or destinations
    dicom_send_attempts: int = 10  # tries of one result per destination, then it is parked
    dicom_send_retry: float = 2.0  # seconds before the first retry; doubled per failure
    dicom_send_timeout: float = 30.0  # seconds one send association may wait on the PACS
    # the receiver's limits (xrwatch.dicom.settings.ReceiverLimits, docs/dicom-receiver.md)
    dicom_max_associations: int = 10  # associations at once, from all senders
    dicom_max_per_host: int = 5  # associations at once from one source address
    dicom_max_pdu: int = 65536  # largest PDU accepted, bytes (4096 .. 16 MiB)
    dicom_acse_timeout: float = 30.0  # seconds from connect to an established association
    dicom_dimse_timeout: float = 60.0  # seconds pynetdicom waits for a DIMSE message
    dicom_network_timeout: float = 60.0  # seconds without a complete PDU: connection closed
    dicom_tls_cert: Path | None = None  # PEM certificate: the receiver speaks DICOM TLS only
    dicom_tls_key: Path | None = None  # its PEM private key
    dicom_tls_ca: Path | None = None  # PEM CA bundle: senders then need a certificate from it
    heatmaps: bool = True  # REPORTS/heatmaps/<relative path>.png, for models with a cam output
    low_confidence: float | None = None  # flag threshold; default: the model's own
    # out_of_scope from "combined" (features and layout both unlike the training images) or
    # "features" (the feature distance alone: stricter, flags more real chest X-rays)
    scope_guard: ScopeGuard = "combined"
    # -- the model on a Triton fleet (xrwatch.remote, docs/triton.md); off unless triton --
    triton: tuple[str, ...] = ()  # grpc://HOST:PORT of each server (model is then not run)
    triton_model: str = "xrwatch"  # the served model: NAME or NAME:VERSION

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # nan would pass every comparison below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"serve: {f.name} must be a finite number, got {value!r}")
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            above = value > low if name in OPEN_BELOW else value >= low
            if not (above and value <= high):
                bracket = "(" if name in OPEN_BELOW else "["
                raise ConfigError(
                    f"serve: {name} must be in {bracket}{low:g}, {high:g}], got {value!r}"
                )
        if self.low_confidence is not None and not 0.0 <= self.low_confidence < 1.0:
            raise ConfigError(f"serve: low_confidence must be in [0, 1), got {self.low_confidence}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"serve: metrics_port must be 0..65535, got {self.metrics_port}")
        if self.dicom_enabled:
            from xrwatch.dicom.settings import check_settings

            check_settings(self)

    @property
    def dicom_enabled(self) -> bool:
        """Whether the DICOM node runs (receiver, SR writer or sender)."""
        return self.dicom_port is not None or bool(self.dicom_destinations) or self.dicom_sr

    @property
    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.reports / ".xrwatch-state"

    @property
    def ignore_patterns(self) -> tuple[str, ...]:
        return DEFAULT_IGNORE + tuple(self.ignore)


def load_serve_config(config_file: Path | None, cli_values: dict[str, Any]) -> ServeConfig:
    """Merge ``[serve]`` from ``config_file`` (if given) with CLI values (``None`` = not given).

    Relative paths in the file are relative to the file's folder, so a config can travel
    with its deployment.
    """
    file_values: dict[str, Any] = {}
    source = "command line"
    if config_file is not None:
        file_values = read_toml(config_file, table="serve")
        base = Path(config_file).resolve().parent
        for key in ("incoming", "model", "reports", "state_dir", "archive", *TLS_FILES):
            value = file_values.get(key)
            if isinstance(value, str) and not Path(value).is_absolute():
                file_values[key] = str(base / value)
        source = f"{config_file} (serve table) + command line"
    values = merge(file_values, cli_values)
    unknown = sorted(set(values) - set(field_names()))
    if unknown:  # before 'missing': a misspelt key is the likelier cause
        raise unknown_keys_error(source, unknown, field_names())
    if values.get("model") is None and (shipped := defaults.default_model()) is not None:
        values["model"] = str(shipped)  # the model shipped with xrwatch; --model wins
    missing = [k for k in ("incoming", "model", "reports") if values.get(k) is None]
    if missing:
        raise ConfigError(
            f"serve: {', '.join(missing)} not given (pass them on the command line or in the "
            "serve table of --config)"
            + (
                f"; no default model is shipped at {defaults.DEFAULT_MODEL}"
                if "model" in missing
                else ""
            )
        )
    try:
        return build_config(ServeConfig, values, source=source)
    except ConfigError as exc:  # a range check of ServeConfig: name where the value came from
        text = str(exc)
        if not text.startswith("serve: "):
            raise
        raise ConfigError(f"{source}: {text.removeprefix('serve: ')}") from None


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ServeConfig)]
