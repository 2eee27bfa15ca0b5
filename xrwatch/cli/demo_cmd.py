"""``xrwatch demo``: the whole pipeline in two minutes, with no data and no GPU.

First, torch-free: the model shipped with xrwatch (:mod:`xrwatch.defaults`) classifies the
real sample chest X-rays shipped in ``xrwatch/samples/<Class>/`` (CC BY, see their
``ATTRIBUTION.md``), printed beside their true labels. Then, unless ``--no-synthetic``,
in a temporary folder: a small synthetic dataset (``training.synth``), a brief training of
the small ``tinycnn`` (``training.engine.train``), a verified ONNX export
(``export.pipeline.export_model``), then the folder daemon on a demo inbox into which
sample DICOM and PNG files and one bad file are dropped; predictions are shown as the
daemon writes them, and the daemon is stopped cleanly. Needs the ``train`` extra (torch).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

from xrwatch.cli._app import app, console
from xrwatch.errors import ConfigError, XRWatchError, require_extra
from xrwatch.metrics_ci import coverage_note

logger = logging.getLogger(__name__)

DEMO_IMAGE_SIZE = 64  # synthetic images and model input, pixels
DEMO_SCALE = 0.05  # of the real dataset's 5,910 images: ~300
DEMO_EPOCHS = 6
# Everything the demo creates in its folder; --no-keep removes these and nothing else.
DEMO_ENTRIES = ("data", "runs", "model.onnx", "model.md", "inbox", "reports", "tmp.dcm", "tmp.png")


def _write_demo_dicom(path: Path, pixels: np.ndarray, n: int) -> None:
    """A minimal DX DICOM (8-bit MONOCHROME2) with made-up UIDs and a dummy patient name,
    which the reports must not show."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.AccessionNumber = f"DEMO{n:04d}"
    ds.PatientName = "Demo^Synthetic"
    ds.PatientID = "DEMO-NOT-A-PATIENT"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 128, 256  # full 8-bit range, as the PNG/JPEG path reads it
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _drop(src_bytes: bytes, inbox: Path, rel: str) -> None:
    """Write under a temporary name, then rename: how a well-behaved sender delivers."""
    final = inbox / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".part")
    tmp.write_bytes(src_bytes)
    os.replace(tmp, final)


def _samples(data: Path, per_class: int) -> list[tuple[Path, str]]:
    """Test images of the synthetic dataset with their true class (from its CSV)."""
    from xrwatch_training.labels import fine_label, task_label

    out: dict[str, list[Path]] = {}
    with (data / "Chest_xray_Corona_Metadata.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            fine = fine_label(
                row["Label"], row["Label_1_Virus_category"], row["Label_2_Virus_category"]
            )
            label = task_label(fine, "multiclass") if fine else None
            if label is None:
                continue
            folder = data / row["Dataset_type"].lower()
            if row["Dataset_type"] == "TEST" or label == "COVID-19":
                out.setdefault(label, []).append(folder / row["X_ray_image_name"])
    picked: list[tuple[Path, str]] = []
    for label in sorted(out):
        picked.extend((p, label) for p in out[label][-per_class:])
    return picked


SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"


def real_samples() -> list[tuple[Path, str]]:
    """The shipped sample X-rays with their true labels (the folder name)."""
    from xrwatch.inputs import expand_inputs

    if not SAMPLES_DIR.is_dir():
        return []
    return [(p, p.parent.name) for p in expand_inputs([SAMPLES_DIR]) if p.suffix != ".md"]


def run_real_demo() -> int:
    """Classify the shipped real samples with the shipped default model; 0 when it ran."""
    from xrwatch import defaults
    from xrwatch.engine import InferenceEngine

    shipped = defaults.default_model()
    samples = real_samples()
    if shipped is None or not samples:
        console.print("[yellow]no default model or no sample X-rays shipped: skipping the "
                      "real-image part[/]")  # fmt: skip
        return 1
    t0 = time.monotonic()
    engine = InferenceEngine(shipped, use_gpu=False)
    predictions = engine.predict_paths([p for p, _ in samples])
    console.print(
        f"[bold]real chest X-rays[/] ({len(samples)} CC BY samples in {SAMPLES_DIR}, "
        f"never seen in training) with the shipped model {engine.meta.name} "
        f"(sha256 {engine.model_sha256[:12]}, card {defaults.DEFAULT_CARD}):",
        soft_wrap=True,
    )
    right = 0
    for (path, truth), pred in zip(samples, predictions, strict=True):
        if not pred.ok:
            console.print(f"   [red]![/] {path.name:<34} error: {pred.error}", markup=False)
            continue
        right += pred.label == truth
        mark = "[green]✓[/]" if pred.label == truth else "[yellow]✗[/]"
        console.print(
            f"   {mark} {path.name:<34} predicted {pred.label:<9} p={pred.confidence:.2f}"
            f"   (true: {truth})",
            highlight=False,
        )
    console.print(
        f"   {right}/{len(samples)} right  [{time.monotonic() - t0:.1f} s]. A handful of images "
        "proves nothing about accuracy: see the model card for measured figures with CIs.",
        soft_wrap=True,
    )
    return 0


def prepare_workdir(workdir: Path | None) -> tuple[Path, bool]:
    """The demo's folder and whether the demo created it.

    A folder that already holds something is refused: the demo would mix its files with
    the user's, and ``--no-keep`` must never remove what the demo did not create.
    """
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="xrwatch-demo-")), True
    if workdir.exists() or workdir.is_symlink():
        if not workdir.is_dir():
            raise ConfigError(f"{workdir}: --workdir must be a folder, found a file")
        if any(workdir.iterdir()):
            raise ConfigError(
                f"{workdir}: --workdir is not empty; the demo needs a new or empty folder "
                "so that its files are not mixed with yours"
            )
        return workdir, False
    workdir.mkdir(parents=True)
    return workdir, True


def remove_demo_files(work: Path, created: bool) -> None:
    """Remove what the demo created in ``work`` (:data:`DEMO_ENTRIES`), nothing else; and
    ``work`` itself only if the demo created it and it is empty now."""
    for name in DEMO_ENTRIES:
        path = work / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_symlink() or path.exists():
            path.unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            work.rmdir()  # fails, keeping it, if anything else is in it


def _step(n: int, text: str) -> None:
    console.print(f"[bold cyan]{n}.[/] {text}", soft_wrap=True)


@app.command()
def demo(
    workdir: Path | None = typer.Option(
        None,
        "--workdir",
        help="A new or empty folder to work in (default: a new temporary folder).",
    ),
    epochs: int = typer.Option(DEMO_EPOCHS, "--epochs", help="Training epochs."),
    keep: bool = typer.Option(
        True,
        "--keep/--no-keep",
        help="Keep the demo's files afterwards (--no-keep removes only what the demo created).",
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show INFO logs of every step."),
    synthetic: bool = typer.Option(
        True,
        "--synthetic/--no-synthetic",
        help="After the real X-rays, also train, export and serve on synthetic data.",
    ),
) -> int:
    """Classify real sample X-rays, then run the pipeline on synthetic data.

    First the shipped default model classifies a few real chest X-rays shipped with
    xrwatch (predictions beside true labels; serving install is enough). Then, unless
    --no-synthetic, in a temporary folder with no data and no GPU: make a small synthetic
    dataset, train and export a small model, start the daemon on an inbox, drop sample
    files into it and show the predictions as they arrive (needs the train extra).
    """
    from xrwatch.logs import configure_logging

    configure_logging("INFO" if verbose else "ERROR")
    real_code = run_real_demo()
    if not synthetic:
        raise typer.Exit(real_code)
    require_extra("train", "torch", "torchvision", "onnx", "sklearn", "matplotlib")
    work, created = prepare_workdir(workdir)
    t_start = time.monotonic()
    console.print(
        f"[bold]xrwatch demo[/] in {work}  (synthetic data; research use only, "
        "not a medical device)",
        soft_wrap=True,
    )
    try:
        code = _run(work, epochs, keep)
    finally:
        if not keep:
            remove_demo_files(work, created)
    console.print(f"done in {time.monotonic() - t_start:.0f} s")
    raise typer.Exit(code)


def _run(work: Path, epochs: int, keep: bool) -> int:
    from PIL import Image

    from xrwatch.serve.config import ServeConfig
    from xrwatch.serve.daemon import Daemon
    from xrwatch_export.pipeline import ExportOptions, export_model
    from xrwatch_training.engine import train
    from xrwatch_training.presets import experiment_config
    from xrwatch_training.synth import write_synthetic

    t0 = time.monotonic()
    data = work / "data"
    counts = write_synthetic(data, scale=DEMO_SCALE, image_size=DEMO_IMAGE_SIZE, seed=0)
    _step(1, f"synthetic dataset: {counts['TRAIN']} train + {counts['TEST']} test images "
             f"({DEMO_IMAGE_SIZE} px) in {data}  [{time.monotonic() - t0:.0f} s]")  # fmt: skip

    t0 = time.monotonic()
    cfg = experiment_config(
        "custom",
        {
            "data": str(data), "arch": "tinycnn", "weights": "none", "epochs": epochs,
            "image_size": DEMO_IMAGE_SIZE, "batch_size": 32, "out": str(work / "runs"),
            "name": "demo", "device": "cpu", "progress": False, "seed": 0,
        },
    )  # fmt: skip
    run_dir = train(cfg)
    _step(2, f"trained tinycnn for {epochs} epochs: {run_dir}  [{time.monotonic() - t0:.0f} s]")

    t0 = time.monotonic()
    model = work / "model.onnx"
    result = export_model(ExportOptions(source=run_dir / "best.pt", output=model))
    metrics: dict[str, Any] = result.meta.metrics.get("test") or {}
    bal = metrics.get("balanced_accuracy")
    covers = coverage_note(metrics, result.meta.classes)
    _step(3, f"exported and verified {model} (classes {', '.join(result.meta.classes)}; "
             f"test balanced accuracy {bal:.2f}{covers})  [{time.monotonic() - t0:.0f} s]"
             if isinstance(bal, float) else f"exported and verified {model}")  # fmt: skip

    inbox, reports = work / "inbox", work / "reports"
    inbox.mkdir(exist_ok=True)
    config = ServeConfig(
        incoming=inbox, model=model, reports=reports, stable_seconds=0.5, max_wait=0.2,
        rescan_interval=5.0, log_level="ERROR",
    )  # fmt: skip
    daemon = Daemon(config)
    codes: list[int] = []
    errors: list[BaseException] = []

    def run_daemon() -> None:
        try:
            codes.append(daemon.run())
        except BaseException as exc:  # shown to the user below
            errors.append(exc)
            daemon.ready.set()

    thread = threading.Thread(target=run_daemon, name="xrwatch-demo-daemon")
    thread.start()
    daemon.ready.wait(120)
    if errors:
        thread.join()
        raise errors[0]
    _step(4, f"daemon watching {inbox} (provider {daemon.engine.provider}); "
             f"reports in {reports}")  # fmt: skip

    truth: dict[str, str] = {}
    for n, (src, label) in enumerate(_samples(data, per_class=2)):
        pixels = np.asarray(Image.open(src).convert("L"))
        if n % 2 == 0:
            rel = f"study-{n // 2 + 1:04d}/image{n:02d}.dcm"
            tmp = work / "tmp.dcm"
            _write_demo_dicom(tmp, pixels, n)
            _drop(tmp.read_bytes(), inbox, rel)
            tmp.unlink()
        else:
            rel = f"image{n:02d}.png"
            buf = work / "tmp.png"
            Image.fromarray(pixels).save(buf)
            _drop(buf.read_bytes(), inbox, rel)
            buf.unlink()
        truth[rel] = label
    _drop(b"Dear radiology, this is a text file.\n", inbox, "not-an-xray.png")
    truth["not-an-xray.png"] = "-"
    _step(5, f"dropped {len(truth) - 1} X-rays (DICOM and PNG) and one bad file; predictions:")

    shown: set[str] = set()
    deadline = time.monotonic() + 60
    csv_path = reports / "predictions.csv"
    while len(shown) < len(truth) and time.monotonic() < deadline and thread.is_alive():
        rows = []
        if csv_path.exists():
            with csv_path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        for row in rows:
            if row["file"] in shown:
                continue
            shown.add(row["file"])
            expected = truth.get(row["file"], "?")
            if row["status"] == "ok":
                mark = "[green]✓[/]" if row["label"] == expected else "[yellow]✗[/]"
                console.print(
                    f"   {mark} {row['file']:<28} {row['label']:<9} "
                    f"p={float(row['confidence']):.2f}   (true: {expected})",
                    highlight=False,
                )
            else:
                console.print(f"   [red]![/] {row['file']:<28} error: ", end="", highlight=False)
                console.print(row["error"], markup=False, highlight=False)
        time.sleep(0.1)

    daemon.request_stop()
    thread.join(60)
    if errors:
        raise errors[0]
    missing = sorted(set(truth) - shown)
    if missing or codes != [0]:
        raise XRWatchError(
            f"the demo daemon did not report {missing or 'cleanly'} (exit {codes}); see {reports}"
        )
    _step(6, "daemon stopped cleanly (finished its batch, flushed the reports)")
    if not keep:
        console.print("(the demo's files are removed now; --keep keeps them to look at)")
        return 0
    console.print(
        "\nNext: look at the demo's reports, then use the shipped model (not the demo's toy "
        "model, which only learnt synthetic shapes) on X-rays of your own:\n"
        f"  cat {csv_path}\n"
        "  xrwatch classify XRAYS/                         # a folder of DICOM, PNG, JPEG\n"
        "  xrwatch serve INCOMING --reports REPORTS        # watch a folder\n"
        "  xrwatch status --state-dir REPORTS/.xrwatch-state",
        highlight=False,
        soft_wrap=True,
    )
    return 0
