from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from xrwatch.config import MAX_CONFIG_BYTES, build_config, merge, read_toml
from xrwatch.errors import ConfigError


@dataclass(frozen=True)
class Example:
    name: str = "x"
    batch_size: int = 8
    wait_s: float = 2.0
    mode: Literal["a", "b"] = "a"
    archive: Path | None = None
    sizes: tuple[int, ...] = (1, 2)


def test_build_config_coerces_and_validates(tmp_path: Path) -> None:
    cfg = build_config(
        Example, {"wait_s": 3, "archive": str(tmp_path), "sizes": [4, 5], "mode": "b"}
    )
    assert cfg.wait_s == 3.0 and isinstance(cfg.wait_s, float)
    assert cfg.archive == tmp_path
    assert cfg.sizes == (4, 5)
    assert cfg.mode == "b"


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"batchsize": 4}, "unknown key(s) ['batchsize']"),
        ({"batch_size": "4"}, "batch_size must be int"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"mode": "c"}, "mode must be one of ['a', 'b']"),
        ({"sizes": 3}, "sizes must be a list"),
    ],
)
def test_build_config_rejects_bad_values(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(Example, values, source="serve.toml")
    assert fragment in str(info.value)
    assert "serve.toml" in str(info.value)


def test_read_toml_table_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[serve]\nbatch_size = 4\nname = "n"\n')
    assert read_toml(good, table="serve") == {"batch_size": 4, "name": "n"}
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = = 4\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_toml(tmp_path / "missing.toml")


def test_merge_cli_overrides_file_but_none_means_not_given() -> None:
    assert merge({"a": 1, "b": 2}, {"a": 10, "b": None, "c": 3}) == {"a": 10, "b": 2, "c": 3}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10**400])
def test_build_config_refuses_numbers_that_are_not_finite(value: object) -> None:
    with pytest.raises(ConfigError, match="wait_s must be a finite number") as info:
        build_config(Example, {"wait_s": value}, source="serve.toml")
    assert "serve.toml" in str(info.value)


def test_read_toml_refuses_what_is_not_a_short_utf8_text_file(tmp_path: Path) -> None:
    """Each is one ConfigError naming the file, never a traceback, a hang or an endless read."""
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[serve]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1.toml: config file is not UTF-8 .*line 2"):
        read_toml(latin1)
    with pytest.raises(ConfigError, match="is a device, pipe or socket"):
        read_toml("/dev/null")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # no writer: opening it must not wait for one
    with pytest.raises(ConfigError, match=r"fifo\.toml: config file is a device, pipe or socket"):
        read_toml(fifo)
    with pytest.raises(ConfigError, match="is a folder"):
        read_toml(tmp_path)
    big = tmp_path / "big.toml"
    big.write_text("# x\n" * (MAX_CONFIG_BYTES // 4 + 1))
    with pytest.raises(ConfigError, match=r"big\.toml: config file is over 1024 KiB"):
        read_toml(big)
    ok = tmp_path / "ok.toml"
    ok.write_text("# x\n" * (MAX_CONFIG_BYTES // 4 - 10) + "[serve]\nname = 'é'\n")
    assert read_toml(ok, table="serve") == {"name": "é"}
