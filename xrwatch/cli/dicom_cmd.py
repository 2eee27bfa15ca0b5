"""``xrwatch dicom-echo``: check a DICOM peer (a PACS, or xrwatch's own receiver)."""

from __future__ import annotations

import logging
import time

import typer

from xrwatch.cli._app import EXIT_FAILED, EXIT_OK, app, console


@app.command("dicom-echo")
def dicom_echo(
    peer: str = typer.Argument(..., help="The peer as AE@host:port, e.g. PACS@10.0.0.5:104."),
    ae_title: str = typer.Option(
        "XRWATCH", "--ae-title", help="Our calling AE title (the one the peer allows)."
    ),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for each answer."),
) -> int:
    """Send a C-ECHO to a DICOM peer; exit 0 if it answers, 1 if not.

    For installers: checks the network path, the port and that the peer accepts our AE
    title, before any image or result travels.
    """
    from xrwatch.dicom.sender import echo
    from xrwatch.dicom.settings import check_ae_title, parse_destination

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the outcome is printed below
    dest = parse_destination(peer, "peer")
    calling = check_ae_title(ae_title, "--ae-title")
    t0 = time.perf_counter()
    ok, detail = echo(dest, calling, timeout)
    ms = (time.perf_counter() - t0) * 1000
    console.print(f"{dest} (as {calling}): {detail} in {ms:.0f} ms", highlight=False, markup=False)
    raise typer.Exit(EXIT_OK if ok else EXIT_FAILED)
