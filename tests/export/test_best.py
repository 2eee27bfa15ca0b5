"""``--best``: the run with the best validation balanced accuracy is exported, and why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.models import make_checkpoint
from xrwatch.cli._app import EXIT_OK, main
from xrwatch.errors import ConfigError
from xrwatch.modelmeta import file_sha256, read_model_metadata
from xrwatch_export.pipeline import ExportOptions, export_model
from xrwatch_export.sources import find_best
from xrwatch_training.checkpoint import load_checkpoint
from xrwatch_training.report import write_table1
from xrwatch_training.reproduce import run_summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_checkpoint(
        root / "prce-resnet" / "best.pt", val_balanced_accuracy=0.71, size=32, experiment="PRCE"
    )
    make_checkpoint(
        root / "prce-dense" / "best.pt",
        val_balanced_accuracy=0.84,
        size=32,
        experiment="PRDE",
        seed=1,
    )
    make_checkpoint(
        root / "nested" / "bvce" / "best.pt",
        val_balanced_accuracy=0.79,
        size=32,
        experiment="BVCE",
        seed=2,
    )
    (root / "crashed").mkdir()
    (root / "crashed" / "best.pt").write_bytes(b"half a checkpoint")
    (root / "no-best-yet").mkdir()
    make_checkpoint(root / "no-best-yet" / "last.pt", val_balanced_accuracy=0.99, size=32)
    return root


def test_find_best_ranks_by_validation_balanced_accuracy(runs: Path) -> None:
    selection = find_best(runs)
    assert selection.path == runs / "prce-dense" / "best.pt"
    assert [c.score for c in selection.candidates] == [0.84, 0.79, 0.71]
    assert "0.8400" in selection.reason and "prce-dense" in selection.reason
    assert "balanced accuracy" in selection.reason
    assert "next best" in selection.reason and "0.7900" in selection.reason


def _run_folder(run: Path, **kwargs: Any) -> Path:
    """A finished run folder as training leaves it: best.pt, config.json, test_metrics.json."""
    make_checkpoint(run / "best.pt", **kwargs)
    ckpt = load_checkpoint(run / "best.pt")
    (run / "config.json").write_text(json.dumps(ckpt["config"]))
    summary = {
        "classes": ckpt["classes"],
        "best_epoch": ckpt["epoch"],
        "test": None,
        "val_at_best": ckpt["metrics"]["val"],
        "train_at_best": ckpt["metrics"]["train"],
    }
    (run / "test_metrics.json").write_text(json.dumps(summary))  # fmt: skip
    return run


def _table1_best(root: Path, names: list[str]) -> str:
    md, _ = write_table1({n: run_summary(root / n) for n in names}, root)
    line = next(x for x in md.read_text().splitlines() if x.startswith("Best run"))
    return line.split("`")[-2]


def test_a_tie_names_the_same_run_in_table1_and_export_best(tmp_path: Path) -> None:
    # Equal validation balanced accuracy: the lower validation loss wins, wherever the run
    # sits in the table and whatever its epoch; equal losses go to the run path's order.
    _run_folder(tmp_path / "PRCE", val_balanced_accuracy=0.8, val_loss=0.9, epoch=9)
    _run_folder(tmp_path / "PRCW", val_balanced_accuracy=0.8, val_loss=0.4, epoch=2, seed=1)
    _run_folder(tmp_path / "PRFL", val_balanced_accuracy=0.7, val_loss=0.1, epoch=5, seed=2)
    for names in (["PRCE", "PRCW", "PRFL"], ["PRFL", "PRCW", "PRCE"]):
        assert _table1_best(tmp_path, names) == str(tmp_path / "PRCW")
    selection = find_best(tmp_path)
    assert selection.path == tmp_path / "PRCW" / "best.pt"
    assert "a tie, broken by the lower validation loss" in selection.reason
    same = tmp_path / "same"
    _run_folder(same / "b", val_balanced_accuracy=0.8, val_loss=0.5, epoch=9)
    _run_folder(same / "a", val_balanced_accuracy=0.8, val_loss=0.5, epoch=1, seed=1)
    assert find_best(same).path == same / "a" / "best.pt"
    assert _table1_best(same, ["b", "a"]) == str(same / "a")


def test_runs_on_different_data_or_splits_are_not_ranked_together(tmp_path: Path) -> None:
    _run_folder(tmp_path / "real", val_balanced_accuracy=0.6, data="data/coronahack")
    _run_folder(tmp_path / "synth", val_balanced_accuracy=0.9, data="data/synth", seed=1)
    _run_folder(tmp_path / "seed1", val_balanced_accuracy=0.7, data="data/synth", split_seed=1)
    with pytest.raises(ConfigError, match="not comparable") as err:
        find_best(tmp_path)
    message = str(err.value)
    assert "differ in data, seed" in message
    assert "data data/coronahack; seed 0: 1 run(s)" in message
    assert "data data/synth; seed 0: 1 run(s)" in message and "seed 1: 1 run(s)" in message
    md, _ = write_table1({n: run_summary(tmp_path / n) for n in ("real", "synth")}, tmp_path)
    assert "No best run named" in md.read_text()
    assert find_best(tmp_path / "synth").path == tmp_path / "synth" / "best.pt"


def test_export_best_writes_that_checkpoint(runs: Path, tmp_path: Path) -> None:
    result = export_model(ExportOptions(source=runs, best=True, output=tmp_path / "model.onnx"))
    chosen = runs / "prce-dense" / "best.pt"
    assert result.selection.path == chosen
    meta = read_model_metadata(tmp_path / "model.onnx")
    assert meta.checkpoint_sha256 == file_sha256(chosen)
    assert meta.experiment == "PRDE"
    card = (tmp_path / "model.md").read_text()
    assert "prce-dense" in card and "0.8400" in card


def test_cli_best_says_which_and_why(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["export", str(runs), "--best", "-o", str(tmp_path / "model.onnx"), "--no-card"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "prce-dense" in out and "best validation balanced accuracy" in out
    assert not (tmp_path / "model.md").exists()


def test_runs_of_different_tasks_are_not_ranked_together(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "multi" / "best.pt", val_balanced_accuracy=0.7, size=32)
    make_checkpoint(
        tmp_path / "binary" / "best.pt", classes=("Bacteria", "Virus"), val_balanced_accuracy=0.8
    )
    with pytest.raises(ConfigError, match="not comparable") as err:
        find_best(tmp_path)
    assert "differ in classes, task" in str(err.value)
    assert "classes Bacteria, Virus; task binary: 1 run(s)" in str(err.value)
    assert "multi" in str(err.value)
    assert find_best(tmp_path / "binary").path == tmp_path / "binary" / "best.pt"


def test_no_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no readable best\.pt"):
        find_best(tmp_path)
