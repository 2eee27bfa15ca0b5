"""``xrwatch serve``: the folder daemon (``xrwatch status`` is in :mod:`.status_cmd`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from xrwatch.cli._app import EXIT_ERROR, app, log_json_error
from xrwatch.cli.status_cmd import daemon_state as daemon_state  # re-exported (tests use it)
from xrwatch.errors import XRWatchError
from xrwatch.flags import SCOPE_GUARD_HELP
from xrwatch.serve.config import ServeConfig


def _with_default(text: str, name: str) -> str:
    """Help text ending with the option's default, taken from :class:`ServeConfig`.

    The options default to None, so that a value from ``--config`` is not overridden by a
    CLI default; the real default lives in the config dataclass, and help shows that one.
    """
    value = ServeConfig.__dataclass_fields__[name].default
    if isinstance(value, bool):
        shown = f"--{name}" if value else f"--no-{name}"
    else:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} (default: {shown})."


@app.command()
def serve(
    incoming: Path | None = typer.Argument(
        None, help="Folder to watch (and its subfolders).", show_default=False
    ),
    model: Path | None = typer.Option(None, "--model", "-m", help="Exported ONNX model."),
    reports: Path | None = typer.Option(
        None, "--reports", help="Folder for predictions.csv and json/."
    ),
    state_dir: Path | None = typer.Option(
        None,
        "--state-dir",
        help="Ledger folder (default: REPORTS/.xrwatch-state).",
    ),
    archive: Path | None = typer.Option(
        None,
        "--archive",
        help="Move inputs to ARCHIVE/processed or ARCHIVE/failed (default: leave them).",
    ),
    poll: bool | None = typer.Option(
        None,
        "--poll/--no-poll",
        help=_with_default("Polling observer, for SMB/NFS shares", "poll"),
    ),
    once: bool | None = typer.Option(
        None,
        "--once/--no-once",
        help=_with_default(
            "Process the backlog and exit: 0 if every file was ok, 1 if some failed or a "
            "result could not be written to the reports",
            "once",
        ),
    ),
    poll_interval: float | None = typer.Option(
        None,
        "--poll-interval",
        help=_with_default("Seconds between polls with --poll", "poll_interval"),
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML file whose serve table sets any of these options."
    ),
    stable_seconds: float | None = typer.Option(
        None,
        "--stable-seconds",
        help=_with_default(
            "A file whose size and mtime stay unchanged this long is complete", "stable_seconds"
        ),
    ),
    truncated_timeout: float | None = typer.Option(
        None,
        "--truncated-timeout",
        help=_with_default(
            "Seconds after which a file still truncated is reported as an error",
            "truncated_timeout",
        ),
    ),
    rescan_interval: float | None = typer.Option(
        None,
        "--rescan-interval",
        help=_with_default(
            "Seconds between full rescans, which catch events the watcher lost", "rescan_interval"
        ),
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help=_with_default("Files per inference call", "batch_size"),
    ),
    max_wait: float | None = typer.Option(
        None,
        "--max-wait",
        help=_with_default("Seconds a partial batch waits for more files", "max_wait"),
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        help=_with_default("Threads that read and decode files while the model runs", "workers"),
    ),
    decode_in: str | None = typer.Option(
        None,
        "--decode-in",
        help=_with_default(
            "Where the workers decode: processes (one each, off the interpreter lock the DICOM "
            "receiver needs), threads, or auto (processes with --dicom-port)",
            "decode_in",
        ),
    ),
    max_file_mb: int | None = typer.Option(
        None,
        "--max-file-mb",
        help=_with_default("Larger files get an error row without being read (MiB)", "max_file_mb"),
    ),
    provider: str | None = typer.Option(
        None,
        "--provider",
        help=_with_default("auto, cpu or cuda; cuda refuses to run without a GPU", "provider"),
    ),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", help="Serve Prometheus /metrics and /healthz on this port."
    ),
    log_format: str | None = typer.Option(
        None,
        "--log-format",
        help=_with_default("text, or json: one object per line, for journald/ELK", "log_format"),
    ),
    log_level: str | None = typer.Option(
        None,
        "--log-level",
        help=_with_default("DEBUG, INFO, WARNING or ERROR", "log_level"),
    ),
    dicom_port: int | None = typer.Option(
        None,
        "--dicom-port",
        help="Receive images over DICOM (C-STORE, C-ECHO) on this port; needs --dicom-allow-ae.",
        rich_help_panel="DICOM",
    ),
    dicom_host: str | None = typer.Option(
        None,
        "--dicom-host",
        help=_with_default("Address the DICOM receiver listens on", "dicom_host"),
        rich_help_panel="DICOM",
    ),
    ae_title: str | None = typer.Option(
        None,
        "--ae-title",
        help=_with_default("Our AE title (called by senders, calling for results)", "ae_title"),
        rich_help_panel="DICOM",
    ),
    dicom_allow_ae: list[str] | None = typer.Option(
        None,
        "--dicom-allow-ae",
        help="Calling AE title allowed to send (repeat for several); others are refused.",
        rich_help_panel="DICOM",
    ),
    dicom_allow_host: list[str] | None = typer.Option(
        None,
        "--dicom-allow-host",
        help="Source address or network allowed to send (repeatable; default: any).",
        rich_help_panel="DICOM",
    ),
    dicom_accept_other: bool | None = typer.Option(
        None,
        "--dicom-accept-other/--no-dicom-accept-other",
        help="Keep CT, MR and other non-radiographs (reported as errors) instead of "
        "acknowledging and dropping them (default: drop, counted by SOP class).",
        rich_help_panel="DICOM",
    ),
    dicom_max_associations: int | None = typer.Option(
        None,
        "--dicom-max-associations",
        help=_with_default(
            "DICOM associations at once, from all senders", "dicom_max_associations"
        ),
        rich_help_panel="DICOM",
    ),
    dicom_max_per_host: int | None = typer.Option(
        None,
        "--dicom-max-per-host",
        help=_with_default("DICOM associations at once from one address", "dicom_max_per_host"),
        rich_help_panel="DICOM",
    ),
    dicom_max_pdu: int | None = typer.Option(
        None,
        "--dicom-max-pdu",
        help=_with_default("Largest PDU the receiver accepts, bytes", "dicom_max_pdu"),
        rich_help_panel="DICOM",
    ),
    dicom_acse_timeout: float | None = typer.Option(
        None,
        "--dicom-acse-timeout",
        help=_with_default(
            "Seconds from connect to an established association", "dicom_acse_timeout"
        ),
        rich_help_panel="DICOM",
    ),
    dicom_dimse_timeout: float | None = typer.Option(
        None,
        "--dicom-dimse-timeout",
        help=_with_default("Seconds to wait for a DIMSE message", "dicom_dimse_timeout"),
        rich_help_panel="DICOM",
    ),
    dicom_network_timeout: float | None = typer.Option(
        None,
        "--dicom-network-timeout",
        help=_with_default(
            "Seconds without a complete PDU before a connection is closed", "dicom_network_timeout"
        ),
        rich_help_panel="DICOM",
    ),
    dicom_tls_cert: Path | None = typer.Option(
        None,
        "--dicom-tls-cert",
        help="PEM certificate: the DICOM receiver then speaks TLS only (with --dicom-tls-key).",
        rich_help_panel="DICOM",
    ),
    dicom_tls_key: Path | None = typer.Option(
        None,
        "--dicom-tls-key",
        help="PEM private key of --dicom-tls-cert.",
        rich_help_panel="DICOM",
    ),
    dicom_tls_ca: Path | None = typer.Option(
        None,
        "--dicom-tls-ca",
        help="PEM CA bundle: senders must then present a certificate signed by it.",
        rich_help_panel="DICOM",
    ),
    dicom_destination: list[str] | None = typer.Option(
        None,
        "--dicom-destination",
        help="Send each result SR to AE@host:port by C-STORE (repeatable).",
        rich_help_panel="DICOM",
    ),
    dicom_send_attempts: int | None = typer.Option(
        None,
        "--dicom-send-attempts",
        help=_with_default(
            "Tries of one result per destination before it is parked", "dicom_send_attempts"
        ),
        rich_help_panel="DICOM",
    ),
    dicom_send_retry: float | None = typer.Option(
        None,
        "--dicom-send-retry",
        help=_with_default(
            "Seconds before a failed send is retried, doubled per failure (at most 300)",
            "dicom_send_retry",
        ),
        rich_help_panel="DICOM",
    ),
    dicom_send_timeout: float | None = typer.Option(
        None,
        "--dicom-send-timeout",
        help=_with_default(
            "Seconds a send association waits on the destination", "dicom_send_timeout"
        ),
        rich_help_panel="DICOM",
    ),
    dicom_sr: bool | None = typer.Option(
        None,
        "--dicom-sr/--no-dicom-sr",
        help="Write a DICOM SR per classified DICOM into REPORTS/dicom (implied by "
        "--dicom-port and --dicom-destination).",
        rich_help_panel="DICOM",
    ),
    heatmaps: bool | None = typer.Option(
        None,
        "--heatmaps/--no-heatmaps",
        help=_with_default(
            "Write REPORTS/heatmaps/<relative path>.png per ok file (models with a cam output)",
            "heatmaps",
        ),
    ),
    low_confidence: float | None = typer.Option(
        None,
        "--low-confidence",
        help="Flag low_confidence below this top probability (default: the model's threshold).",
    ),
    scope_guard: str | None = typer.Option(
        None,
        "--scope-guard",
        help=_with_default(SCOPE_GUARD_HELP, "scope_guard"),
    ),
    triton: str | None = typer.Option(
        None,
        "--triton",
        help="Run the model on Triton server(s), grpc://HOST:PORT, several comma-separated "
        "(a failing one is retried on another; needs the 'triton' extra; docs/triton.md).",
    ),
    triton_model: str | None = typer.Option(
        None,
        "--triton-model",
        help=_with_default("The served model: NAME or NAME:VERSION", "triton_model"),
    ),
) -> int:
    """Watch INCOMING and classify every file dropped into it.

    Each file gets exactly one row in REPORTS/predictions.csv (and a JSON file), across
    crashes and restarts. Every option can also be set in the serve table of --config;
    the command line wins.

    With --dicom-port it is also a DICOM node: images received by C-STORE go through the
    same path, and each result goes back as a DICOM SR (REPORTS/dicom, and to every
    --dicom-destination).
    """
    from xrwatch.logs import configure_logging
    from xrwatch.serve.config import load_serve_config
    from xrwatch.serve.daemon import serve as run_daemon

    cli_values: dict[str, Any] = {
        "incoming": incoming,
        "model": model,
        "reports": reports,
        "state_dir": state_dir,
        "archive": archive,
        "poll": poll,
        "poll_interval": poll_interval,
        "once": once,
        "stable_seconds": stable_seconds,
        "truncated_timeout": truncated_timeout,
        "rescan_interval": rescan_interval,
        "batch_size": batch_size,
        "max_wait": max_wait,
        "workers": workers,
        "decode_in": decode_in,
        "max_file_mb": max_file_mb,
        "provider": provider,
        "metrics_port": metrics_port,
        "log_format": log_format,
        "log_level": log_level,
        "dicom_port": dicom_port,
        "dicom_host": dicom_host,
        "ae_title": ae_title,
        "dicom_allow_ae": dicom_allow_ae or None,
        "dicom_allow_hosts": dicom_allow_host or None,
        "dicom_accept_other": dicom_accept_other,
        "dicom_max_associations": dicom_max_associations,
        "dicom_max_per_host": dicom_max_per_host,
        "dicom_max_pdu": dicom_max_pdu,
        "dicom_acse_timeout": dicom_acse_timeout,
        "dicom_dimse_timeout": dicom_dimse_timeout,
        "dicom_network_timeout": dicom_network_timeout,
        "dicom_tls_cert": dicom_tls_cert,
        "dicom_tls_key": dicom_tls_key,
        "dicom_tls_ca": dicom_tls_ca,
        "dicom_destinations": dicom_destination or None,
        "dicom_send_attempts": dicom_send_attempts,
        "dicom_send_retry": dicom_send_retry,
        "dicom_send_timeout": dicom_send_timeout,
        "dicom_sr": dicom_sr,
        "heatmaps": heatmaps,
        "low_confidence": low_confidence,
        "scope_guard": scope_guard,
        "triton": [u for u in (triton or "").split(",") if u.strip()] or None,
        "triton_model": triton_model,
    }
    cfg = load_serve_config(config, cli_values)
    configure_logging(cfg.log_level, cfg.log_format)
    try:
        code = run_daemon(cfg)
    except XRWatchError as exc:  # a start-up error (exit 2), in the format of the logs
        if cfg.log_format != "json":
            raise
        log_json_error(str(exc), type(exc).__name__)
        raise typer.Exit(EXIT_ERROR) from None
    raise typer.Exit(code)
