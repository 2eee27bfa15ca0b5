"""The real CoronaHack subset as benchmarks/real_subset.py reads it, and its ship rule."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers.tools import require_shared_data
from xrwatch.filehash import file_sha256
from xrwatch_training.data import index_dataset
from xrwatch_training.splits import make_splits

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location(
        "real_subset", ROOT / "benchmarks" / "real_subset.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subset_counts_and_patient_split(shared_xray: Path) -> None:
    subset = require_shared_data(shared_xray / "coronahack-subset")
    rs = _script()
    index = index_dataset(subset, "multiclass")
    assert index.counts("TRAIN") == {"Normal": 263, "Bacteria": 190, "Virus": 234, "COVID-19": 55}
    assert index.counts("TEST") == {"Normal": 0, "Bacteria": 0, "Virus": 17, "COVID-19": 0}
    splits = make_splits(
        index, "patient", val_fraction=rs.VAL_FRACTION, test_fraction=rs.TEST_FRACTION, seed=0
    )
    assert splits.shared_patients() == []
    assert (len(splits.train), len(splits.val), len(splits.test)) == (502, 89, 151)
    assert all(n > 0 for n in splits.counts(index.classes)["test"].values())  # COVID-19 tested


def _row(name: str, val: float, fp32_mb: float, agreement: float, tmp: Path) -> dict:
    models = {}
    for precision in ("fp32", "int8"):
        models[precision] = tmp / f"{name}.{precision}.onnx"
        models[precision].write_bytes(f"{name}-{precision}".encode())
    cfg = {"epochs": 20, "seed": 0, "arch": "resnet50", "lr": 1e-3, "lr_step": 10,
           "lr_gamma": 0.5, "batch_size": 32, "hflip": 0.5, "vflip": 0.5, "rotation_p": 0.3,
           "rotation_degrees": 10.0, "image_size": 64}  # fmt: skip
    result = {"n_images": 0, "n_patients": 0, "classes": [], "metrics": {
        "bootstrap": {"replicates": 1}, "per_class": {}, "confusion_matrix": [],
        **{k: {"value": None, "ci": None} for k in
           ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro")}}}  # fmt: skip
    return {
        "name": name, "run_dir": str(tmp), "best_epoch": 3, "epochs_done": 4, "n_train": 502,
        "config": cfg,
        "checkpoint_sha256": "0" * 64, "val_balanced_accuracy": val,
        "wall": {"seconds": 60.0}, "models": {k: str(v) for k, v in models.items()},
        "mb": {"fp32": fp32_mb, "int8": fp32_mb / 4},
        "int8_agreement": {"all": agreement},
        "fp32": {"real": result}, "int8": {"real": result},
    }  # fmt: skip


def test_ship_picks_best_validation_and_a_faithful_small_variant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xrwatch import defaults

    rs = _script()
    monkeypatch.setattr(rs, "DEFAULT_DIR", tmp_path / "pkg")
    seen = []  # the card's heatmap/calibration/guard sections come from the shipped file
    monkeypatch.setattr(
        rs, "explain_section", lambda model, real: seen.append((model, real)) or ["## Guard X"]
    )
    rows = [
        _row("small", 0.50, 5.0, 1.0, tmp_path),  # fits as fp32, but worse on validation
        _row("big", 0.60, 94.0, 0.99, tmp_path),  # too big as fp32: int8, agreement 99 %
    ]
    shipped = rs.ship(rows, tmp_path, tmp_path / "real")
    assert shipped.read_bytes() == b"big-int8"
    card = tmp_path / "pkg" / "default.md"
    assert defaults.card_sha256(card) == file_sha256(shipped)
    assert seen == [(shipped, tmp_path / "real")] and "## Guard X" in card.read_text()
    rows[1]["int8_agreement"]["all"] = 0.97  # below 98 %: not shipped; the next best is
    assert rs.ship(rows, tmp_path, tmp_path / "real").read_bytes() == b"small-fp32"


def test_a_resumed_runs_wall_time_counts_the_epochs_before_it(tmp_path: Path) -> None:
    rs = _script()
    assert rs._epoch_seconds(tmp_path) == 0.0  # a new run: nothing before
    (tmp_path / "metrics.csv").write_text(
        "epoch,val_loss,epoch_seconds\n1,0.9,92.5\n2,0.8,117.5\n", encoding="utf-8"
    )
    assert rs._epoch_seconds(tmp_path) == pytest.approx(210.0)
