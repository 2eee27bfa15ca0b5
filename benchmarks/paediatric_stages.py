"""The stages of ``benchmarks/paediatric_default.py`` after training: export with the
temperature chosen on held-out NLL, measure every figure of issue #20 on data the run never
tuned on, write the card, ship.

Figures, each with where it comes from:

* diagnosis (Normal / Bacteria / Virus) on held-out paediatric images, original-resolution
  and squashed separately: accuracy, macro AUROC, normal-vs-pneumonia AUROC, 95 % CIs by
  bootstrap over patients (exact Clopper-Pearson where a proportion is 0/n or n/n);
* held-out NLL and ECE (15 bins) with the shipped temperature and without it, ECE beside
  its noise floor (the ECE a perfectly calibrated model shows on that many images);
* the ``low_confidence`` rule (threshold chosen on the calibration split): the shares of the
  wrong and of the right held-out predictions it flags, accuracy of the unflagged;
* the population gate's rate (``population`` >= threshold) on held-out adult films
  (``adult/`` patients the run never saw), on every ``adult/`` film, on adult COVID-19
  images from other sources (``real/COVID-19``, ``coronahack-subset``'s), on held-out
  paediatric images; the final flags on the real DICOM files (age from the header);
* the scope guard on non-chest images (:mod:`benchmarks.nonchest`) and lateral chest views;
* robustness (:mod:`benchmarks.robustness`); int8 agreement with fp32; CAM grid and the
  share of CAM mass inside the film vs its outer band.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from paediatric_card import write_card

logger = logging.getLogger("paediatric_default")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "xrwatch" / "models"
MAX_SHIP_MB = 25.0
MIN_INT8_AGREEMENT = 0.98
CALIBRATION_IMAGES = 128  # int8 calibration: training images only
# The scope guard flags when features *or* coarse layout are unlike the training films (the
# population gate, not the guard, handles chest films of other populations and hospitals),
# each check passing 99 % of the calibration split (so >= 98 % pass both).
GUARD_COMBINE, GUARD_PASS_RATE = "either", 0.99
NOISE_FLOOR_SIMULATIONS = 200
# low_confidence: the threshold flags at most this share of the right calibration-split
# predictions (issue #24 asks for <= 25 % of the right and >= 50 % of the wrong held out)
LOW_CONFIDENCE_MAX_RIGHT = 0.2
SUBSET_TRAIN = "coronahack-subset/Coronahack-Chest-XRay-Dataset/Coronahack-Chest-XRay-Dataset/train"


# ----------------------------------------------------------------------------- export
def state_sha256(ckpt: dict[str, Any]) -> str:
    """sha256 over a checkpoint's weights (state_dict tensors, sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(ckpt["model"]):
        t = ckpt["model"][name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def choose_calibration(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The temperature and the ``low_confidence`` threshold, both from the calibration split
    (``splits/val.csv``: chose nothing). T is fitted there and kept only if it lowers NLL on
    the internal held-out test split (``splits/test.csv``); the threshold is then chosen
    there at the shipped T (:func:`xrwatch.evaluation.choose_low_confidence`, at most
    ``LOW_CONFIDENCE_MAX_RIGHT`` of the right predictions flagged) and measured again only on
    the held-out sets."""
    from xrwatch.evaluation import choose_low_confidence
    from xrwatch.preprocess import PreprocessSpec
    from xrwatch_export.explain import FeatureNet, run_feature_net
    from xrwatch_export.fitting import load_split, read_split
    from xrwatch_training.calibration import fit_temperature, nll, softmax
    from xrwatch_training.checkpoint import load_checkpoint
    from xrwatch_training.models import model_from_checkpoint

    ckpt = load_checkpoint(run / "best.pt")
    classes = tuple(ckpt["classes"])
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    net = FeatureNet(model_from_checkpoint(ckpt), n_classes=len(classes)).eval()
    data = {}
    for name in ("val", "test"):
        arrays, labels = load_split(read_split(run / "splits" / f"{name}.csv", classes), spec)
        data[name] = (run_feature_net(net, arrays)[1], labels)
    t = fit_temperature(*data["val"])
    logits, labels = data["test"]
    before, after = nll(softmax(logits), labels), nll(softmax(logits, t), labels)
    keep = after <= before
    shipped = t if keep else 1.0
    reason = (
        f"fitted on the calibration split ({len(data['val'][1])} paediatric images that chose "
        f"nothing); held-out NLL (internal test split, {len(labels)} images) "
        f"{before:.4f} at T=1 -> {after:.4f} at T={t:.3f}: "
        + ("lower, so T ships" if keep else "higher, so T = 1 ships")
    )
    temperature = {
        "fitted": t,
        "shipped": shipped,
        "reason": reason,
        "nll_test_t1": before,
        "nll_test_fitted": after,
    }
    val_logits, val_labels = data["val"]
    probs = softmax(val_logits, shipped)
    low = choose_low_confidence(
        probs.argmax(axis=1) == np.asarray(val_labels),
        probs.max(axis=1),
        max_right_flagged=LOW_CONFIDENCE_MAX_RIGHT,
    )
    low["max_right_flagged"] = LOW_CONFIDENCE_MAX_RIGHT
    low["chosen_on"] = (
        f"calibration split (splits/val.csv, {len(val_labels)} images, T={shipped:.3f})"
    )
    logger.info(
        "low_confidence threshold %.2f chosen on the %s", low["threshold"], low["chosen_on"]
    )
    return temperature, low


def _calibration_folder(run: Path, tmp: Path) -> Path:
    rows = list(csv.DictReader((run / "splits" / "train.csv").open(encoding="utf-8")))
    folder = tmp / "calibration"
    folder.mkdir()
    for i in np.random.default_rng(0).permutation(len(rows))[:CALIBRATION_IMAGES]:
        src = Path(rows[i]["path"])
        (folder / f"{i:05d}{src.suffix}").symlink_to(src.resolve())
    return folder


def export_stage(run: Path, out: Path) -> dict[str, Any]:
    """``best.pt`` -> ``OUT/models/default.onnx`` (+ ``.int8.onnx``); reused when the same
    weights and temperature were exported before."""
    from xrwatch_export.pipeline import ExportOptions, export_model, variant_path
    from xrwatch_training.checkpoint import load_checkpoint

    target = out / "models" / "default.onnx"
    stamp_path = target.with_suffix(".source.json")
    ckpt_hash = state_sha256(load_checkpoint(run / "best.pt"))
    if stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        same = stamp.get("weights") == ckpt_hash and stamp.get("guard") == GUARD_COMBINE
        if same and "low_confidence" in stamp and target.is_file():
            logger.info("%s: export of these weights found, reused", target)
            return dict(stamp)
    temperature, low = choose_calibration(run)
    with tempfile.TemporaryDirectory(prefix="xrwatch-cal-") as tmp:
        export_model(
            ExportOptions(
                source=run / "best.pt",
                output=target,
                int8=True,
                calibration=(_calibration_folder(run, Path(tmp)),),
                min_int8_agreement=0.0,
                temperature=temperature["shipped"],
                temperature_reason=temperature["reason"],
                low_confidence=low["threshold"],
                guard_combine=GUARD_COMBINE,
                guard_pass_rate=GUARD_PASS_RATE,
                card=False,
            )
        )
    stamp = {
        "weights": ckpt_hash,
        "temperature": temperature,
        "low_confidence": low,
        "guard": GUARD_COMBINE,
        "models": {"fp32": str(target), "int8": str(variant_path(target, "int8"))},
    }
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    return stamp


# ----------------------------------------------------------------------------- running
class Runner:
    """Decodes each file once and runs it through an engine: probabilities, population,
    guard outputs, CAM and the flag (the DICOM header and age included)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.cache: dict[str, tuple[np.ndarray, Any]] = {}

    def load(self, path: Path) -> tuple[np.ndarray, Any] | None:
        from xrwatch.errors import XRWatchError
        from xrwatch.preprocess import load_model_input

        key = str(path)
        if key not in self.cache:
            try:
                self.cache[key] = load_model_input(path, self.engine.spec)
            except XRWatchError as exc:
                logger.warning("%s: %s", path, exc)
                return None
        return self.cache[key]

    def run(self, paths: list[Path], batch: int = 16) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        loaded = [(p, self.load(p)) for p in paths]
        ok = [(p, x) for p, x in loaded if x is not None]
        for start in range(0, len(ok), batch):
            chunk = ok[start : start + batch]
            out = self.engine.predict_outputs(np.stack([x[0] for _, x in chunk]))
            for i, (path, (_, meta)) in enumerate(chunk):
                probs = out.probabilities[i].astype(np.float64)
                pop = None if out.population is None else float(out.population[i])
                flag, reason = self.engine.flag(
                    float(probs.max()),
                    ood_score=None if out.ood_score is None else float(out.ood_score[i]),
                    contrast=None if out.contrast is None else float(out.contrast[i]),
                    meta=meta,
                    population=pop,
                )
                rows.append(
                    {
                        "file": str(path),
                        "probs": probs,
                        "population": pop,
                        "flag": flag,
                        "reason": reason,
                        "cam": None if out.cam is None else out.cam[i],
                    }
                )
        return rows

    def arrays(self, paths: list[Path]) -> np.ndarray:
        return np.stack([x[0] for p in paths if (x := self.load(p)) is not None])


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- measures
def binary_auroc_ci(
    positive: np.ndarray, score: np.ndarray, groups: list[str], seed: int = 0, n: int = 1000
) -> dict[str, Any]:
    from xrwatch.evaluation import auroc

    value = auroc(positive, score)
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = []
    for counts in rng.multinomial(len(names), np.full(len(names), 1 / len(names)), size=n):
        idx = np.repeat(np.arange(len(score)), counts[inverse])
        v = auroc(positive[idx], score[idx])
        if v is not None:
            draws.append(v)
    ci = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))] if draws else None
    return {"value": value, "ci": ci}


def ece_noise_floor(confidence: np.ndarray, bins: int = 15, seed: int = 0) -> dict[str, float]:
    """ECE of a perfectly calibrated model with these confidences: labels drawn right with
    probability = confidence; mean and 95th percentile over simulations."""
    from xrwatch_training.calibration import expected_calibration_error

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(NOISE_FLOOR_SIMULATIONS):
        right = rng.random(len(confidence)) < confidence
        probs = np.stack([confidence, 1 - confidence], axis=1)
        values.append(expected_calibration_error(probs, np.where(right, 0, 1), bins))
    return {"mean": float(np.mean(values)), "p95": float(np.percentile(values, 95))}


def diagnosis_figures(
    rows: list[dict[str, Any]],
    labels: list[str],
    groups: list[str],
    classes: tuple[str, ...],
    temperature: float,
    low_confidence: float,
) -> dict[str, Any]:
    from xrwatch.evaluation import evaluate_with_ci, flag_rates
    from xrwatch_training.calibration import expected_calibration_error, nll, softmax

    y = np.array([classes.index(label) for label in labels])
    p = np.stack([r["probs"] for r in rows])
    m = evaluate_with_ci(y, p, groups, classes)
    normal = classes.index("Normal")
    pneumonia = y != normal
    m["normal_vs_pneumonia_auroc"] = binary_auroc_ci(pneumonia, 1 - p[:, normal], groups)
    p1 = softmax(temperature * np.log(np.clip(p, 1e-12, 1)))  # the same logits at T = 1
    m["nll"] = {"shipped": nll(p, y), "t1": nll(p1, y)}
    m["ece"] = {
        "shipped": expected_calibration_error(p, y),
        "t1": expected_calibration_error(p1, y),
        "noise_floor": ece_noise_floor(p.max(axis=1)),
    }
    m["flags"] = {f: sum(r["flag"] == f for r in rows) for f in {r["flag"] for r in rows}}
    # the stored low_confidence rule alone (top probability < threshold), right vs wrong
    m["low_confidence"] = flag_rates(p.argmax(axis=1) == y, p.max(axis=1), low_confidence)
    return m


def cam_inside_share(rows: list[dict[str, Any]], classes: tuple[str, ...]) -> dict[str, Any]:
    """Mean share of the (min-max scaled, predicted-class) CAM mass in the grid's inner cells
    (the film) against its outer ring (borders, labels, collimation)."""
    shares = []
    for r in rows:
        if r["cam"] is None:
            continue
        cam = r["cam"][int(np.argmax(r["probs"]))]
        cam = np.maximum(cam, 0)
        lo, hi = cam.min(), cam.max()
        if hi <= lo:
            continue
        c = (cam - lo) / (hi - lo)
        h, w = c.shape
        inner = c[1 : h - 1, 1 : w - 1].sum() / c.sum()
        area = (h - 2) * (w - 2) / (h * w)
        shares.append((inner, area))
    if not shares:
        return {}
    inner = np.array([s[0] for s in shares])
    return {
        "grid": list(rows[0]["cam"].shape[1:]),
        "inner_share": float(inner.mean()),
        "inner_area": shares[0][1],
        "n": len(shares),
    }


def measure(run: Path, stamp: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of the card, measured on the exported files."""
    from robustness import changed_fractions

    from xrwatch.engine import InferenceEngine
    from xrwatch.modelmeta import read_model_metadata

    data = Path(args.data)
    splits = run / "splits"
    threads = getattr(args, "threads", None) or 0  # 1 on a busy shared machine
    fp32 = InferenceEngine(Path(stamp["models"]["fp32"]), use_gpu=False, intra_op_threads=threads)
    int8 = InferenceEngine(Path(stamp["models"]["int8"]), use_gpu=False, intra_op_threads=threads)
    classes = fp32.classes
    temperature = float(stamp["temperature"]["shipped"])
    runner, runner8 = Runner(fp32), Runner(int8)
    low = float(fp32.low_confidence or 0.0)  # as stored in the exported file
    if abs(low - float(stamp["low_confidence"]["threshold"])) > 1e-9:
        raise SystemExit(
            f"{fp32.path}: stores low_confidence {low}, chosen {stamp['low_confidence']}"
        )
    report: dict[str, Any] = {
        "temperature": stamp["temperature"],
        "low_confidence": stamp["low_confidence"],
        "weights": stamp["weights"],
    }

    held = {
        "kermany TEST (squashed by source)": [
            r for r in read_rows(splits / "heldout-kermany-test.csv") if r["squashed"] == "1"
        ],
        "kermany TEST (original resolution: coronahack-subset's TEST Virus)": [
            r for r in read_rows(splits / "heldout-kermany-test.csv") if r["squashed"] != "1"
        ],
        "real/ Kermany classes (original resolution)": read_rows(
            splits / "heldout-real-kermany.csv"
        ),
        "internal test split (original resolution)": [
            r for r in read_rows(splits / "test.csv") if r["squashed"] != "1"
        ],
        "internal test split (squashed by source)": [
            r for r in read_rows(splits / "test.csv") if r["squashed"] == "1"
        ],
    }
    held["ALL held-out, original resolution"] = [
        r for k, v in held.items() if "original" in k for r in v
    ]
    held["ALL held-out, squashed"] = [
        r for k, v in held.items() if "squashed" in k and not k.startswith("ALL") for r in v
    ]
    results: dict[str, Any] = {}
    for name, rows in held.items():
        if not rows:
            continue
        out = runner.run([Path(r["path"]) for r in rows])
        keep = {o["file"] for o in out}
        rows = [r for r in rows if r["path"] in keep]
        results[name] = diagnosis_figures(
            out, [r["label"] for r in rows], [r["group"] for r in rows], classes, temperature, low
        )
        results[name]["population_flagged"] = _gate_rate(out, fp32)
    report["diagnosis"] = results

    # int8 agreement on the real test images (held-out, both kinds)
    files = [Path(r["path"]) for k, v in held.items() if not k.startswith("ALL") for r in v]
    a = runner.run(files)
    b = runner8.run(files)
    same = sum(
        int(np.argmax(x["probs"]) == np.argmax(y["probs"])) for x, y in zip(a, b, strict=True)
    )
    report["int8_agreement"] = {"agree": same, "n": len(a), "rate": same / max(len(a), 1)}
    report["cam"] = cam_inside_share(a, classes)

    # population gate
    covid = [
        p for p in sorted((data / SUBSET_TRAIN).iterdir()) if _subset_label(data, p) == "COVID-19"
    ]
    laterals = _laterals(data)
    gate_sets = {
        "adult/ held-out patients (adult-test split)": [
            Path(r["path"]) for r in read_rows(splits / "adult-test.csv")
        ],
        "adult/ all 807 (incl. the patients trained on)": [
            data / r["relpath"] for r in read_rows(data / "adult" / "MANIFEST.csv")
        ],
        "real/COVID-19 (adults, other hospitals; never trained on)": sorted(
            (data / "real" / "COVID-19").iterdir()
        ),
        "coronahack-subset COVID-19 (adults; never trained on)": [
            p for p in covid if p.name not in laterals
        ],
        "paediatric held-out (all sets above)": files,
    }
    cap = getattr(args, "max_images", None)  # smoke runs: a few images per set
    report["gate"] = {
        name: _gate_rate(runner.run(paths[:cap] if cap else paths), fp32)
        for name, paths in gate_sets.items()
    }
    report["dicom"] = [
        {
            "file": r["file"].rsplit("/", 1)[-1],
            "flag": r["flag"],
            "reason": r["reason"],
            "population": r["population"],
        }
        for r in runner.run(sorted((data / "dicom").glob("*.dcm")))
    ]

    # scope guard: non-chest sets and lateral views
    from explain import non_chest_sets

    with tempfile.TemporaryDirectory() as tmp:
        report["non_chest"] = [
            {"title": title, "flagged": sum(h for _, h, _ in rows), "n": len(rows)}
            for title, _, rows in non_chest_sets(fp32, Path(tmp))
        ]
    lat = runner.run([p for p in covid if p.name in laterals])
    report["laterals"] = {
        "n": len(lat),
        "out_of_scope": sum(r["flag"] == "out_of_scope" for r in lat),
        "any_flag": sum(bool(r["flag"]) for r in lat),
        "flags": [r["flag"] or "none" for r in lat],
    }

    # robustness on the held-out images
    rob_files = [
        Path(r["path"])
        for k, v in held.items()
        if not k.startswith("ALL") and not k.startswith("internal")
        for r in v
    ]
    arrays = runner.arrays(rob_files)
    base = fp32.predict_arrays(arrays)
    report["robustness"] = changed_fractions(
        fp32.predict_arrays, arrays, [classes[i] for i in base.argmax(axis=1)]
    )
    report["robustness_images"] = len(arrays)
    report["meta"] = {k: read_model_metadata(Path(v)).to_dict() for k, v in stamp["models"].items()}
    report["sizes_mb"] = {k: Path(v).stat().st_size / 1e6 for k, v in stamp["models"].items()}
    from xrwatch_export.contract import weights_sha256

    report["weights_sha256"] = {k: weights_sha256(Path(v)) for k, v in stamp["models"].items()}
    return report


def _gate_rate(rows: list[dict[str, Any]], engine: Any) -> dict[str, Any]:
    thr = engine.population_threshold
    scores = [r["population"] for r in rows if r["population"] is not None]
    hit = sum(s >= thr for s in scores) if thr is not None else 0
    flags = {f or "none": sum(r["flag"] == f for r in rows) for f in {r["flag"] for r in rows}}
    return {"gate": hit, "n": len(scores), "rate": hit / max(len(scores), 1), "flags": flags}


def _subset_label(data: Path, path: Path) -> str:
    if not hasattr(_subset_label, "labels"):
        rows = read_rows(data / "coronahack-subset" / "MANIFEST.csv")
        _subset_label.labels = {r["relpath"].rsplit("/", 1)[-1]: r["label"] for r in rows}  # type: ignore[attr-defined]
    return str(_subset_label.labels.get(path.name, ""))  # type: ignore[attr-defined]


def _laterals(data: Path) -> set[str]:
    rows = read_rows(data / "coronahack" / "covid_collection_patients.csv")
    return {r["X_ray_image_name"] for r in rows if r["view"].strip().upper() in ("L", "LATERAL")}


# ----------------------------------------------------------------------------- ship
def choose_precision(report: dict[str, Any]) -> str:
    """int8 when it agrees with fp32 on >= 98 % of the held-out real images (the smaller file,
    as before), else fp32 when it fits in MAX_SHIP_MB."""
    agreement = report["int8_agreement"]["rate"]
    if agreement >= MIN_INT8_AGREEMENT and report["sizes_mb"]["int8"] <= MAX_SHIP_MB:
        return "int8"
    if report["sizes_mb"]["fp32"] <= MAX_SHIP_MB:
        logger.warning("int8 agrees with fp32 on %.1f%% only: shipping fp32", 100 * agreement)
        return "fp32"
    raise SystemExit("no variant small and faithful enough to ship")


def finish(run: Path, args: argparse.Namespace) -> int:
    from xrwatch.filehash import file_sha256

    out = Path(args.out)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    stamp = export_stage(run, out)
    report = measure(run, stamp, args)
    precision = choose_precision(report)
    source = Path(stamp["models"][precision])
    report["shipped"] = {
        "precision": precision,
        "file_sha256": file_sha256(source),
        "weights_sha256": report["weights_sha256"][precision],
    }
    (out / "report.json").write_text(
        json.dumps(report, indent=2, default=_jsonable) + "\n", encoding="utf-8"
    )
    card = write_card(report, run, out / "card.md")
    print(card)
    if args.ship:
        DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, DEFAULT_DIR / "default.onnx")
        shutil.copyfile(out / "card.md", DEFAULT_DIR / "default.md")
        logger.info("shipped %s (%s) as %s", source, precision, DEFAULT_DIR / "default.onnx")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)
