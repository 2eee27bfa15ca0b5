"""The receiver's settings: safe defaults, values that could not work refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from xrwatch.dicom.settings import ReceiverLimits
from xrwatch.errors import ConfigError
from xrwatch.serve.config import load_serve_config


def _cfg(tmp_path: Path, **values: object):
    base = {
        "incoming": tmp_path,
        "model": tmp_path / "m.onnx",
        "reports": tmp_path / "r",
        "dicom_port": 11112,
        "dicom_allow_ae": ["CR1"],
    }
    return load_serve_config(None, {**base, **values})


def test_defaults_listen_on_this_host_only_with_bounded_limits(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert cfg.dicom_host == "127.0.0.1"
    limits = ReceiverLimits.from_config(cfg)
    assert limits == ReceiverLimits(max_object_bytes=cfg.max_file_mb * 1024 * 1024)
    assert limits.max_per_host <= limits.max_associations


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dicom_acse_timeout": float("nan")}, "dicom_acse_timeout must be"),
        ({"dicom_network_timeout": float("inf")}, "dicom_network_timeout must be"),
        ({"dicom_dimse_timeout": 0.0}, "dicom_dimse_timeout must be 1..3600"),
        ({"dicom_max_associations": 0}, "dicom_max_associations must be 1..1000"),
        ({"dicom_max_per_host": 11}, "cannot exceed dicom_max_associations"),
        ({"dicom_max_pdu": 100}, "dicom_max_pdu must be 4096"),
        ({"dicom_tls_cert": "c.pem"}, "go together"),
        ({"dicom_tls_ca": "ca.pem"}, "needs dicom_tls_cert"),
        ({"dicom_tls_cert": "nope.pem", "dicom_tls_key": "nope.key"}, "not a readable file"),
    ],
)
def test_values_that_cannot_work_are_refused(
    tmp_path: Path, values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **values)


def test_tls_files_in_a_config_file_are_relative_to_it(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    toml = tmp_path / "x.toml"
    toml.write_text(
        '[serve]\nincoming = "."\nmodel = "m.onnx"\nreports = "r"\ndicom_port = 11112\n'
        'dicom_allow_ae = ["CR1"]\ndicom_tls_cert = "cert.pem"\ndicom_tls_key = "key.pem"\n'
    )
    cfg = load_serve_config(toml, {})
    assert cfg.dicom_tls_cert == tmp_path / "cert.pem"
    assert cfg.dicom_tls_key == tmp_path / "key.pem"
