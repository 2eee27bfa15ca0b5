"""Messages are never hard-wrapped: a path in an error stays on one line, however long.

Piped stderr (journald, log parsers, these tests) must not depend on the length of the
folder the repository or the temporary directory sits in.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xrwatch.cli._app import EXIT_ERROR, main

ROOT = Path(__file__).resolve().parents[2]


def _deep(base: Path, length: int) -> Path:
    """A folder under ``base`` whose path is ``length`` characters long (words and spaces,
    so that a wrapping printer has places to break)."""
    path = base
    while len(str(path / "a long folder")) < length - 2:
        path = path / "a long folder"
    path = path / ("x" * (length - len(str(path)) - 1))
    assert len(str(path)) == length
    return path


@pytest.mark.parametrize("length", range(60, 261, 9))
def test_error_with_a_long_path_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], length: int
) -> None:
    folder = _deep(tmp_path, max(length, len(str(tmp_path)) + 14))
    assert main(["status", "--config", str(folder / "x.toml")]) == EXIT_ERROR
    err = capsys.readouterr().err
    expected = f"error: {folder / 'x.toml'}: config file not found"
    assert expected in err.splitlines(), err
    assert main(["status", "--state-dir", str(folder)]) == 3  # not running: said on stdout
    out = capsys.readouterr().out
    assert f"not running: no ledger here ({folder / 'ledger.sqlite3'})" in out.splitlines()[0]


def test_serve_start_up_error_with_a_path_over_200_characters_is_one_line(
    tmp_path: Path, tiny_onnx_model: Path
) -> None:
    base = _deep(tmp_path, len(str(tmp_path)) + 220)
    incoming = base / "incoming"
    incoming.mkdir(parents=True)
    result = subprocess.run(
        [
            sys.executable, "-m", "xrwatch", "serve", str(incoming), "--model",
            str(tiny_onnx_model), "--reports", str(incoming / "reports"), "--once",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == EXIT_ERROR, result.stderr
    message = (
        f"{incoming / 'reports'}: the reports must be outside INCOMING ({incoming}); "
        "otherwise the daemon would watch its own output"
    )
    assert any(message in line for line in result.stderr.splitlines()), result.stderr
