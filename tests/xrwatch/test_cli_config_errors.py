"""A typo in a config file is an error naming the nearest valid table or key, never
silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from xrwatch.cli._app import EXIT_ERROR, main
from xrwatch.config import read_toml
from xrwatch.errors import ConfigError


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xrwatch.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_misspelt_table_is_an_error_naming_the_right_one(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[server]\nincoming = "in"\n')
    with pytest.raises(ConfigError, match=r"unknown table \[server\]; did you mean \[serve\]"):
        read_toml(path, table="serve")


def test_both_known_tables_may_share_a_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[serve]\nincoming = "in"\n[train]\nepochs = 2\n')
    assert read_toml(path, table="serve") == {"incoming": "in"}
    assert read_toml(path, table="train") == {"epochs": 2}


def test_a_top_level_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown table \[incoming\]"):
        read_toml(_toml(tmp_path, 'incoming = "in"\n'), table="serve")


def test_serve_names_the_nearest_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _toml(tmp_path, '[serve]\nincomming = "in"\nbatchsize = 4\nzzzz = 1\n')
    assert main(["serve", "--config", str(path)]) == EXIT_ERROR
    err = " ".join(capsys.readouterr().err.split())
    assert "did you mean 'incoming' for 'incomming'?" in err
    assert "did you mean 'batch_size' for 'batchsize'?" in err
    assert "'zzzz'" in err and "for 'zzzz'" not in err  # nothing is near it


def test_serve_refuses_a_misspelt_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _toml(tmp_path, '[server]\nincoming = "in"\n')
    assert main(["serve", "--config", str(path)]) == EXIT_ERROR
    assert "did you mean [serve]?" in capsys.readouterr().err


def test_train_names_the_nearest_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _toml(tmp_path, "[train]\nepoch = 3\n")
    assert main(["train", "--config", str(path), "--data", str(tmp_path)]) == EXIT_ERROR
    assert "did you mean 'epochs' for 'epoch'?" in " ".join(capsys.readouterr().err.split())
