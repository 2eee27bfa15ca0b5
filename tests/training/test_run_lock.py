from __future__ import annotations

import json
from pathlib import Path

import pytest

from xrwatch.cli import main
from xrwatch.errors import ConfigError
from xrwatch_training.engine import hold_run_folder
from xrwatch_training.presets import TrainConfig


def test_a_run_folder_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    with (
        hold_run_folder(tmp_path),
        pytest.raises(ConfigError, match="in use by another training process"),
        hold_run_folder(tmp_path),
    ):
        pass
    with hold_run_folder(tmp_path):  # released when the holder is done
        pass


def test_resume_of_a_run_still_training_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    cfg = TrainConfig(arch="tinycnn", weights="none", data=str(tmp_path), device="cpu")
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    with hold_run_folder(run):  # stands for the training process still writing it
        code = main(["train", "--resume", str(run), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "in use by another training process" in err
    assert not (run / "last.pt").exists()
