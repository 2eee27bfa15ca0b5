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
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xrwatch_training.calibration import ECE_BINS, expected_calibration_error, softmax  # noqa: E402
from xrwatch.engine import InferenceEngine  # noqa: E402
from xrwatch.preprocess import load_model_input  # noqa: E402

BATCH = 32


def split_outputs(
    engine: InferenceEngine, csv_path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits, calibrated probabilities, labels)`` of every image listed in ``csv_path``
    (paths relative to the repository root, or absolute)."""
    with csv_path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    arrays = [load_model_input(ROOT / row["path"], engine.spec)[0][None] for row in rows]
    logits, probs = [], []
    for i in range(0, len(arrays), BATCH):
        raw, calibrated = engine.run(np.stack(arrays[i : i + BATCH]))
        logits.append(raw)
        probs.append(calibrated)
    labels = np.array([engine.classes.index(row["label"]) for row in rows])
    return np.concatenate(logits), np.concatenate(probs), labels


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


def bootstrap(
    before: np.ndarray, after: np.ndarray, labels: np.ndarray, resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Per statistic, its value on each resample (the same indices for before and after)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    out: dict[str, list[float]] = {k: [] for k in ("ece0", "ece1", "nll0", "nll1", "acc")}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        b, a, y = before[idx], after[idx], labels[idx]
        out["ece0"].append(expected_calibration_error(b, y))
        out["ece1"].append(expected_calibration_error(a, y))
        out["nll0"].append(nll(b, y))
        out["nll1"].append(nll(a, y))
        out["acc"].append(accuracy(b, y))
    return {k: np.asarray(v) for k, v in out.items()}


def interval(values: np.ndarray) -> str:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return f"[{lo:.3f}, {hi:.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--splits", type=Path, required=True, help="a run's splits/ folder")
    ap.add_argument("--resamples", type=int, default=2000)
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
        boot = bootstrap(before, calibrated, labels, args.resamples, args.seed)
        e0, e1 = (
            expected_calibration_error(before, labels),
            expected_calibration_error(calibrated, labels),
        )
        n0, n1 = nll(before, labels), nll(calibrated, labels)
        acc = accuracy(before, labels)
        print(f"\n{split} ({len(labels)} images), accuracy {acc:.3f} {interval(boot['acc'])}:")
        print(f"  ECE  before {e0:.3f} {interval(boot['ece0'])}   after {e1:.3f} "
              f"{interval(boot['ece1'])}   after - before {e1 - e0:+.3f} "
              f"{interval(boot['ece1'] - boot['ece0'])}")  # fmt: skip
        print(f"  NLL  before {n0:.3f} {interval(boot['nll0'])}   after {n1:.3f} "
              f"{interval(boot['nll1'])}   after - before {n1 - n0:+.3f} "
              f"{interval(boot['nll1'] - boot['nll0'])}")  # fmt: skip
        worse = float(np.mean(boot["ece1"] > boot["ece0"]))
        print(f"  resamples where calibration made ECE worse: {worse:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
