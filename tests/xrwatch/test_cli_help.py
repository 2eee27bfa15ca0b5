"""Every command's ``--help`` reads well: a one-line summary, and help on every option."""

from __future__ import annotations

import inspect

import pytest
import typer.main

from xrwatch.cli import commands  # noqa: F401  (registers the commands)
from xrwatch.cli._app import app, main

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)  # type: ignore[attr-defined]


def test_every_command_is_listed() -> None:
    assert {"classify", "demo", "doctor", "export", "inspect", "serve", "status"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_summary_is_one_line(name: str) -> None:
    command = GROUP.commands[name]  # type: ignore[attr-defined]
    text = inspect.cleandoc(command.help or "")
    summary = text.split("\n\n")[0]
    assert summary, f"{name}: no help text"
    assert "\n" not in summary, f"{name}: the summary is hard-wrapped: {summary!r}"
    assert len(summary) <= 70, f"{name}: the summary is too long for the command list"
    assert "\\[" not in text, f"{name}: a rich escape shows literally without rich"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name: str) -> None:
    command = GROUP.commands[name]  # type: ignore[attr-defined]
    for param in command.params:
        help_text = getattr(param, "help", None)
        assert help_text, f"{name} {param.opts}: no help text"
        assert "\\[" not in help_text and "[" not in help_text.replace("[default", ""), (
            f"{name} {param.opts}: square brackets are read as rich markup and vanish"
        )


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_exits_0(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([name, "--help"] if name else ["--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage" in out


def test_train_help_names_xrwatchs_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    """Settings the study does not state are called xrwatch's, never the study's."""
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "xrwatch's assumptions where it states nothing" in out
    assert "study: 224" not in out and "study: 32" not in out
    assert "Global batch size" in out


@pytest.mark.parametrize("name", COMMANDS)
def test_help_wraps_to_the_terminal_and_shows_no_bool(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each paragraph of the description is wrapped by the terminal's width, not broken
    where the docstring's source lines end; flags show no ``<bool>`` type."""
    monkeypatch.setenv("COLUMNS", "2000")
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out
    lines = [line.strip(" │") for line in out.splitlines()]
    command = GROUP.commands[name]  # type: ignore[attr-defined]
    for paragraph in inspect.cleandoc(command.help or "").split("\n\n")[1:]:
        if any(line.lstrip().startswith(("* ", "- ", "\b")) for line in paragraph.splitlines()):
            continue  # a list keeps its lines
        text = " ".join(paragraph.split())
        assert any(text in line for line in lines), f"{name}: paragraph broken: {text[:60]!r}"
