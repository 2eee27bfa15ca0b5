"""``xrwatch train``, ``reproduce``, ``dataset`` and ``synth``.

``dataset`` and ``synth`` never import torch. ``train`` and ``reproduce`` check for the
``train`` extra first, then import :mod:`training` lazily.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import tomllib
import typer

from xrwatch.cli._app import app, console
from xrwatch.errors import ConfigError, require_extra

logger = logging.getLogger(__name__)


def _logging() -> None:
    if not logging.getLogger().handlers:
        from xrwatch.logs import configure_logging

        configure_logging(os.environ.get("XRWATCH_LOG_LEVEL", "INFO"))


def _require_train() -> None:
    require_extra("train", "torch", "torchvision", "sklearn", "matplotlib")


def _parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs; VALUE is read as a TOML value (falls back to a string)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set lr=0.0005")
        try:
            out[key.strip().replace("-", "_")] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip().replace("-", "_")] = raw
    return out


# Options shared by train and reproduce (None = not given: the preset's value stays).
TaskOpt = typer.Option(
    None, "--task", help="multiclass (Normal/Bacteria/Virus/COVID-19) or binary."
)
SplitOpt = typer.Option(
    None,
    "--split",
    help="official (the dataset's TEST is the test set), patient (test carved from the images, "
    "grouped by patient) or auto (default: official when the data has a fixed test set, else "
    "patient).",
)
EpochsOpt = typer.Option(None, "--epochs", help="Epochs (study: 20).")
SizeOpt = typer.Option(
    None,
    "--image-size",
    help="Model input size in pixels (xrwatch's assumption: 224; the study does not state it).",
)
BatchOpt = typer.Option(
    None,
    "--batch-size",
    help="Global batch size, divided across torchrun processes (xrwatch's assumption: 32; "
    "the study does not state it).",
)
OutOpt = typer.Option(None, "--out", help="Runs folder (default: runs).")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu or cuda.")
SeedOpt = typer.Option(None, "--seed", help="Random seed (splits, init, augmentation).")
ImagenetOpt = typer.Option(
    None, "--imagenet-weights", help="Local torchvision ImageNet weights (offline)."
)
ChexnetOpt = typer.Option(None, "--chexnet-weights", help="CheXNet model.pth.tar.")
ExtraOpt = typer.Option(None, "--extra", help="DIR:LABEL folder of extra TRAIN images (repeat).")
StrictOpt = typer.Option(None, "--strict/--no-strict", help="Stop on missing/unreadable images.")
WorkersOpt = typer.Option(None, "--workers", help="Decoding processes for the image cache.")
CacheOpt = typer.Option(None, "--cache-dir", help="Decoded-image cache (default: OUT/.cache).")
ArchOpt = typer.Option(None, "--arch", help="resnet50, densenet121 or tinycnn.")
WeightsOpt = typer.Option(None, "--weights", help="imagenet, chexnet or none.")
ProgressOpt = typer.Option(None, "--progress/--no-progress", help="Rich progress bars.")
ConfigOpt = typer.Option(
    None, "--config", help="TOML file (its train table) or a run's config.json."
)
PatientsOpt = typer.Option(
    None,
    "--patients",
    help="CSV (X_ray_image_name, patientid) giving the patient of images whose names carry "
    "none; default: covid_collection_patients.csv beside the data or in a folder beside it.",
)
SetOpt = typer.Option(None, "--set", help="Override any config field: KEY=VALUE (repeat).")


def _overrides(config: Path | None, sets: list[str] | None, **flags: Any) -> dict[str, Any]:
    from xrwatch.config import merge, read_toml

    file_values: dict[str, Any] = {}
    if config is not None and config.suffix == ".json":  # a run's config.json re-runs it
        try:
            file_values = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{config}: cannot read JSON config: {exc}") from exc
    elif config is not None:
        file_values = read_toml(config, table="train")
    values = merge(file_values, _parse_sets(sets))
    if flags.get("extra") is not None:
        flags["extra"] = tuple(flags["extra"])
    return merge(values, flags)


@app.command("train")
def train_command(
    data: str | None = typer.Option(None, "--data", help="DATA_DIR (CoronaHack or per class)."),
    experiment: str = typer.Option(
        "custom", "--experiment", "-e", help="PRCE, PRCW, PRFL, PDCXCE, PDCXFL, RCE or custom."
    ),
    task: str | None = TaskOpt,
    split: str | None = SplitOpt,
    epochs: int | None = EpochsOpt,
    image_size: int | None = SizeOpt,
    batch_size: int | None = BatchOpt,
    lr: float | None = typer.Option(None, "--lr", help="Adam learning rate (study: 1e-3)."),
    loss: str | None = typer.Option(
        None, "--loss", help="ce or focal (gamma 2, no alpha: xrwatch's assumption)."
    ),
    sampler: str | None = typer.Option(None, "--sampler", help="plain or weighted."),
    arch: str | None = ArchOpt,
    weights: str | None = WeightsOpt,
    imagenet_weights: str | None = ImagenetOpt,
    chexnet_weights: str | None = ChexnetOpt,
    extra: list[str] | None = ExtraOpt,
    patients: str | None = PatientsOpt,
    strict: bool | None = StrictOpt,
    out: str | None = OutOpt,
    name: str | None = typer.Option(None, "--name", help="Run folder name under OUT."),
    device: str | None = DeviceOpt,
    seed: int | None = SeedOpt,
    workers: int | None = WorkersOpt,
    cache_dir: str | None = CacheOpt,
    max_steps_per_epoch: int | None = typer.Option(
        None, "--max-steps-per-epoch", help="Cut epochs short (smoke tests)."
    ),
    progress: bool | None = ProgressOpt,
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue the run in this folder where it stopped."
    ),
) -> None:
    """Train one experiment into OUT/NAME.

    A preset of the study (--experiment) or a custom one; flags, --config and --set
    override the preset. Needs the train extra.

    The defaults are the recipe the study states (Adam 1e-3, x0.5 every 10 epochs, 20
    epochs, flips p=0.5, rotation p=0.3) plus xrwatch's assumptions where it states nothing:
    batch 32 (global), 224 px stretched bilinear, ImageNet normalisation, focal gamma 2
    without alpha, all layers trained, no weight decay, rotation +-10 degrees, validation 10 %
    of TRAIN grouped by patient (training.presets.ASSUMPTIONS; README).
    """
    _logging()
    _require_train()
    from xrwatch_training.engine import load_run_config, shutdown_distributed, train
    from xrwatch_training.presets import experiment_config

    flags = dict(
        data=data, task=task, split=split, epochs=epochs, image_size=image_size,
        batch_size=batch_size, lr=lr, loss=loss, sampler=sampler, arch=arch, weights=weights,
        imagenet_weights=imagenet_weights, chexnet_weights=chexnet_weights, extra=extra,
        patients=patients, strict=strict, out=out, name=name, device=device, seed=seed,
        workers=workers, cache_dir=cache_dir, max_steps_per_epoch=max_steps_per_epoch,
        progress=progress,
    )  # fmt: skip
    values = _overrides(config, set_, **flags)
    if resume is not None:
        # The run's own config.json; only flags given now override it (e.g. more --epochs).
        cfg = load_run_config(resume, values)
        run_dir = train(cfg, resume=resume)
    else:
        cfg = experiment_config(experiment, values)
        if not cfg.data:
            raise ConfigError("--data DATA_DIR is required (or data = ... in --config)")
        run_dir = train(cfg)
    shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"run folder: {run_dir}", markup=False)


@app.command("reproduce")
def reproduce_command(
    data: str = typer.Option(..., "--data", help="DATA_DIR (CoronaHack layout)."),
    epochs: int | None = EpochsOpt,
    image_size: int | None = SizeOpt,
    batch_size: int | None = BatchOpt,
    out: str = typer.Option("runs", "--out", help="Runs folder; table1.md/csv/json go here."),
    task: str | None = TaskOpt,
    split: str | None = SplitOpt,
    arch: str | None = ArchOpt,
    weights: str | None = WeightsOpt,
    imagenet_weights: str | None = ImagenetOpt,
    chexnet_weights: str | None = ChexnetOpt,
    extra: list[str] | None = ExtraOpt,
    patients: str | None = PatientsOpt,
    strict: bool | None = StrictOpt,
    device: str | None = DeviceOpt,
    seed: int | None = SeedOpt,
    workers: int | None = WorkersOpt,
    cache_dir: str | None = CacheOpt,
    progress: bool | None = ProgressOpt,
    only: list[str] | None = typer.Option(None, "--only", help="Run only these presets."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Run the study's six experiments and write its Table 1.

    Beside the study's own figures; settings the study does not state are xrwatch's
    assumptions (see train --help).

    Each experiment runs in OUT/<NAME>; a finished one is reused, an interrupted one
    resumed. The table goes to OUT/table1.md, table1.csv and table1.json. Needs the
    train extra.
    """
    _logging()
    _require_train()
    from xrwatch_training.engine import shutdown_distributed
    from xrwatch_training.reproduce import reproduce

    flags = dict(
        data=data, epochs=epochs, image_size=image_size, batch_size=batch_size, out=out,
        task=task, split=split, arch=arch, weights=weights, imagenet_weights=imagenet_weights,
        chexnet_weights=chexnet_weights, extra=extra, patients=patients, strict=strict,
        device=device, seed=seed,
        workers=workers, cache_dir=cache_dir, progress=progress,
    )  # fmt: skip
    md, csv_path = reproduce(_overrides(config, set_, **flags), only=only)
    shutdown_distributed()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    console.print(md.read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {md}, {csv_path} and {md.with_suffix('.json')}", markup=False)


@app.command("dataset")
def dataset_command(
    data_dir: Path = typer.Argument(
        ..., help="CoronaHack folder (or its CSV) or a folder per class."
    ),
    task: str = typer.Option("multiclass", "--task", help="multiclass or binary."),
    split: str = typer.Option(
        "auto", "--split", help="official, patient or auto (by layout; the default)."
    ),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of the training images held out for validation."
    ),
    test_fraction: float = typer.Option(
        0.15, "--test-fraction", help="Share carved out as the test set (--split patient)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed of the carved splits."),
    patients: Path | None = PatientsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print a dataset's class counts per split.

    The dataset's own TRAIN/TEST, and the train/val/test splits training would carve.
    """
    _logging()
    from xrwatch_training.data import index_dataset
    from xrwatch_training.splits import make_splits

    index = index_dataset(data_dir, task, patients=patients)
    own = {
        s: index.counts(s)
        for s in ("TRAIN", "TEST")
        if any(x.source_split == s for x in index.samples)
    }
    if not own:
        own = {"ALL": index.counts()}
    splits = make_splits(
        index, split, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    found = sum(1 for s in index.samples if s.path.is_file())
    shared = splits.shared_patients()
    report: dict[str, Any] = {
        "data": str(data_dir),
        "layout": index.kind,
        "task": task,
        "classes": list(index.classes),
        "dataset_splits": own,
        "split": splits.mode,
        "split_why": splits.why,
        "splits": splits.counts(index.classes),
        "patients": splits.patients(),
        "shared_patients": len(shared),
        "patients_csv": str(index.patients_csv) if index.patients_csv else None,
        "excluded": dict(index.excluded),
        "images": {"listed": len(index.samples), "found": found},
        "warnings": splits.warnings,
    }
    if as_json:
        console.print_json(json.dumps(report))
        return
    from rich.table import Table

    table = Table(title=f"{data_dir} ({index.kind}, {task})")
    table.add_column("split")
    for c in index.classes:
        table.add_column(c, justify="right")
    table.add_column("total", justify="right")
    for name, counts in own.items():
        table.add_row(name, *map(str, counts.values()), str(sum(counts.values())))
    table.add_section()
    for name, counts in report["splits"].items():
        label = f"{name} (--split {splits.mode})"
        table.add_row(label, *map(str, counts.values()), str(sum(counts.values())))
    console.print(table)
    for note, count in index.excluded.items():
        console.print(f"left out {count}: {note}", highlight=False, markup=False)
    console.print(f"image files found: {found} of {len(index.samples)} listed", highlight=False)
    console.print(f"split: {splits.mode} ({splits.why})", highlight=False, markup=False)
    per_split = ", ".join(f"{n} {c}" for n, c in report["patients"].items())
    console.print(
        f"patients: {per_split}; "
        + (f"{len(shared)} in two splits" if shared else "no patient is in two splits"),
        highlight=False,
        markup=False,
    )
    if index.patients_csv:
        console.print(f"patients table: {index.patients_csv}", highlight=False, markup=False)
    for w in splits.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


@app.command("synth")
def synth_command(
    out_dir: Path = typer.Argument(..., help="Folder to write the synthetic dataset to."),
    scale: float = typer.Option(1.0, "--scale", help="1.0 = the real dataset's 5,910 images."),
    image_size: int = typer.Option(256, "--image-size", help="Side of the written JPEGs."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the same seed, the same images)."),
) -> None:
    """Write a synthetic dataset in the CoronaHack layout.

    For tests, demos and benchmarks: no real data needed.
    """
    _logging()
    from xrwatch_training.synth import write_synthetic

    try:
        counts = write_synthetic(out_dir, scale=scale, image_size=image_size, seed=seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    console.print(
        f"wrote {sum(counts.values())} images to {out_dir} "
        f"(TRAIN {counts['TRAIN']}, TEST {counts['TEST']})",
        highlight=False,
    )
