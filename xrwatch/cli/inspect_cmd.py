"""``xrwatch inspect``: decode files exactly as serving does and show what came out."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.markup import escape

from xrwatch import fields
from xrwatch.cli._app import EXIT_FAILED, EXIT_OK, app, console, err_console
from xrwatch.errors import ConfigError, ImageError
from xrwatch.inputs import expand_inputs
from xrwatch.logs import configure_logging
from xrwatch.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)


@dataclass
class Inspection:
    """What ``inspect`` found out about one file."""

    path: str
    ok: bool
    meta: dict[str, Any] = field(default_factory=dict)
    decode_ms: float | None = None
    stats: dict[str, float] = field(default_factory=dict)  # decoded min / max / mean
    preview: str | None = None
    error_type: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        meta = dict(self.meta)
        meta.pop("path", None)
        return {  # names from xrwatch.fields, as classify and the daemon use them
            fields.FILE: self.path,
            fields.STATUS: "ok" if self.ok else "error",
            **meta,
            "transfer_syntax_name": _syntax_name(meta.get("transfer_syntax")),
            "decode_ms": None if self.decode_ms is None else round(self.decode_ms, 3),
            **{k: round(v, 6) for k, v in self.stats.items()},
            "preview": self.preview,
            fields.ERROR_TYPE: self.error_type,
            fields.ERROR: self.reason,
        }


def _syntax_name(uid: str | None) -> str | None:
    if not uid:
        return None
    from pydicom.uid import UID

    name = UID(uid).name
    return None if name == uid else name


def _preview_path(directory: Path, source: Path, taken: set[str]) -> Path:
    stem, n = source.stem or "image", 1
    name = f"{stem}.png"
    while name in taken:  # two inputs with the same stem: keep both previews
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return directory / name


def write_preview(model_input: np.ndarray, dest: Path) -> None:
    """Write a model input in [0, 1] as an 8-bit grayscale PNG."""
    from PIL import Image

    grey = np.rint(np.clip(model_input, 0.0, 1.0) * 255.0).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(dest)


def inspect_file(path: Path, spec: PreprocessSpec, preview: Path | None = None) -> Inspection:
    """Decode ``path`` as serving does (:func:`xrwatch.preprocess.load_model_input`)."""
    from xrwatch.imageio import read_image

    start = time.perf_counter()
    try:
        decoded = read_image(path, min_side=spec.min_decode_side)
    except ImageError as exc:
        return Inspection(str(path), False, error_type=type(exc).__name__, reason=exc.reason)
    elapsed = (time.perf_counter() - start) * 1000.0
    px = decoded.pixels
    result = Inspection(
        str(path),
        True,
        meta=decoded.meta.to_dict(),
        decode_ms=elapsed,
        stats={"min": float(px.min()), "max": float(px.max()), "mean": float(px.mean())},
    )
    if preview is not None:
        try:
            write_preview(spec.apply(px), preview)
        except OSError as exc:
            result.ok, result.error_type = False, "ReportWriteError"
            result.reason = f"preview {preview} could not be written: {exc.strerror or exc}"
        else:
            result.preview = str(preview)
    return result


def _table(item: Inspection) -> Any:
    from rich.table import Table

    # file names and reasons are escaped: rich would take [brackets] in them for markup
    table = Table(title=escape(item.path), title_justify="left", show_header=False, min_width=60)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    if not item.ok and not item.meta:
        table.add_row("status", f"[red]failed: {item.error_type}[/]")
        table.add_row("reason", escape(item.reason or ""))
        return table
    m = item.meta
    size = f"{m['width']} x {m['height']}"
    if (m["decoded_width"], m["decoded_height"]) != (m["width"], m["height"]):
        how = "draft mode" if m["kind"] == "jpeg" else "reduced resolution"  # JPEG 2000
        size += f"  (decoded at {m['decoded_width']} x {m['decoded_height']}, {how})"
    ts = m.get("transfer_syntax")
    rows = [
        ("status", "ok" if item.ok else f"[red]failed: {item.error_type}[/]"),
        ("format", f"{m['kind'].upper()}  {m['source_mode']}".rstrip()),
        ("size", size),
        ("modality", m.get("modality") or "-"),
        ("photometric", m.get("photometric") or "-"),
        ("transfer syntax", f"{ts}  {_syntax_name(ts) or ''}".rstrip() if ts else "-"),
        ("body part / view", f"{m.get('body_part') or '-'} / {m.get('view_position') or '-'}"),
        ("decode", f"{item.decode_ms:.1f} ms"),
        ("decoded min/max/mean", "{min:.3f} / {max:.3f} / {mean:.3f}".format(**item.stats)),
    ]
    if item.preview:
        rows.append(("preview", escape(item.preview)))
    if item.reason:
        rows.append(("reason", escape(item.reason)))
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command("inspect")
def inspect_command(
    files: list[Path] = typer.Argument(
        ...,
        help="Image files (DICOM, PNG, JPEG) or folders.",
        readable=False,  # an unreadable file is reported with its reason, not a usage error
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list instead of tables."),
    preview: Path | None = typer.Option(
        None,
        "--preview",
        help="Write DIR/<file stem>.png: the model-input image as an 8-bit PNG.",
        metavar="DIR",
    ),
    size: int = typer.Option(
        PreprocessSpec().size, "--size", help="Model input size for decoding and previews."
    ),
    aspect: str = typer.Option("stretch", "--aspect", help="stretch or pad (letterbox)."),
    log_level: str = typer.Option("WARNING", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
) -> int:
    """Decode files as the model sees them and show what came out.

    For each file: format, size, DICOM attributes, decode time and the decoded
    min/max/mean; --preview also writes the model-input image. Exit 1 if any file
    failed, each failure with its reason.
    """
    configure_logging(log_level)
    spec = PreprocessSpec(size=size, aspect=aspect)  # type: ignore[arg-type]  # validated
    paths = expand_inputs(files)
    if not paths:
        raise ConfigError(f"no files found under {', '.join(str(p) for p in files)}")
    if preview is not None:
        try:
            preview.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--preview {preview}: cannot create it: {exc}") from None
    import pydicom.pixels  # noqa: F401  (so the first file's time is not import time)

    taken: set[str] = set()
    results = [
        inspect_file(p, spec, _preview_path(preview, p, taken) if preview else None) for p in paths
    ]
    failed = [r for r in results if not r.ok]
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            console.print(_table(r))
        console.print(f"{len(results)} file(s), {len(failed)} failed")
    for r in failed:
        err_console.print(f"[red]failed:[/] {escape(f'{r.path}: {r.reason}')}", highlight=False)
    return EXIT_FAILED if failed else EXIT_OK
