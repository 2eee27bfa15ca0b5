"""The typer application; exit codes are decided here, in one place."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

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
console = Console()
err_console = Console(stderr=True)

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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    from xrwatch.cli import commands  # noqa: F401  (registers the commands)

    try:
        result = app(args=argv, standalone_mode=False)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return EXIT_INTERRUPTED
    except XRWatchError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return EXIT_ERROR
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_ERROR
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show(file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return EXIT_INTERRUPTED
        raise
    return int(result) if isinstance(result, int) else EXIT_OK
