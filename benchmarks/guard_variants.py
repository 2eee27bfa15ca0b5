"""Scope-guard variants on one trained run: which feature-space score separates best.

    .venv/bin/python benchmarks/guard_variants.py --run RUN_DIR [--real ../shared/data/xray/real]

The exported guard (``xrwatch export``) is the Mahalanobis distance of the pooled last-layer
features to the training images' (Ledoit-Wolf covariance), with the threshold at which 98 %
of the *validation* images pass. This script measures, on the same run (torch, fp32, the
run's own splits), that guard and the common alternatives from the literature, each with
its threshold chosen the same way on validation only:

* ``global``: the exported score (one Gaussian over all training images);
* ``class``: class-conditional Gaussians with a tied covariance, the distance to the nearest
  class mean (Lee et al. 2018);
* ``relative``: class-conditional minus global squared distance (Ren et al. 2021);
* each on the last feature map, and summed over the four blocks of the network (each block's
  score divided by its own validation threshold first);
* ``+photometric``: the training statistics also fitted on gamma-changed (0.5-2) and
  histogram-equalised copies of the training images, as if other hospitals' processing had
  been seen;
* ``layout``: the coarse-layout check alone (8 x 8 standardised thumbnails of the input,
  their distance under a probabilistic PCA of the training thumbnails, 8 components), and
  ``global AND layout``: out of scope only when both exceed their thresholds - the guard
  ``xrwatch export`` writes since the layout check was added.

For each: the validation and test pass rates, the fraction of the real chest X-rays in
``--real`` flagged (target <= 3 %), of the non-chest set caught (target >= 95 %) and of the
confirmation set caught, as ``benchmarks/nonchest.py`` assembles them. Needs the ``train``
extra. The README quotes its output. The layout check was designed after the other rows
had been measured on ``real/`` and the first non-chest images, so those two are not
untouched test sets for it; the confirmation set was assembled after it had been chosen.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from explain import SHARED  # noqa: E402
from nonchest import assemble_confirmation, assemble_non_chest  # noqa: E402

from xrwatch.inputs import expand_inputs  # noqa: E402
from xrwatch.preprocess import PreprocessSpec, load_model_input  # noqa: E402
from xrwatch.sysinfo import describe as describe_machine  # noqa: E402

PASS_RATE = 0.98
MIN_CONTRAST = 0.02
Scores = dict[str, np.ndarray]


def block_modules(net: object) -> dict[str, object]:
    """The four blocks of a ResNet or DenseNet trunk (empty for other networks)."""
    features = net.features  # type: ignore[attr-defined]
    first = features[0]
    if hasattr(first, "denseblock1"):
        return {f"denseblock{i}": getattr(first, f"denseblock{i}") for i in range(1, 5)}
    if len(features) >= 8 and hasattr(features, "__getitem__"):
        return {f"layer{i}": features[3 + i] for i in range(1, 5)}
    return {}


def load_files(files: list[Path], spec: PreprocessSpec) -> np.ndarray:
    arrays = []
    for f in files:
        try:
            arrays.append(load_model_input(f, spec)[0][None])
        except Exception as exc:  # a benchmark: unreadable files are skipped, and said
            print(f"  skipped {f}: {exc}")
    return np.stack(arrays).astype(np.float32)


def photometric(arrays: np.ndarray, seed: int = 0) -> np.ndarray:
    """Gamma 0.5-2 (log-uniform) and histogram-equalised copies of each image."""
    rng = np.random.default_rng(seed)
    gamma = np.exp(rng.uniform(np.log(0.5), np.log(2.0), (len(arrays), 1, 1, 1)))
    ranks = np.argsort(np.argsort(arrays.reshape(len(arrays), -1), axis=1), axis=1)
    equalised = (ranks / (ranks.shape[1] - 1)).reshape(arrays.shape)
    return np.concatenate([arrays, np.clip(arrays, 0, 1) ** gamma, equalised]).astype(np.float32)


def pass_threshold(values: np.ndarray) -> float:
    from xrwatch_export.explain import pass_threshold as rule  # the exported guard's own rule

    return rule(values, PASS_RATE)


def gaussian(train: np.ndarray, labels: np.ndarray | None) -> Callable[[np.ndarray], np.ndarray]:
    """Distance function: global Gaussian (labels None) or nearest class mean, tied covariance."""
    from sklearn.covariance import LedoitWolf

    if labels is None:
        means = train.mean(axis=0, keepdims=True)
        centred = train - means
    else:
        means = np.stack([train[labels == c].mean(axis=0) for c in np.unique(labels)])
        centred = train - means[np.searchsorted(np.unique(labels), labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    whitening = np.linalg.cholesky((precision + precision.T) / 2)

    def distance(x: np.ndarray) -> np.ndarray:
        d = [np.sqrt((((x - m) @ whitening) ** 2).sum(axis=1)) for m in means]
        return np.min(np.stack(d), axis=0)

    return distance


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="run folder (best.pt, splits/)")
    ap.add_argument("--real", type=Path, default=SHARED / "real")
    args = ap.parse_args()

    import torch

    from xrwatch_export.explain import FeatureNet
    from xrwatch_export.fitting import load_split, read_split
    from xrwatch_export.pipeline import model_from_checkpoint
    from xrwatch_training.checkpoint import load_checkpoint

    print(describe_machine())
    ckpt = load_checkpoint(args.run / "best.pt")
    spec, classes = PreprocessSpec.from_dict(ckpt["preprocess"]), tuple(ckpt["classes"])
    net = FeatureNet(model_from_checkpoint(ckpt)).eval()
    blocks = block_modules(net)
    pooled: dict[str, np.ndarray] = {}
    for name, module in blocks.items():
        module.register_forward_hook(  # type: ignore[attr-defined]
            lambda _m, _i, out, name=name: pooled.__setitem__(name, out.mean(dim=(2, 3)))
        )

    def features(arrays: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for start in range(0, len(arrays), 32):
                last, _, _ = net(torch.from_numpy(np.ascontiguousarray(arrays[start : start + 32])))
                for name, value in [("last", last), *pooled.items()]:
                    out.setdefault(name, []).append(value.double().numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    sets, labels = {}, {}
    for split in ("train", "val", "test"):
        sets[split], labels[split] = load_split(
            read_split(args.run / "splits" / f"{split}.csv", classes), spec
        )
    sets["real"] = load_files(expand_inputs([args.real]), spec)
    with tempfile.TemporaryDirectory() as tmp:
        assemble_non_chest(Path(tmp) / "set")
        assemble_confirmation(Path(tmp) / "confirmation")
        sets["non-chest"] = load_files(expand_inputs([Path(tmp) / "set"]), spec)
        sets["confirmation"] = load_files(expand_inputs([Path(tmp) / "confirmation"]), spec)
    sets["train+photometric"] = photometric(sets["train"])
    labels["train+photometric"] = np.tile(labels["train"], 3)
    feats = {k: features(v) for k, v in sets.items()}
    contrast = {k: v.reshape(len(v), -1).std(axis=1) for k, v in sets.items()}
    evaluated = ("val", "test", "real", "non-chest", "confirmation")
    print(
        f"run {args.run.name}: {len(sets['train'])} train, {len(sets['val'])} val, "
        f"{len(sets['test'])} test, {len(sets['real'])} real chest X-rays, "
        f"{len(sets['non-chest'])} non-chest + {len(sets['confirmation'])} confirmation; "
        f"pass rate {PASS_RATE:.0%} on validation"
    )
    print()
    print(
        "| guard | statistics | layers | val pass | test pass | real flagged | non-chest caught "
        "| confirmation caught |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for fit_on in ("train", "train+photometric"):
        for kind in ("global", "class", "relative"):
            per_layer: dict[str, Scores] = {}
            for layer in feats["train"]:
                y = None if kind == "global" else labels[fit_on]
                near = gaussian(feats[fit_on][layer], y)
                if kind == "relative":
                    far = gaussian(feats[fit_on][layer], None)
                    raw = {
                        k: near(feats[k][layer]) ** 2 - far(feats[k][layer]) ** 2 for k in evaluated
                    }
                else:
                    raw = {k: near(feats[k][layer]) for k in evaluated}
                threshold = pass_threshold(raw["val"])
                per_layer[layer] = {k: v / threshold for k, v in raw.items()}
            combos = {"last": ["last"]}
            if blocks:
                combos["sum of 4 blocks"] = list(blocks)
            for combo, layers in combos.items():
                score = {k: np.sum([per_layer[n][k] for n in layers], axis=0) for k in evaluated}
                threshold = pass_threshold(score["val"])
                print_row(kind, fit_on, combo, score, threshold, contrast)
    layout = layout_scores(sets, spec, evaluated)
    near = gaussian(feats["train"]["last"], None)
    raw = {k: near(feats[k]["last"]) for k in evaluated}
    feature_score = {k: v / pass_threshold(raw["val"]) for k, v in raw.items()}
    for name, score in (
        ("layout", layout),
        (
            "global AND layout (exported)",
            {k: np.minimum(feature_score[k], layout[k]) for k in evaluated},
        ),
    ):
        print_row(name, "train", "input 8x8", score, 1.0, contrast)
    return 0


def print_row(
    guard: str, stats: str, layers: str, score: Scores, threshold: float, contrast: Scores
) -> None:
    """One table row: pass rates on val/test, flagged real X-rays, caught non-chest images."""
    flag = {k: (score[k] > threshold) | (contrast[k] < MIN_CONTRAST) for k in score}
    cells = [f"{1 - flag['val'].mean():.1%}", f"{1 - flag['test'].mean():.1%}"]
    cells += [
        f"{flag[k].mean():.1%} ({int(flag[k].sum())}/{len(flag[k])})"
        for k in ("real", "non-chest", "confirmation")
    ]
    print(f"| {guard} | {stats} | {layers} | " + " | ".join(cells) + " |")


def layout_scores(
    sets: dict[str, np.ndarray], spec: PreprocessSpec, evaluated: tuple[str, ...]
) -> Scores:
    """The exported coarse-layout score, fitted as ``xrwatch export`` fits it; each set's
    distances divided by the validation threshold."""
    from xrwatch_export.fitting import fit_layout_stats

    layout = fit_layout_stats(sets["train"], sets["val"], spec, PASS_RATE)
    if layout is None:
        raise SystemExit(f"input side {spec.size} has no layout check")
    return {k: layout.distance(sets[k]) / layout.threshold for k in evaluated}


if __name__ == "__main__":
    raise SystemExit(main())
