"""Exit codes are decided in one place: 0 ok, 1 some inputs failed, 2 usage/config, 130 ^C."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xrwatch.cli import doctor_cmd
from xrwatch.cli._app import EXIT_ERROR, EXIT_INTERRUPTED, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no-such-command"], "No such command"),
        (["classify"], "Missing argument"),
        (["classify", "x.png", "-m", "m.onnx", "--batch-size", "0"], "--batch-size"),
        (["inspect", "--preview"], "requires an argument"),
        (["doctor", "--no-such-option"], "No such option"),
        (["doctor", "--no-cuda", "--log-level", "bogus"], "log level 'bogus'"),
    ],
)
def test_usage_errors_exit_2_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_config_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--config", str(tmp_path / "missing.toml")]) == EXIT_ERROR
    assert "missing.toml: config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("raised", [KeyboardInterrupt, __import__("typer").Abort])
def test_interrupt_exits_130(
    raised: type[BaseException], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(**_: object) -> list[doctor_cmd.Check]:
        raise raised()

    monkeypatch.setattr(doctor_cmd, "collect_checks", interrupted)
    assert main(["doctor", "--no-cuda"]) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


def test_console_script_usage_error_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xrwatch", "classify"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == EXIT_ERROR, result.stderr
    assert "Missing argument" in result.stderr and "Traceback" not in result.stderr


def test_error_message_keeps_brackets_in_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "[bold]state"
    assert main(["status", "--state-dir", str(state)]) == 3  # LSB: not running
    assert f"no ledger here ({state}/ledger.sqlite3)" in capsys.readouterr().out.replace("\n", "")


def test_bare_command_prints_help_and_exits_2_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xrwatch"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == EXIT_ERROR, result.stderr
    assert "Usage" in result.stdout and "Commands" in result.stdout
    assert "Traceback" not in result.stderr and "Error" not in result.stderr
