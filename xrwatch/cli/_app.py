"""The typer application; exit codes are decided here, in one place."""

from __future__ import annotations

import logging
import sys

import typer
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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    from xrwatch.cli import commands  # noqa: F401  (registers the commands)

    try:
        result = app(args=argv, standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):  # Abort: EOF at a prompt, or Ctrl-C in old typer
        err_console.print("interrupted")
        return EXIT_INTERRUPTED
    except XRWatchError as exc:
        # escaped: file names may hold [brackets] that rich would take for markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return EXIT_ERROR
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except _USAGE_ERROR as exc:  # unknown command or option, bad value, missing argument
        exc.show(file=sys.stderr)  # type: ignore[attr-defined]
        return EXIT_ERROR
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_ERROR
    if result == EXIT_INTERRUPTED:  # newer typer returns 130 itself on Ctrl-C
        err_console.print("interrupted")
    return int(result) if isinstance(result, int) else EXIT_OK
