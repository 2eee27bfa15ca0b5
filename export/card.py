"""The model card, ``model.md``, written beside the exported model."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xrwatch.metrics_ci import coverage_note, format_ci
from xrwatch.modelmeta import ModelMeta

logger = logging.getLogger(__name__)


def _metric_rows(metrics: Mapping[str, Any], classes: Sequence[str]) -> list[str]:
    rows = []
    for split in ("val", "test"):
        values = metrics.get(split)
        if not isinstance(values, Mapping):
            rows.append(f"| {split} | not recorded | | | |")
            continue

        def fmt(key: str, values: Mapping[str, Any] = values) -> str:
            v = values.get(key)
            if not isinstance(v, (int, float)):
                return "-"
            ci = format_ci(values.get("ci95"), key, percent=False)
            return f"{v:.4f} {ci}".strip()

        covers = (
            (coverage_note(values, classes).strip(" ()") or "all classes")
            if values.get("per_class")
            else "-"
        )
        rows.append(
            f"| {split} | {fmt('accuracy')} | {fmt('balanced_accuracy')} | {fmt('macro_f1')} "
            f"| {covers} |"
        )
    return rows


# Fields of the training config (training.presets.TrainConfig) the card shows.
DATA_KEYS = ("data", "task", "split", "val_fraction", "test_fraction", "extra", "seed")
RECIPE_KEYS = (
    "arch", "weights", "loss", "focal_gamma", "focal_alpha", "sampler", "epochs",
    "batch_size", "lr", "weight_decay", "lr_step", "lr_gamma", "hflip", "vflip", "rotation_p",
    "rotation_degrees", "image_size", "resize", "aspect",
)  # fmt: skip


def render_card(
    meta: ModelMeta,
    *,
    variants: Sequence[tuple[str, str, str]],
    checkpoint: str,
    selection: str,
    config: Mapping[str, Any],
    verification: Sequence[str],
) -> str:
    """Markdown for ``meta``; ``variants`` are ``(file, precision, sha256)``."""
    spec = meta.spec
    data = {k: config[k] for k in DATA_KEYS if k in config}
    recipe = {k: config[k] for k in RECIPE_KEYS if k in config}
    lines = [
        f"# xrwatch model: {meta.arch} ({meta.experiment})",
        "",
        "> **Research use only.** This model is not a medical device. It has not been cleared",
        "> or approved by any regulator and must not be used for diagnosis or treatment.",
        "",
        "## Intended use",
        "",
        "Research on chest X-ray classification: reproducing a published transfer-learning",
        "study and testing the xrwatch serving pipeline. Not for clinical decisions, not for",
        "triage, not for populations or devices the training data does not represent.",
        "",
        "## Files",
        "",
        "| file | precision | sha256 |",
        "|---|---|---|",
        *(f"| `{name}` | {precision} | `{sha}` |" for name, precision, sha in variants),
        "",
        f"Source checkpoint: `{checkpoint}` (sha256 `{meta.checkpoint_sha256}`); {selection}.",
        f"Exported by xrwatch {meta.version} at {meta.created_at}.",
        "",
        "## Classes",
        "",
        *(f"{i}. {name}" for i, name in enumerate(meta.classes)),
        "",
        f"Task: {meta.task}. Outputs `logits` and `probabilities` (softmax), N x "
        f"{len(meta.classes)}, columns in the order above.",
        "",
        "## Data and experiment",
        "",
        f"Experiment preset `{meta.experiment}`, architecture `{meta.arch}`; training config "
        f"sha256 `{meta.config_sha256}`.",
    ]
    for title, values in (("Data", data), ("Training recipe", recipe)):
        if values:
            lines += ["", f"{title}:", "", "```json", json.dumps(values, indent=2, default=str)]
            lines += ["```"]
    lines += [
        "",
        "## Metrics (from the checkpoint)",
        "",
        "In brackets: 95 % confidence interval, bootstrap over patients (seeded).",
        "",
        "| split | accuracy | balanced accuracy | macro F1 | classes |",
        "|---|---|---|---|---|",
        *_metric_rows(meta.metrics, meta.classes),
        "",
        "## Preprocessing",
        "",
        "Input `image`: float32 N x 1 x H x W in [0, 1], produced by "
        "`xrwatch.preprocess.load_model_input` with this spec (stored in the model):",
        "",
        f"- size {spec.size} x {spec.size}, resize `{spec.resize}`, aspect `{spec.aspect}`",
        f"- inside the graph: 1 → 3 channels, normalise with mean {list(spec.mean)}, "
        f"std {list(spec.std)}",
        f"- preprocessing version {spec.version}",
        "",
        "## Verification at export",
        "",
        *(f"- {line}" for line in verification),
        "",
        *explain_lines(meta),
        "## Limitations",
        "",
        "- Trained on public research data; performance on other hospitals, devices, ages and",
        "  disease mixes is unknown.",
        "- The CoronaHack COVID-19 images come from different sources than the other classes,",
        "  so a model can separate them by shortcut (format, contrast) rather than pathology.",
        "- A confident output is not a correct output, even calibrated; the scope guard"
        if meta.guard is not None
        else "- A confident output is not a correct output; there is no out-of-distribution check.",
        *(
            [
                "  catches inputs unlike the training images, not every wrong answer on a",
                "  genuine chest X-ray.",
            ]
            if meta.guard is not None
            else []
        ),
        "",
    ]
    return "\n".join(lines)


def explain_lines(meta: ModelMeta, guard_rates: Sequence[str] = ()) -> list[str]:
    """Card sections on heatmaps, calibration and the scope guard (when the model has them).

    ``guard_rates``: Markdown lines with the guard's measured rates, when the caller measured
    them (``benchmarks/real_subset.py --ship`` does, for the shipped default model)."""
    lines: list[str] = []
    if meta.cam is not None:
        shape = meta.cam.get("shape", [])
        lines += [
            "## Heatmaps (class activation maps)",
            "",
            f"Output `cam` ({' x '.join(str(d) for d in ['N', *shape])}): for each class, the "
            f"last feature map (`{meta.cam.get('layer')}`) weighted by that class's head "
            "weights (CAM, Zhou et al. 2016; equal to Grad-CAM for this architecture, checked "
            "against pytorch-grad-cam in the tests). Serving upsamples the predicted class's "
            "map and overlays it on the model input.",
            "",
            "What it is: where, in this image, the evidence for the predicted class was "
            "strongest relative to the rest of the image, at the resolution of the last "
            "feature map. What it is not: not a segmentation of a finding, not a measure of "
            "certainty, not proof of what caused the prediction; a map on the image border, "
            "a marker or text points to a shortcut, not to disease.",
            "",
        ]
    cal = meta.calibration
    if cal is not None:
        lines += [
            "## Calibration",
            "",
            f"Temperature scaling fitted on the validation split: T = "
            f"{float(cal.get('temperature', 1.0)):.4f}, inside the graph "
            "(`probabilities` = softmax(`logits` / T); the top-1 class never changes).",
            "",
            *_ece_table(cal),
        ]
        lines += ["", *_low_confidence_lines(cal), ""]
    guard = meta.guard
    if guard is not None:
        test = guard.get("test_pass_rate")
        layout = guard.get("layout")
        output = "`feature_score`" if isinstance(layout, dict) else "`ood_score`"
        lines += [
            "## Scope guard (out_of_scope)",
            "",
            f"Feature score (output {output}): Mahalanobis distance of the pooled "
            f"`{guard.get('layer')}` features ({guard.get('features')} values) to those of the "
            f"{guard.get('n_train')} training images (Ledoit-Wolf covariance, constants in "
            "the graph), divided by the threshold at which "
            f"{float(guard.get('target_pass_rate', 0)):.0%} of the {guard.get('n_val')} "
            "validation images pass.",
        ]
        if isinstance(layout, dict):
            lines += [
                f"Output `layout_score`: the image's coarse layout - its {layout.get('grid')} x "
                f"{layout.get('grid')} block means, standardised - against the training images'"
                f": its distance under a probabilistic PCA of them ({layout.get('components')} "
                "principal components, isotropic noise for the rest), divided by its own "
                "threshold chosen the same way. "
                "`ood_score` is the smaller of the two: a result is out of scope only when "
                "both its features and its layout are unlike the training chest X-rays (a "
                "chest X-ray from another hospital moves the features but keeps the layout).",
            ]
        else:
            lines += ["This model has no layout check: its `ood_score` is the feature score."]
        lines += [
            f"Validation images passing: {float(guard.get('val_pass_rate', 0)):.1%}"
            + (f"; test split {float(test):.1%}" if isinstance(test, (int, float)) else "")
            + ". Output `contrast`: the input's standard deviation; below "
            f"{guard.get('min_contrast')} the image is blank or constant. Either makes a "
            "result `out_of_scope`, and so do DICOM headers naming another modality, body "
            "part or a lateral view. Flagged results keep their probabilities.",
            "",
        ]
        lines += list(guard_rates) or [
            "Measured rates on real chest X-rays and non-chest images: see the README "
            "(`benchmarks/explain.py`); they depend on the model.",
        ]
        lines += [""]
    return lines


def write_card(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    logger.info("wrote model card %s", path)
    return path


def _ece_table(cal: Mapping[str, Any]) -> list[str]:
    """The calibration table and what it means: measured on the file itself when export did
    (``measured_on``), with 95 % bootstrap intervals; older cards show the torch figures."""
    ece = cal.get("ece") or {}
    bins = cal.get("bins", 15)
    measured = cal.get("measured_on")
    boot = cal.get("bootstrap") or {}
    lines = [
        f"ECE ({bins} equal-width bins, top label) "
        + (
            f"measured on this file ({measured}, ONNX Runtime on the CPU); the change's 95 % "
            f"interval comes from {boot.get('resamples')} bootstrap resamples of the split's "
            "images, scored before and after on the same resample:"
            if measured
            else "of the fp32 network the temperature was fitted on:"
        ),
        "",
        "| split | images | ECE before | ECE after | change (95 % interval) |",
        "|---|---|---|---|---|",
    ]
    for split in ("val", "test"):
        e = ece.get(split)
        if isinstance(e, dict):
            before, after = float(e["before"]), float(e["after"])
            change = e.get("interval_change")
            within = f" ({float(change[0]):+.3f} to {float(change[1]):+.3f})" if change else ""
            lines.append(
                f"| {split} | {e.get('n')} | {before:.4f} | {after:.4f} | "
                f"{after - before:+.4f}{within} |"
            )
    for split in ("val", "test"):
        e = ece.get(split)
        if not isinstance(e, dict) or float(e["after"]) <= float(e["before"]):
            continue
        change = e.get("interval_change")
        n_val = (ece.get("val") or {}).get("n")
        if change and float(change[0]) > 0:
            verdict = "and the whole interval of the change lies above 0"
        elif change:
            verdict = f"though the interval of the change holds 0: {e.get('n')} images cannot tell"
        else:
            verdict = "(no interval recorded)"
        lines += [
            "",
            f"On {split} the temperature made ECE worse, {verdict}. Fitted on {n_val} "
            "validation images, it does not carry over there; read these probabilities as "
            "rankings more than as frequencies.",
        ]
    return lines


def _low_confidence_lines(cal: Mapping[str, Any]) -> list[str]:
    """The ``low_confidence`` threshold and, when it was chosen on validation data, how and
    with which rates there (the held-out rates are ``xrwatch evaluate``'s to measure)."""
    low = cal.get("low_confidence")
    lines = [
        f"Results whose calibrated top probability is below {low} are flagged "
        "`low_confidence` (overridable in the serve config and by `classify "
        "--low-confidence`)."
    ]
    rule = cal.get("low_confidence_rule") or {}
    if rule.get("chosen_on", "given") != "given":
        share = float(rule.get("max_right_flagged", 0.0))
        wrong, right = rule.get("wrong_flagged"), rule.get("right_flagged")
        lines[0] += (
            f" The threshold was chosen on the {rule['chosen_on']}: the highest that flags at "
            f"most {share:.0%} of the right predictions there; it flags "
            + (f"{wrong:.1%}" if wrong is not None else "n/a")
            + f" of {rule.get('n_wrong')} wrong and "
            + (f"{right:.1%}" if right is not None else "n/a")
            + f" of {rule.get('n_right')} right ones there. Measure it on held-out data with "
            "`xrwatch evaluate` (its risk-coverage table)."
        )
    return lines
