"""Fitting what the exported graph carries besides the weights: temperature and scope guard.

Both are fitted on the run's own splits (``RUN/splits/{train,val,test}.csv``, written by
training), read through :func:`xrwatch.preprocess.load_model_input` exactly as serving
reads files:

* temperature: minimises validation NLL (:func:`training.calibration.fit_temperature`);
  ECE (15 bins) before and after, on validation and test, goes into the metadata and a
  reliability diagram into the run folder;
* guard: mean and Ledoit-Wolf-shrunk inverse covariance of the *training* images' pooled
  last-layer features; the distance threshold is the one at or below which
  ``guard_pass_rate`` of the *validation* images lie (chosen here on torch's fp32 features,
  then again on each exported file's own scores by :mod:`.guardtune`). When the input side
  is a multiple of :data:`LAYOUT_GRID`, the coarse-layout check too: a probabilistic PCA
  of the training images' standardised thumbnails, its distance threshold chosen on
  validation the same way. An image is flagged only when both checks exceed their
  thresholds, so the validation pass rate is at least ``guard_pass_rate``;
* ``low_confidence``: unless given, the threshold chosen on the validation predictions at the
  fitted temperature (:func:`xrwatch.evaluation.choose_low_confidence`: the highest that
  flags at most :data:`LOW_CONFIDENCE_MAX_RIGHT` of the right ones), with its rates there.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from xrwatch.errors import ConfigError, ImageError
from xrwatch.evaluation import choose_low_confidence
from xrwatch.preprocess import PreprocessSpec, load_model_input
from xrwatch_training.calibration import (
    ECE_BINS,
    ece_entry,
    fit_temperature,
    plot_reliability,
    softmax,
)

from .explain import (
    LAYOUT_COMPONENTS,
    LAYOUT_GRID,
    FeatureNet,
    GuardStats,
    LayoutStats,
    fit_guard,
    fit_layout,
    guard_passes,
    mahalanobis,
    pass_threshold,
    run_feature_net,
    thumbnails,
)

logger = logging.getLogger(__name__)

GUARD_PASS_RATE = 0.98  # validation images that must pass (the target is >= 97 % of real CXRs)
MIN_CONTRAST = 0.02  # input std below this = a blank/constant image (real CXRs: ~0.15-0.3)
# low_confidence: unless a threshold is given, the one chosen on the validation split at the
# fitted temperature that flags at most this share of its right predictions
LOW_CONFIDENCE_MAX_RIGHT = 0.2
MAX_FIT_IMAGES = 3000  # per split; more adds little to a mean and a shrunk covariance
RELIABILITY_PNG = "reliability.png"


@dataclass(frozen=True)
class Fitted:
    """What :func:`fit_extras` found; ``*_meta`` are the metadata JSON objects."""

    temperature: float
    guard: GuardStats
    calibration_meta: dict[str, Any]
    guard_meta: dict[str, Any]
    reliability_png: Path | None
    val_inputs: np.ndarray  # model inputs of the validation split (N x 1 x S x S)
    test_inputs: np.ndarray | None  # and of the test split, when there is one
    val_labels: np.ndarray  # class indices (N) of the validation split
    test_labels: np.ndarray | None  # and of the test split

    def labelled_splits(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """``(name, inputs, labels)`` of validation and, when there is one, test."""
        out = [("val", self.val_inputs, self.val_labels)]
        if self.test_inputs is not None and self.test_labels is not None:
            out.append(("test", self.test_inputs, self.test_labels))
        return out


def read_split(path: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """``(image path, class index)`` rows of a training ``splits/<name>.csv``."""
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["label"] not in classes:
                raise ConfigError(f"{path}: label {row['label']!r} is not one of {classes}")
            rows.append((Path(row["path"]), classes.index(row["label"])))
    return rows


def load_split(
    rows: list[tuple[Path, int]], spec: PreprocessSpec, limit: int = MAX_FIT_IMAGES
) -> tuple[np.ndarray, np.ndarray]:
    arrays, labels, skipped = [], [], 0
    for path, label in rows[:limit]:
        try:
            pixels, _ = load_model_input(path, spec)
        except (ImageError, OSError) as exc:
            skipped += 1
            logger.debug("skipping %s: %s", path, exc)
            continue
        arrays.append(pixels[None])
        labels.append(label)
    if skipped:
        logger.warning("%d image(s) of the split could not be read and were skipped", skipped)
    if not arrays:
        return np.zeros((0, 1, spec.size, spec.size), np.float32), np.zeros(0, np.int64)
    return np.stack(arrays).astype(np.float32), np.asarray(labels, np.int64)


def find_splits(checkpoint: Path, splits_dir: Path | None) -> Path | None:
    """The folder holding train/val/test.csv: ``splits_dir`` or ``RUN/splits``, if present."""
    folder = splits_dir if splits_dir is not None else checkpoint.parent / "splits"
    if all((folder / f"{name}.csv").is_file() for name in ("train", "val")):
        return folder
    if splits_dir is not None:
        raise ConfigError(f"{splits_dir}: needs train.csv and val.csv (as training writes them)")
    return None


def fit_extras(
    net: FeatureNet,
    spec: PreprocessSpec,
    classes: tuple[str, ...],
    splits: Path,
    *,
    run_dir: Path | None,
    guard_pass_rate: float = GUARD_PASS_RATE,
    min_contrast: float = MIN_CONTRAST,
    low_confidence: float | None = None,
    guard_combine: str = "both",
) -> Fitted:
    """Fit temperature and guard on the splits in ``splits`` (see the module docstring)."""
    data = {}
    for name in ("train", "val", "test"):
        csv_path = splits / f"{name}.csv"
        if csv_path.is_file():
            data[name] = load_split(read_split(csv_path, classes), spec)
            logger.info("calibration data: %d %s image(s)", len(data[name][1]), name)
    if len(data["val"][1]) == 0 or len(data["train"][1]) == 0:
        raise ConfigError(f"{splits}: no readable train or validation images to calibrate on")
    outputs = {name: run_feature_net(net, arrays) for name, (arrays, _) in data.items()}

    val_logits, val_labels = outputs["val"][1], data["val"][1]
    temperature = fit_temperature(val_logits, val_labels)
    ece: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in ("val", "test"):
        if name not in outputs or len(data[name][1]) == 0:
            continue
        logits, labels = outputs[name][1], data[name][1]
        before, after = softmax(logits), softmax(logits, temperature)
        ece[name] = ece_entry(before, after, labels, ECE_BINS)
        curves[f"{name}, T=1"] = (before, labels)
        curves[f"{name}, T={temperature:.3f}"] = (after, labels)
    logger.info("temperature %.4f; ECE %s", temperature, ece)
    png = None
    if run_dir is not None:
        try:
            png = plot_reliability(
                curves, run_dir / RELIABILITY_PNG, f"reliability, {ECE_BINS} bins"
            )
        except OSError as exc:
            logger.warning("%s: cannot write the reliability diagram: %s", run_dir, exc)

    combine = guard_combine if layout_possible(spec) else "both"
    mean, whitening = fit_guard(outputs["train"][0])
    val_dist = mahalanobis(outputs["val"][0], mean, whitening)
    threshold = pass_threshold(val_dist, guard_pass_rate)
    layout = fit_layout_stats(data["train"][0], data["val"][0], spec, guard_pass_rate)

    def passing(split: str) -> np.ndarray:
        """Which images of ``split`` pass the guard as the exported graph decides it."""
        arrays = data[split][0]
        scores = [mahalanobis(outputs[split][0], mean, whitening) / threshold]
        if layout is not None:
            scores.append(layout.distance(arrays) / layout.threshold)
        contrast = arrays.reshape(len(arrays), -1).std(axis=1)
        return guard_passes(np.stack(scores), contrast, min_contrast, combine)

    guard_meta: dict[str, Any] = {
        "method": "mahalanobis",
        "layer": net.layer_name,
        "features": int(mean.shape[0]),
        "raw_threshold": threshold,
        "threshold": 1.0,
        "min_contrast": min_contrast,
        "target_pass_rate": guard_pass_rate,
        "val_pass_rate": float(passing("val").mean()),
        "n_train": len(data["train"][1]),
        "n_val": len(val_labels),
        "combine": combine,
    }
    if layout is not None:
        guard_meta["layout"] = {
            "method": "thumbnail probabilistic PCA distance",
            "grid": layout.grid,
            "components": int(layout.basis.shape[0]),
            "raw_threshold": layout.threshold,
            "combined": "out of scope only when features and layout both exceed 1"
            if combine == "both"
            else "out of scope when features or layout exceeds 1",
        }
    if "test" in outputs and len(data["test"][1]):
        guard_meta["test_pass_rate"] = float(passing("test").mean())
    calibration_meta = {
        "method": "temperature",
        "temperature": temperature,
        "bins": ECE_BINS,
        "ece": ece,
        **low_confidence_rule(softmax(val_logits, temperature), val_labels, low_confidence),
    }
    return Fitted(
        temperature=temperature,
        guard=GuardStats(
            mean=mean, whitening=whitening, threshold=threshold, layout=layout, combine=combine
        ),
        calibration_meta=calibration_meta,
        guard_meta=guard_meta,
        reliability_png=png,
        val_inputs=data["val"][0],
        test_inputs=data["test"][0] if "test" in data else None,
        val_labels=val_labels,
        test_labels=data["test"][1] if "test" in data else None,
    )


def low_confidence_rule(
    probabilities: np.ndarray, labels: np.ndarray, given: float | None
) -> dict[str, Any]:
    """``low_confidence`` and how it was set: ``given`` as is, else chosen on these
    (validation) predictions by :func:`xrwatch.evaluation.choose_low_confidence`, with its
    rates there in ``low_confidence_rule`` (measure them again on held-out data)."""
    if given is not None:
        logger.info("low_confidence threshold %.2f (given)", given)
        return {"low_confidence": float(given), "low_confidence_rule": {"chosen_on": "given"}}
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    if not correct.any():
        raise ConfigError("no right validation prediction to choose --low-confidence on")
    rule = choose_low_confidence(
        correct, probabilities.max(axis=1), max_right_flagged=LOW_CONFIDENCE_MAX_RIGHT
    )
    rule["chosen_on"] = f"validation split ({len(labels)} images)"
    rule["max_right_flagged"] = LOW_CONFIDENCE_MAX_RIGHT
    logger.info(
        "low_confidence threshold %.2f chosen on the %s: flags %d of %d wrong and %d of %d "
        "right predictions there",
        rule["threshold"],
        rule["chosen_on"],
        round((rule["wrong_flagged"] or 0.0) * rule["n_wrong"]),
        rule["n_wrong"],
        round((rule["right_flagged"] or 0.0) * rule["n_right"]),
        rule["n_right"],
    )
    return {"low_confidence": rule["threshold"], "low_confidence_rule": rule}


def layout_possible(spec: PreprocessSpec) -> bool:
    """Whether the input side allows the coarse-layout check (a multiple of the grid)."""
    return spec.size % LAYOUT_GRID == 0


def fit_layout_stats(
    train: np.ndarray, val: np.ndarray, spec: PreprocessSpec, pass_rate: float
) -> LayoutStats | None:
    """The coarse-layout statistics, or None when the input side is not a multiple of the
    grid (the guard is then the feature distance alone, with one log line)."""
    if spec.size % LAYOUT_GRID:
        logger.info(
            "input side %d is not a multiple of %d: scope guard without the layout check",
            spec.size,
            LAYOUT_GRID,
        )
        return None
    mean, basis, inv_std, inv_noise_std = fit_layout(
        thumbnails(train, LAYOUT_GRID), LAYOUT_COMPONENTS
    )
    unscaled = LayoutStats(
        grid=LAYOUT_GRID,
        pool=spec.size // LAYOUT_GRID,
        mean=mean,
        basis=basis,
        inv_std=inv_std,
        inv_noise_std=inv_noise_std,
        threshold=1.0,
    )
    return replace(unscaled, threshold=pass_threshold(unscaled.distance(val), pass_rate))
