"""``xrwatch serve`` (the folder daemon) and ``xrwatch status`` (what its ledger says)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer

from xrwatch.cli._app import app, console

_HELP_DEFAULTS = "Every option can also be set in the \\[serve] table of --config; the CLI wins."


@app.command(help=f"Watch INCOMING and classify every file dropped into it. {_HELP_DEFAULTS}")
def serve(
    incoming: Path | None = typer.Argument(
        None, help="Folder to watch (and its subfolders).", show_default=False
    ),
    model: Path | None = typer.Option(None, "--model", "-m", help="Exported ONNX model."),
    reports: Path | None = typer.Option(
        None, "--reports", help="Folder for predictions.csv and json/."
    ),
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="Ledger folder. \\[default: REPORTS/.xrwatch-state]"
    ),
    archive: Path | None = typer.Option(
        None,
        "--archive",
        help="Move inputs to ARCHIVE/processed or ARCHIVE/failed. \\[default: leave them]",
    ),
    poll: bool | None = typer.Option(
        None, "--poll/--no-poll", help="Polling observer, for SMB/NFS shares. \\[default: no-poll]"
    ),
    once: bool | None = typer.Option(
        None,
        "--once/--no-once",
        help="Process the backlog and exit: 0 if every file was ok, 1 if some failed.",
    ),
    poll_interval: float | None = typer.Option(
        None, "--poll-interval", help="Seconds between polls with --poll. \\[default: 1]"
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML file with a \\[serve] table."
    ),
    stable_seconds: float | None = typer.Option(
        None, "--stable-seconds", help="Size+mtime unchanged this long = complete. \\[default: 2]"
    ),
    truncated_timeout: float | None = typer.Option(
        None, "--truncated-timeout", help="Still truncated after this = error. \\[default: 300]"
    ),
    rescan_interval: float | None = typer.Option(
        None, "--rescan-interval", help="Seconds between full rescans. \\[default: 60]"
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="\\[default: 8]"),
    max_wait: float | None = typer.Option(
        None, "--max-wait", help="Seconds a partial batch waits. \\[default: 0.25]"
    ),
    workers: int | None = typer.Option(None, "--workers", help="Decode threads. \\[default: 2]"),
    provider: str | None = typer.Option(
        None,
        "--provider",
        help="auto, cpu or cuda (cuda = refuse to run without GPU). \\[default: auto]",
    ),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", help="Serve Prometheus /metrics and /healthz on this port."
    ),
    log_format: str | None = typer.Option(
        None, "--log-format", help="text or json. \\[default: text]"
    ),
    log_level: str | None = typer.Option(None, "--log-level", help="\\[default: INFO]"),
) -> int:
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
        "provider": provider,
        "metrics_port": metrics_port,
        "log_format": log_format,
        "log_level": log_level,
    }
    cfg = load_serve_config(config, cli_values)
    configure_logging(cfg.log_level, cfg.log_format)
    code = run_daemon(cfg)
    raise typer.Exit(code)


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@app.command(help="Counts by outcome, throughput and the last errors, from a daemon's ledger.")
def status(
    state_dir: Path = typer.Option(..., "--state-dir", help="The daemon's state folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    errors: int = typer.Option(5, "--errors", help="How many recent errors to show."),
) -> int:
    from xrwatch.errors import ConfigError
    from xrwatch.serve.ledger import Ledger

    if not (state_dir / "ledger.sqlite3").is_file():
        raise ConfigError(f"{state_dir}: no ledger here (expected {state_dir / 'ledger.sqlite3'})")
    ledger = Ledger(state_dir)
    try:
        now = time.time()
        counts = ledger.counts()
        last_min, last_hour = ledger.finished_since(now - 60), ledger.finished_since(now - 3600)
        last_errors = ledger.last_errors(errors)
        daemons = ledger.daemons()
    finally:
        ledger.close()
    data: dict[str, Any] = {
        "counts": {k: counts.get(k, 0) for k in ("ok", "error", "claimed")},
        "throughput_per_minute": {
            "last_minute": last_min,
            "last_hour_avg": round(last_hour / 60, 2),
        },
        "daemons": [
            {**d, "heartbeat_age_s": round(now - float(d["heartbeat_at"]), 1)} for d in daemons
        ],
        "last_errors": [{"time": _ago(t), "file": p, "error": e} for t, p, e in last_errors],
    }
    if as_json:
        console.print_json(json.dumps(data))
        return 0
    c = data["counts"]
    console.print(
        f"files: {c['ok']} ok, {c['error']} error, {c['claimed']} in progress", highlight=False
    )
    console.print(
        f"throughput: {last_min} in the last minute, {last_hour} in the last hour", highlight=False
    )
    if daemons:
        for d in data["daemons"]:
            console.print(
                f"daemon pid {d['pid']} on {d['host']} watching {d['incoming']}, "
                f"heartbeat {d['heartbeat_age_s']} s ago",
                highlight=False,
            )
    else:
        console.print("no daemon running on this state dir", highlight=False)
    if last_errors:
        console.print("last errors:", highlight=False)
        for item in data["last_errors"]:
            console.print(
                f"  {item['time']}  {item['file']}: {item['error']}", highlight=False, markup=False
            )
    return 0
