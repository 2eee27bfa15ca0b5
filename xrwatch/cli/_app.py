"""The typer application; exit codes are decided here, in one place."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import typer
import typer.main
from rich.console import Console
from rich.markup import escape

from xrwatch import __version__
from xrwatch.errors import XRWatchError

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="xrwatch",
    help=(
        "Chest X-ray classification: reproduce the study's training, export to ONNX, and "
        "serve a folder-watching daemon. Research use only - not a medical device."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: rich never inserts line breaks into printed text (a terminal still wraps it
# for the eye). Piped output, journald and log parsers get one message per line, whatever
# the length of the paths in it; tables still lay out to the console's width.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran, some inputs failed
EXIT_ERROR = 2  # usage or configuration error; the command could not run
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def progress(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A progress bar over ``total`` items while the block runs, on a terminal only (never
    into a pipe, a file or the journal); yields ``advance(n)``. Output printed meanwhile
    appears above the bar, which goes away at the end."""
    if total < 2 or not (console.is_terminal and err_console.is_terminal):
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
        console=console, transient=True,
    )  # fmt: skip
    with bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"xrwatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """xrwatch command-line interface."""


# The exception class behind typer's usage errors: click's, or the copy of click that
# newer typer releases vendor (where ``import click`` fails). Found through typer itself,
# so it is the class typer really raises even when some other click is installed.
_USAGE_ERROR: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


def _json_errors(argv: list[str] | None) -> bool:
    """Whether the command line asks for JSON logs (looked at without parsing it: the error
    may be that it does not parse). ``serve`` reports its own errors when the format comes
    from its config file."""
    args = sys.argv[1:] if argv is None else argv
    pairs = pairwise(args)  # each argument with the next; none when bare
    return "--log-format=json" in args or ("--log-format", "json") in pairs


def _report(message: str, argv: list[str] | None, *, error_type: str = "") -> None:
    """An error that ends the command, on stderr in the format the logs use.

    With ``--log-format json`` it is one JSON log record, so that every stderr line of a
    JSON-logging daemon parses; otherwise one plain line, with journald's error priority
    prefix when stderr is the journal.
    """
    from xrwatch import logs

    if _json_errors(argv):
        log_json_error(message, error_type)
        return
    prefix = "<3>" if logs.stderr_is_journal() else ""
    # escaped: file names may hold [brackets] that rich would take for markup
    err_console.print(f"{prefix}[bold red]error:[/] {escape(message)}", highlight=False)


def log_json_error(message: str, error_type: str = "") -> None:
    """One JSON record at level error on stderr, whatever logging was set up before."""
    from xrwatch.logs import JournalFormatter, JsonFormatter, stderr_is_journal

    record = logging.makeLogRecord(
        {"name": "xrwatch", "levelno": logging.ERROR, "levelname": "ERROR", "msg": message}
    )
    if error_type:
        record.error_type = error_type
    formatter = JournalFormatter(JsonFormatter()) if stderr_is_journal() else JsonFormatter()
    sys.stderr.write(formatter.format(record) + "\n")
    sys.stderr.flush()


_LIST_ITEM = re.compile(r"^(\s|[*\u2022-] |\d+[.)] )")


def reflow(text: str) -> str:
    """A docstring as help: each paragraph one line, which the terminal's width then wraps
    (typer keeps the docstring's line breaks, so help broke lines mid-sentence). List items
    and indented lines keep their own line; a paragraph starting with ``\\b`` is kept."""
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        if paragraph.startswith("\b"):
            paragraphs.append(paragraph)
            continue
        lines: list[str] = []
        for line in paragraph.split("\n"):
            if lines and not _LIST_ITEM.match(line):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _tidy(command: Any) -> None:
    """Reflowed help, and no type column (``<bool>``) on flags, for a command and its
    subcommands."""
    if command.help:
        command.help = reflow(command.help)
    params = list(command.params)
    help_option = command.get_help_option(typer.Context(command))
    for param in [*params, *([help_option] if help_option is not None else [])]:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _tidy(sub)


def cli_command() -> Any:
    """The click command behind :data:`app`, every command registered and its help tidied."""
    from xrwatch.cli import commands  # noqa: F401  (registers the commands)

    command = typer.main.get_command(app)
    _tidy(command)
    return command


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    try:
        result = cli_command()(args=argv, standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):  # Abort: EOF at a prompt, or Ctrl-C in old typer
        err_console.print("interrupted")
        return EXIT_INTERRUPTED
    except XRWatchError as exc:
        _report(str(exc), argv, error_type=type(exc).__name__)
        return EXIT_ERROR
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except _USAGE_ERROR as exc:  # unknown command or option, bad value, missing argument
        if _json_errors(argv):
            _report(f"usage: {exc.format_message()}", argv)  # type: ignore[attr-defined]
        else:
            exc.show(file=sys.stderr)  # type: ignore[attr-defined]
        return EXIT_ERROR
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_ERROR
    if result == EXIT_INTERRUPTED:  # newer typer returns 130 itself on Ctrl-C
        err_console.print("interrupted")
    return int(result) if isinstance(result, int) else EXIT_OK
