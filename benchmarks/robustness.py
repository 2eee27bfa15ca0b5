"""How often a model's answer changes under what a PACS does to the pixels of a film.

    .venv/bin/python benchmarks/robustness.py --model xrwatch/models/default.onnx \
        ../shared/data/xray/real/Normal ../shared/data/xray/real/Bacteria ...

For each input (each held-out image, decoded and preprocessed by
:func:`xrwatch.preprocess.load_model_input`, so every transform acts on the 224 x 224 model
input in [0, 1]) it prints the fraction of top-1 predictions that change under:

* ``autocontrast 2 %``: the darkest and brightest 2 % of pixels clipped, the rest stretched
  to [0, 1] (a routine display operation; Pillow's ``ImageOps.autocontrast(cutoff=2)``);
* ``black border 10 %``: the image scaled into the central 80 % of the field, a black
  border of 10 % of the side around it (letterboxing, collimation);
* ``histogram equalisation``: 256-level equalisation (``ImageOps.equalize``);
* ``JPEG q75``: re-encoded as an 8-bit JPEG at quality 75.

Targets of issue #20: <= 10 % changed under autocontrast and under the border.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

logger = logging.getLogger("robustness")

TARGET = 0.10  # at most this fraction may change (autocontrast, border)


def _to_image(x: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")


def _to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


def autocontrast(x: np.ndarray) -> np.ndarray:
    return _to_array(ImageOps.autocontrast(_to_image(x), cutoff=2))


def black_border(x: np.ndarray, fraction: float = 0.10) -> np.ndarray:
    size = x.shape[0]
    inner = max(1, round(size * (1 - 2 * fraction)))
    small = _to_image(x).resize((inner, inner), Image.Resampling.BILINEAR)
    out = np.zeros_like(x)
    start = (size - inner) // 2
    out[start : start + inner, start : start + inner] = _to_array(small)
    return out


def equalise(x: np.ndarray) -> np.ndarray:
    return _to_array(ImageOps.equalize(_to_image(x)))


def jpeg75(x: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    _to_image(x).save(buf, format="JPEG", quality=75)
    buf.seek(0)
    return _to_array(Image.open(buf))


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "autocontrast 2 %": autocontrast,
    "black border 10 %": black_border,
    "histogram equalisation": equalise,
    "JPEG q75": jpeg75,
}
TARGETS = {"autocontrast 2 %": TARGET, "black border 10 %": TARGET}


def changed_fractions(
    predict: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, labels: list[str]
) -> dict[str, dict[str, Any]]:
    """``transform -> {"changed", "n", "rate", "by_class": {class: [changed, n]}}``:
    top-1 changes of ``predict`` (N x S x S -> N x C probabilities) under each transform;
    ``labels`` (the original predictions' class names, or the truth) group the counts."""
    base = predict(inputs).argmax(axis=1)
    out: dict[str, dict[str, Any]] = {}
    for name, transform in TRANSFORMS.items():
        moved = np.stack([transform(x) for x in inputs]).astype(np.float32)
        after = predict(moved).argmax(axis=1)
        diff = after != base
        by_class: dict[str, list[int]] = {}
        for label, d in zip(labels, diff, strict=True):
            by_class.setdefault(label, [0, 0])
            by_class[label][0] += int(d)
            by_class[label][1] += 1
        out[name] = {"changed": int(diff.sum()), "n": len(diff),
                     "rate": float(diff.mean()) if len(diff) else float("nan"),
                     "by_class": by_class}  # fmt: skip
    return out


def lines(result: dict[str, dict[str, Any]]) -> list[str]:
    text = []
    for name, r in result.items():
        target = TARGETS.get(name)
        met = target is not None and r["rate"] <= target
        verdict = (
            "" if target is None else f" (target <= {target:.0%}: {'met' if met else 'NOT met'})"
        )
        per = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(r["by_class"].items()))
        text.append(
            f"- {name}: {r['changed']}/{r['n']} = {r['rate']:.1%} changed{verdict}; "
            f"by predicted class: {per}"
        )
    return text


def main() -> int:
    from xrwatch.engine import InferenceEngine
    from xrwatch.inputs import expand_inputs
    from xrwatch.preprocess import load_model_input

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "xrwatch" / "models" / "default.onnx"))
    p.add_argument("inputs", nargs="+", type=Path, help="held-out images or folders")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    engine = InferenceEngine(Path(args.model), use_gpu=False)
    files = expand_inputs(args.inputs)
    arrays = np.stack([load_model_input(f, engine.spec)[0] for f in files])
    preds = engine.predict_arrays(arrays)
    labels = [engine.classes[i] for i in preds.argmax(axis=1)]
    result = changed_fractions(engine.predict_arrays, arrays, labels)
    print(f"{engine.meta.name}: {len(files)} images")
    print("\n".join(lines(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
