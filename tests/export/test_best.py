"""``--best``: the run with the best validation balanced accuracy is exported, and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.pipeline import ExportOptions, export_model
from export.sources import find_best
from tests.helpers.models import make_checkpoint
from xrwatch.cli._app import EXIT_OK, main
from xrwatch.errors import ConfigError
from xrwatch.modelmeta import file_sha256, read_model_metadata


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


def test_ties_go_to_the_later_epoch(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "a" / "best.pt", val_balanced_accuracy=0.8, epoch=3, size=32)
    make_checkpoint(tmp_path / "b" / "best.pt", val_balanced_accuracy=0.8, epoch=7, size=32)
    assert find_best(tmp_path).path == tmp_path / "b" / "best.pt"


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
    assert "Bacteria, Virus (1 run(s)" in str(err.value) and "multi" in str(err.value)
    assert find_best(tmp_path / "binary").path == tmp_path / "binary" / "best.pt"


def test_no_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no readable best\.pt"):
        find_best(tmp_path)
