"""How sure are the calibration figures? ECE and NLL before and after temperature scaling,
with bootstrap 95 % intervals, on a run's validation and test splits.

The export states ECE before/after on 89 validation and 151 test images of the shipped
default; with that few images, an ECE moves a lot from one sample to the next. This prints,
per split, for the model's raw ``logits`` (T = 1) and its calibrated ``probabilities``
(softmax(logits / T), the graph's own output):

* accuracy, ECE (15 bins, top label: ``training.calibration``, tested against netcal) and
  the mean negative log-likelihood (what the temperature minimises on validation);
* bootstrap 95 % percentile intervals of each, and of the paired differences after -
  before (the same resampled images for both), from ``--resamples`` resamples.

    .venv/bin/python benchmarks/calibration_ci.py --model xrwatch/models/default.onnx \\
        --splits /work/artifacts/real/runs/DCE-densenet121-64/splits
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xrwatch.cli.evaluate_cmd import load_labelled  # noqa: E402
from xrwatch.engine import InferenceEngine  # noqa: E402
from xrwatch.errors import XRWatchError  # noqa: E402
from xrwatch.preprocess import load_model_input  # noqa: E402
from xrwatch_training.calibration import (  # noqa: E402
    BOOTSTRAP_RESAMPLES,
    ECE_BINS,
    ece_intervals,
    expected_calibration_error,
    nll,
    paired_intervals,
    softmax,
)

BATCH = 32


def split_outputs(
    engine: InferenceEngine, csv_path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits, calibrated probabilities, labels)`` of every image listed in the run's
    split file ``csv_path`` (read as ``xrwatch evaluate`` reads it; paths relative to the
    repository root, or absolute)."""
    if not csv_path.is_file():
        raise SystemExit(
            f"{csv_path}: no such split file (a run's splits/ holds val.csv, test.csv)"
        )
    try:
        rows = load_labelled(csv_path, "multiclass")
    except XRWatchError as exc:
        raise SystemExit(str(exc)) from exc
    unknown = sorted({r.label for r in rows} - set(engine.classes))
    if unknown:
        raise SystemExit(f"{csv_path}: labels {unknown} are not the model's {engine.classes}")
    try:
        arrays = [load_model_input(ROOT / row.path, engine.spec)[0][None] for row in rows]
    except XRWatchError as exc:  # the message names the image
        raise SystemExit(f"{csv_path}: {exc}") from exc
    logits, probs = [], []
    for i in range(0, len(arrays), BATCH):
        raw, calibrated = engine.run(np.stack(arrays[i : i + BATCH]))
        logits.append(raw)
        probs.append(calibrated)
    labels = np.array([engine.classes.index(row.label) for row in rows])
    return np.concatenate(logits), np.concatenate(probs), labels


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


def interval(values: list[float]) -> str:
    return f"[{values[0]:+.3f}, {values[1]:+.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--splits", type=Path, required=True, help="a run's splits/ folder")
    ap.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    engine = InferenceEngine(args.model, use_gpu=False)
    calibration = engine.meta.calibration
    if not calibration:
        print(f"{args.model} has no calibration metadata (exported before calibration)")
        return 2
    temperature = float(calibration["temperature"])
    print(f"model {args.model.name}: T = {temperature:.3f}; ECE with {ECE_BINS} bins; "
          f"{args.resamples} bootstrap resamples, seed {args.seed}")  # fmt: skip
    for split in ("val", "test"):
        logits, calibrated, labels = split_outputs(engine, args.splits / f"{split}.csv")
        before = softmax(logits)
        if not np.allclose(softmax(logits, temperature), calibrated, atol=1e-4):
            raise SystemExit(f"{args.model}: probabilities are not softmax(logits / T)")
        kw = {"resamples": args.resamples, "seed": args.seed}
        ece = ece_intervals(before, calibrated, labels, **kw)
        loss = paired_intervals(before, calibrated, labels, nll, **kw)
        right = paired_intervals(before, before, labels, accuracy, **kw)["before"]
        e0 = expected_calibration_error(before, labels)
        e1 = expected_calibration_error(calibrated, labels)
        n0, n1 = nll(before, labels), nll(calibrated, labels)
        print(f"\n{split} ({len(labels)} images), accuracy {accuracy(before, labels):.3f} "
              f"{interval(right)}:")  # fmt: skip
        print(f"  ECE  before {e0:.3f} {interval(ece['before'])}   after {e1:.3f} "
              f"{interval(ece['after'])}   after - before {e1 - e0:+.3f} "
              f"{interval(ece['change'])}")  # fmt: skip
        print(f"  NLL  before {n0:.3f} {interval(loss['before'])}   after {n1:.3f} "
              f"{interval(loss['after'])}   after - before {n1 - n0:+.3f} "
              f"{interval(loss['change'])}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
