"""Configs that parse but cannot run (#21 item 6), against a real ``xrwatch serve --once``.

Each exits 2 with one line on stderr that names the value or the file, before anything is
read, moved or written: numbers that are not finite or out of range (``nan`` passes every
comparison; ``inf`` makes ``--once`` wait for ever), folders that are ``/``, INCOMING,
REPORTS or a folder above them (an archive at ``/`` moved inputs to ``/processed``), and
config files that cannot be read as a config (not UTF-8, a pipe with no writer, too large)
instead of a traceback, a hang or a read without end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_harness import ROOT, make_png

TIMEOUT = 90  # seconds: on a config that cannot run, serve used to hang


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "xrwatch", "serve", "--once", *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"xrwatch serve {' '.join(args)} still running after {TIMEOUT} s")


def _refused(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The one stderr line of a run that exited 2; it holds every fragment."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def setup(tmp_path: Path, tiny_onnx_model: Path) -> dict[str, Path]:
    incoming, reports = tmp_path / "site" / "incoming", tmp_path / "site" / "reports"
    make_png(incoming / "a.png", seed=1)
    return {"incoming": incoming, "reports": reports, "model": tiny_onnx_model, "tmp": tmp_path}


def _config(where: dict[str, Path], body: str) -> Path:
    path = where["tmp"] / "xrwatch.toml"
    path.write_text(
        "[serve]\n"
        f'incoming = "{where["incoming"]}"\nmodel = "{where["model"]}"\n'
        f'reports = "{where["reports"]}"\n{body}\n'
    )
    return path


def _untouched(where: dict[str, Path]) -> None:
    assert (where["incoming"] / "a.png").is_file()
    assert not (where["reports"] / "predictions.csv").exists()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("stable_seconds = nan", "stable_seconds must be a finite number"),
        ("max_wait = inf", "max_wait must be a finite number"),
        ("truncated_timeout = -inf", "truncated_timeout must be a finite number"),
        ("low_confidence = nan", "low_confidence must be a finite number"),
        ("batch_size = 100000", "batch_size must be in [1, 1024]"),
        ("workers = 100000", "workers must be in [1, 64]"),
        ("max_file_mb = 9999999", "max_file_mb must be in [1, 65536]"),
        ("lease_seconds = 1.0", "lease_seconds must be in [10, 86400]"),
        ("stable_seconds = 1e300", "stable_seconds must be in (0, 3600]"),
        ("max_wait = 1e9", "max_wait must be in [0, 3600]"),
    ],
)
def test_numbers_that_cannot_run_exit_2(setup: dict[str, Path], body: str, fragment: str) -> None:
    config = _config(setup, body)
    _refused(_serve("--config", str(config)), str(config), fragment)
    _untouched(setup)


def test_nan_on_the_command_line_exits_2(setup: dict[str, Path]) -> None:
    result = _serve(
        str(setup["incoming"]), "--model", str(setup["model"]), "--reports",
        str(setup["reports"]), "--stable-seconds", "nan",
    )  # fmt: skip
    _refused(result, "stable_seconds must be a finite number")
    _untouched(setup)


@pytest.mark.parametrize(
    ("key", "where", "fragment"),
    [
        ("archive", "/", "the archive cannot be the root folder"),
        ("archive", "site", "the archive cannot be a folder above INCOMING"),
        ("archive", "reports", "the archive cannot be REPORTS itself"),
        ("archive", "incoming", "the archive must be outside INCOMING"),
        ("state_dir", "/", "the state dir cannot be the root folder"),
        ("state_dir", "reports", "the state dir cannot be REPORTS itself"),
        ("state_dir", "tmp", "the state dir cannot be a folder above INCOMING"),
        ("reports", "/", "the reports cannot be the root folder"),
        ("reports", "site", "the reports cannot be a folder above INCOMING"),
    ],
)
def test_folders_that_are_root_incoming_reports_or_above_exit_2(
    setup: dict[str, Path], key: str, where: str, fragment: str
) -> None:
    paths = {
        "/": Path("/"),
        "site": setup["incoming"].parent,
        "tmp": setup["tmp"],
        "reports": setup["reports"],
        "incoming": setup["incoming"],
    }
    if key == "reports":  # the reports key is in the config already: give it on the CLI
        args = ["--config", str(_config(setup, "")), "--reports", str(paths[where])]
    else:
        args = ["--config", str(_config(setup, f'{key} = "{paths[where]}"'))]
    if where == "/":  # nothing may be tried there: an empty INCOMING, so even a run that
        (setup["incoming"] / "a.png").unlink()  # wrongly starts moves nothing into /
    _refused(_serve(*args), fragment)
    assert not (setup["incoming"].parent / "processed").exists()
    assert not (setup["tmp"] / "processed").exists()
    if where != "/":
        _untouched(setup)


def test_an_archive_beside_incoming_still_works(setup: dict[str, Path]) -> None:
    archive = setup["incoming"].parent / "archive"
    result = _serve("--config", str(_config(setup, f'archive = "{archive}"')))
    assert result.returncode == 0, result.stderr
    assert (archive / "processed" / "a.png").is_file()


def test_a_config_file_that_is_not_utf8_exits_2(setup: dict[str, Path]) -> None:
    config = _config(setup, "")
    config.write_bytes(config.read_bytes() + b"# caf\xe9 \xff\n")
    _refused(_serve("--config", str(config)), str(config), "not UTF-8", "line 6")
    _untouched(setup)


def test_a_config_fifo_with_no_writer_exits_2(setup: dict[str, Path]) -> None:
    fifo = setup["tmp"] / "endless.toml"
    os.mkfifo(fifo)
    _refused(_serve("--config", str(fifo)), str(fifo), "not a regular file")


def test_a_config_folder_exits_2(setup: dict[str, Path]) -> None:
    _refused(_serve("--config", str(setup["tmp"])), str(setup["tmp"]), "a folder")


def test_a_config_file_without_end_exits_2(setup: dict[str, Path]) -> None:
    """Larger than any config (here valid TOML: 2 MiB of comments), so never read whole."""
    config = _config(setup, "")
    with config.open("a") as fh:
        line = "# " + "x" * 1021 + "\n"
        fh.write(line * 2048)
    _refused(_serve("--config", str(config)), str(config), "over 1024 KiB")
    _untouched(setup)
