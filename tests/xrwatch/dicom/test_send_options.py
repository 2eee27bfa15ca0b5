"""The results sender's attempt limit, first retry wait and per-association timeout are
``serve`` settings:
a value from ``[serve]`` or the command line reaches each destination's sender, and a value
that could not work ends ``serve`` with exit 2 before anything starts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from serve_harness import run_once

from xrwatch.dicom.node import DicomNode
from xrwatch.dicom.outbox import BACKOFF_FIRST, MAX_SEND_ATTEMPTS, Outbox
from xrwatch.dicom.sender import DEFAULT_TIMEOUT
from xrwatch.errors import ConfigError
from xrwatch.serve.config import ServeConfig, load_serve_config


def _node(cfg: ServeConfig, tmp_path: Path) -> DicomNode:
    """The node as ``serve`` builds it, on a daemon reduced to what the node reads."""
    daemon = SimpleNamespace(
        config=cfg,
        incoming=cfg.incoming,
        ledger=SimpleNamespace(path=tmp_path / "ledger.sqlite3", owner="test-owner"),
        metrics=SimpleNamespace(registry=CollectorRegistry()),
        engine=SimpleNamespace(),
    )
    return DicomNode(daemon)


def test_defaults_are_the_senders_own(tmp_path: Path) -> None:
    cfg = ServeConfig(tmp_path, tmp_path / "m.onnx", tmp_path / "r")
    assert cfg.dicom_send_attempts == MAX_SEND_ATTEMPTS
    assert cfg.dicom_send_timeout == DEFAULT_TIMEOUT
    assert cfg.dicom_send_retry == BACKOFF_FIRST


def test_config_file_values_reach_every_destination_sender(tmp_path: Path) -> None:
    toml = tmp_path / "x.toml"
    toml.write_text(
        '[serve]\nincoming = "."\nmodel = "m.onnx"\nreports = "r"\n'
        'dicom_destinations = ["PACS@127.0.0.1:104", "VNA@127.0.0.1:105"]\n'
        "dicom_send_attempts = 3\ndicom_send_timeout = 7.5\ndicom_send_retry = 10\n"
    )
    cfg = load_serve_config(toml, {})
    node = _node(cfg, tmp_path)
    assert [(s.max_attempts, s.timeout, s.retry) for s in node.worker.senders] == [
        (3, 7.5, 10.0),
        (3, 7.5, 10.0),
    ]
    # the command line wins over the file
    cli = {"dicom_send_attempts": 1, "dicom_send_timeout": 2.0, "dicom_send_retry": 0.5}
    cfg = load_serve_config(toml, cli)
    node = _node(cfg, tmp_path)
    assert {(s.max_attempts, s.timeout, s.retry) for s in node.worker.senders} == {(1, 2.0, 0.5)}


def test_a_failed_send_waits_the_first_retry_then_twice_as_long_each_time(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "ledger.sqlite3")
    outbox.create()
    waits = [outbox.send_failed(1, n, "refused", first_wait=0.5)[1] for n in (1, 2, 3, 12)]
    assert waits == [0.5, 1.0, 2.0, 300.0]  # at most 5 min
    assert outbox.send_failed(1, 1, "refused")[1] == BACKOFF_FIRST
    outbox.close()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dicom_send_attempts": 0}, r"dicom_send_attempts must be in \[1, 1000\]"),
        ({"dicom_send_attempts": 5000}, r"dicom_send_attempts must be in \[1, 1000\]"),
        ({"dicom_send_timeout": float("nan")}, "dicom_send_timeout must be a finite number"),
        ({"dicom_send_timeout": float("inf")}, "dicom_send_timeout must be a finite number"),
        ({"dicom_send_timeout": 0.5}, r"dicom_send_timeout must be in \[1, 3600\]"),
        ({"dicom_send_retry": 0}, r"dicom_send_retry must be in \[0.1, 300\]"),
        ({"dicom_send_retry": 301}, r"dicom_send_retry must be in \[0.1, 300\]"),
    ],
)
def test_values_that_cannot_work_are_refused(
    tmp_path: Path, values: dict[str, object], message: str
) -> None:
    base = {"incoming": tmp_path, "model": tmp_path / "m.onnx", "reports": tmp_path / "r"}
    with pytest.raises(ConfigError, match=message):
        load_serve_config(None, {**base, **values})


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--dicom-send-attempts", "0", "dicom_send_attempts must be in [1, 1000]"),
        ("--dicom-send-timeout", "nan", "dicom_send_timeout must be a finite number"),
        ("--dicom-send-timeout", "99999", "dicom_send_timeout must be in [1, 3600]"),
        ("--dicom-send-retry", "0", "dicom_send_retry must be in [0.1, 300]"),
    ],
)
def test_invalid_options_exit_2(
    folders: tuple[Path, Path], tiny_onnx_model: Path, option: str, value: str, message: str
) -> None:
    incoming, reports = folders
    r = run_once(
        incoming, reports, tiny_onnx_model, "--dicom-destination", "PACS@127.0.0.1:104",
        option, value,
    )  # fmt: skip
    assert r.returncode == 2 and message in r.stderr, r.stderr
