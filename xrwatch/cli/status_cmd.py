"""``xrwatch status``: what the ledger says about the daemons of one state folder.

Its exit status follows the LSB convention for an init script's ``status`` action, so a
monitor (Nagios/Icinga checks, a systemd ``ExecCondition``, a shell ``if``) can use it as
is: 0 a daemon is running; 1 none is, but one left its state behind (killed, or hung: no
heartbeat); 3 none is running (stopped cleanly, or never started here). A usage or
configuration error is 2, as for every command.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer

from xrwatch.cli._app import app, console
from xrwatch.errors import ConfigError
from xrwatch.flags import FLAGS

STALE_AFTER_SECONDS = 30.0  # no heartbeat for this long: the daemon is stale (hung)

# LSB init-script status codes (LSB core specification, "Init Script Actions")
RUNNING, DEAD_STATE_LEFT, NOT_RUNNING = 0, 1, 3
_SUMMARY = {RUNNING: "running", DEAD_STATE_LEFT: "dead", NOT_RUNNING: "not running"}

_STATE_TEXT = {
    "alive": "alive",
    "stale": "stale: no heartbeat for over {stale:.0f} s (hung, or stopped on another host)",
    "stopped": "stopped: the process is gone (killed?); its files are taken over at the next start",
}


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def daemon_state(d: dict[str, Any], now: float, host: str) -> str:
    """``alive``, ``stale`` (no recent heartbeat) or ``stopped`` (gone without a goodbye).

    On this host the pid decides whether the process exists; a daemon on another host is
    judged by its heartbeat only (``stale`` then may also mean stopped).
    """
    from xrwatch.serve.ledger import _pid_alive

    if d["host"] == host and not _pid_alive(int(d["pid"])):
        return "stopped"
    if now - float(d["heartbeat_at"]) > STALE_AFTER_SECONDS:
        return "stale"
    return "alive"


def exit_code(states: list[str]) -> int:
    """The LSB status of a state folder from its daemons' states (module doc)."""
    if "alive" in states:
        return RUNNING
    return DEAD_STATE_LEFT if states else NOT_RUNNING


def state_dir_of(config: Path) -> Path:
    """The ledger folder a serve config names: ``state_dir``, else ``REPORTS/.xrwatch-state``;
    relative paths are relative to the file's folder, as ``serve`` reads them."""
    from xrwatch.config import read_toml

    table = read_toml(config, table="serve")
    for key in ("state_dir", "reports"):
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{config}: {key} must be a path string, got {value!r}")
    base = config.resolve().parent
    if table.get("state_dir"):
        return base / table["state_dir"]
    if table.get("reports"):
        return base / table["reports"] / ".xrwatch-state"
    raise ConfigError(f"{config}: the serve table names neither state_dir nor reports")


def flag_counts(ledger_path: Path) -> dict[str, int]:
    """Ok results by flag (``none`` for unflagged), read from the ledger's records."""
    con = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute(
            "SELECT COALESCE(NULLIF(json_extract(record, '$.flag'), ''), 'none'), COUNT(*) "
            "FROM files WHERE state='ok' GROUP BY 1"
        ).fetchall()
    finally:
        con.close()
    counts = {"none": 0, **{flag: 0 for flag in FLAGS if flag}}
    counts.update({str(flag): int(n) for flag, n in rows})
    return counts


def _dicom_status(state_dir: Path) -> dict[str, Any] | None:
    """The DICOM node's counts from the ledger, or None when it never ran there."""
    from xrwatch.dicom.outbox import Outbox

    outbox = Outbox(state_dir / "ledger.sqlite3")
    try:
        if not outbox.has_tables():
            return None
        return {"results": outbox.result_counts(), "destinations": outbox.destination_counts()}
    finally:
        outbox.close()


def _outbox(dicom: dict[str, Any] | None) -> dict[str, int] | None:
    """The DICOM outbox over every destination: sent, pending, parked, failed attempts."""
    if dicom is None:
        return None
    keys = ("sent", "pending", "parked", "failed_attempts")
    return {k: sum(int(d.get(k, 0)) for d in dicom["destinations"].values()) for k in keys}


def collect(state_dir: Path, errors: int) -> dict[str, Any]:
    """Everything ``status`` shows, as one JSON-ready dict (``exit_code`` included)."""
    from xrwatch.safetext import printable
    from xrwatch.serve.ledger import Ledger

    ledger_path = state_dir / "ledger.sqlite3"
    if not ledger_path.is_file():
        return {
            "state": _SUMMARY[NOT_RUNNING], "exit_code": NOT_RUNNING,
            "state_dir": str(state_dir), "reason": f"no ledger here ({ledger_path}): never started",
        }  # fmt: skip
    ledger = Ledger(state_dir)
    try:
        now = time.time()
        counts = ledger.counts()
        last_min, last_hour = ledger.finished_since(now - 60), ledger.finished_since(now - 3600)
        last_errors = ledger.last_errors(errors)
        daemons = ledger.daemons()
        unreported, held = ledger.unreported_counts()
        held_rows = ledger.held_reports(errors)
    finally:
        ledger.close()
    host = socket.gethostname()
    listed = [
        {
            **d,
            "incoming": printable(str(d["incoming"])),
            "heartbeat_age_s": round(now - float(d["heartbeat_at"]), 1),
            "state": daemon_state(d, now, host),
        }
        for d in daemons
    ]
    code = exit_code([d["state"] for d in listed])
    dicom = _dicom_status(state_dir)
    data: dict[str, Any] = {
        "state": _SUMMARY[code],
        "exit_code": code,
        "state_dir": str(state_dir),
        "counts": {k: counts.get(k, 0) for k in ("ok", "error", "claimed")},
        "flags": flag_counts(ledger_path),
        "unreported": {"total": unreported, "held": held},
        "throughput_per_minute": {
            "last_minute": last_min,
            "last_hour_avg": round(last_hour / 60, 2),
        },
        "daemons": listed,
        "last_errors": [
            {"time": _ago(t), "file": printable(p), "error": printable(e)}
            for t, p, e in last_errors
        ],
        "held_reports": [{"file": printable(p), "reason": printable(e)} for p, e in held_rows],
        "outbox": _outbox(dicom),
    }
    if dicom is not None:
        data["dicom"] = dicom
    return data


@app.command()
def status(
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="The daemon's state folder (its ledger)."
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="The daemon's TOML config: its state_dir, else REPORTS/.xrwatch-state.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    errors: int = typer.Option(5, "--errors", min=0, help="How many recent errors to show."),
) -> int:
    """Whether a daemon is running; its counts, flags and last errors.

    Read from the ledger in --state-dir (or the one --config names); works while the daemon
    runs. Each daemon is alive, stale (no heartbeat for 30 s) or stopped (its process is
    gone). Results recorded but not written to the reports are listed too, and with the
    DICOM node its SRs and outbox.

    Exit status as an init script's status (LSB), for monitors: 0 running; 1 not running,
    state left behind (killed or hung); 3 not running (stopped cleanly, or never started).
    """
    if state_dir is None:
        if config is None:
            raise ConfigError("status: pass --state-dir DIR or --config FILE")
        state_dir = state_dir_of(config)
    data = collect(state_dir, errors)
    if as_json:
        console.print_json(json.dumps(data))
    else:
        _print(data)
    return int(data["exit_code"])


def _print(data: dict[str, Any]) -> None:
    out = console.print
    if "counts" not in data:  # no ledger
        out(f"not running: {data['reason']}", highlight=False, markup=False, soft_wrap=True)
        return
    c, f = data["counts"], data["flags"]
    out(f"files: {c['ok']} ok, {c['error']} error, {c['claimed']} in progress", highlight=False)
    flagged = ", ".join(f"{n} {flag}" for flag, n in sorted(f.items()) if flag != "none")
    out(f"flags of the ok results: {flagged}, {f['none']} not flagged", highlight=False)
    t = data["throughput_per_minute"]
    out(
        f"throughput: {t['last_minute']} in the last minute, "
        f"{round(t['last_hour_avg'] * 60)} in the last hour",
        highlight=False,
    )
    u = data["unreported"]
    if u["total"]:
        out(
            f"not in the reports yet: {u['total']} result(s), {u['held']} held back because "
            "their report could not be written",
            highlight=False,
        )
        for item in data["held_reports"]:
            out(
                f"  {item['file']}: {item['reason']}", highlight=False, markup=False, soft_wrap=True
            )
    for d in data["daemons"]:
        state = _STATE_TEXT[d["state"]].format(stale=STALE_AFTER_SECONDS)
        out(
            f"daemon pid {d['pid']} on {d['host']} watching {d['incoming']}: {state} "
            f"(heartbeat {d['heartbeat_age_s']} s ago)",
            highlight=False,
            markup=False,
            soft_wrap=True,  # one line per daemon, whatever the width
        )
    if not data["daemons"]:
        out("no daemon running on this state dir", highlight=False)
    dicom = data.get("dicom")
    if dicom is not None:
        from xrwatch.safetext import printable

        r = dicom["results"]
        out(
            f"dicom: {r['received']} instances received; SRs {r['written']} written, "
            f"{r['pending']} pending, {r['failed']} failed",
            highlight=False,
            soft_wrap=True,
        )
        for dest, n in dicom["destinations"].items():
            out(
                f"  outbox to {dest}: {n['sent']} sent, {n['pending']} pending, "
                f"{n.get('parked', 0)} parked, {n['failed_attempts']} failed attempts"
                + (f" (last error: {printable(n['last_error'])})" if n["last_error"] else ""),
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    if data["last_errors"]:
        out("last errors:", highlight=False)
        for item in data["last_errors"]:
            out(f"  {item['time']}  {item['file']}: {item['error']}", highlight=False, markup=False)
    out(f"status: {data['state']} (exit {data['exit_code']})", highlight=False)
