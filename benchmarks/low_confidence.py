"""Choose the ``low_confidence`` threshold on validation images; measure it on held-out ones.

    python benchmarks/low_confidence.py --val ../shared/data/xray/kermany/TRAIN \\
        --val-per-class 100 --test ../shared/data/xray/real [--model M] [--max-right 0.2]

The rule flags a result whose calibrated top probability is below the threshold. On the
validation images, the threshold is the highest (rounded down to 0.01) that flags at most
``--max-right`` of the right predictions (:func:`xrwatch.evaluation.choose_low_confidence`):
as many wrong ones as possible within that budget. It is then applied, unchanged, to each
``--test`` set, which must share no image (and no patient) with the validation set; the
script prints the threshold, the held-out shares of wrong and of right predictions flagged
beside the targets (>= 50 % of the wrong, <= 25 % of the right), and the risk-coverage table
of each set. ``--val-per-class N`` draws N images per class (seeded) from a large folder.

Every figure printed comes from the model named in its header (path and sha256): the
threshold belongs to that model and must be chosen again for another one.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from xrwatch.cli.evaluate_cmd import Labelled, load_labelled, risk_coverage_markdown
from xrwatch.defaults import resolve_model
from xrwatch.engine import InferenceEngine
from xrwatch.evaluation import choose_low_confidence, flag_rates, risk_coverage
from xrwatch.sysinfo import describe as describe_machine

TARGET_WRONG = 0.5  # at least this share of the wrong predictions flagged (issue 24)
TARGET_RIGHT = 0.25  # at most this share of the right ones


def per_class(samples: list[Labelled], n: int, seed: int) -> list[Labelled]:
    """``n`` samples of each class (all of a smaller class), drawn with ``seed``."""
    by_class: dict[str, list[Labelled]] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rng = random.Random(seed)
    out: list[Labelled] = []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: str(s.path))
        out += group if len(group) <= n else rng.sample(group, n)
    return out


def predict(engine: InferenceEngine, samples: list[Labelled]) -> tuple[np.ndarray, np.ndarray]:
    """Whether each readable sample was classified right, and its top probability."""
    unknown = sorted({s.label for s in samples} - set(engine.classes))
    if unknown:
        sys.exit(f"labels {unknown} are not classes of {engine.path} ({list(engine.classes)})")
    predictions = engine.predict_paths([s.path for s in samples], batch_size=16)
    pairs = [(s, p) for s, p in zip(samples, predictions, strict=True) if p.ok]
    if len(pairs) < len(samples):
        print(f"  ({len(samples) - len(pairs)} unreadable image(s) left out)")
    correct = np.array([p.label == s.label for s, p in pairs])
    confidence = np.array([p.confidence for _, p in pairs], dtype=np.float64)
    return correct, confidence


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--val", type=Path, required=True, help="labelled validation images")
    parser.add_argument("--test", type=Path, action="append", required=True,
                        help="labelled held-out images (repeatable)")  # fmt: skip
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--val-per-class", type=int, default=0, help="0 = every image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-right", type=float, default=0.2,
                        help="share of right validation predictions the rule may flag")  # fmt: skip
    args = parser.parse_args()

    path = resolve_model(args.model)
    engine = InferenceEngine(path, use_gpu=False)
    print(f"model: {path} (sha256 {engine.model_sha256[:12]}, {engine.meta.name}); "
          f"its stored threshold: {engine.low_confidence}")  # fmt: skip
    print(describe_machine())
    val = load_labelled(args.val, engine.meta.task)
    if args.val_per_class:
        val = per_class(val, args.val_per_class, args.seed)
    val_files = {s.path.resolve() for s in val}
    start = time.perf_counter()
    correct, confidence = predict(engine, val)
    chosen = choose_low_confidence(correct, confidence, max_right_flagged=args.max_right)
    print(f"\nvalidation: {args.val} ({len(correct)} images, accuracy {correct.mean():.3f}; "
          f"seed {args.seed}, {args.val_per_class or 'all'} per class)")  # fmt: skip
    print(f"chosen threshold: {chosen['threshold']:.2f} (at most {args.max_right:.0%} of the "
          f"right validation predictions below it): flags {_pct(chosen['wrong_flagged'])} of "
          f"{chosen['n_wrong']} wrong, {_pct(chosen['right_flagged'])} of {chosen['n_right']} "
          "right on validation")  # fmt: skip
    low_val = {"threshold": chosen["threshold"], "rates": chosen,
               "risk_coverage": risk_coverage(correct, confidence)}  # fmt: skip
    print("\n" + risk_coverage_markdown(low_val, "chosen"))
    met_all = True
    for test in args.test:
        samples = load_labelled(test, engine.meta.task)
        overlap = {s.path.resolve() for s in samples} & val_files
        if overlap:
            sys.exit(f"{test}: {len(overlap)} image(s) are also in the validation set")
        correct, confidence = predict(engine, samples)
        rates = flag_rates(correct, confidence, chosen["threshold"])
        met = (rates["wrong_flagged"] or 0.0) >= TARGET_WRONG and (
            rates["right_flagged"] or 0.0
        ) <= TARGET_RIGHT
        met_all &= met
        print(f"held out: {test} ({rates['n']} images, accuracy {correct.mean():.3f})")
        print(f"  threshold {chosen['threshold']:.2f} flags {_pct(rates['wrong_flagged'])} of "
              f"{rates['n_wrong']} wrong (target >= {TARGET_WRONG:.0%}) and "
              f"{_pct(rates['right_flagged'])} of {rates['n_right']} right (target <= "
              f"{TARGET_RIGHT:.0%}): {'met' if met else 'NOT met'}; accuracy of the "
              f"unflagged {_pct(rates['accuracy_unflagged'])}, "
              f"{_pct(rates['flagged_share'])} flagged")  # fmt: skip
        low = {"threshold": chosen["threshold"], "rates": rates,
               "risk_coverage": risk_coverage(correct, confidence)}  # fmt: skip
        print("\n" + risk_coverage_markdown(low, "chosen"))
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0 if met_all else 1


if __name__ == "__main__":
    sys.exit(main())
