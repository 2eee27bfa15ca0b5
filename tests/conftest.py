"""Shared fixtures. Real X-rays are read from ../shared/data/xray, never copied here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.tools import require_shared_data


@pytest.fixture(scope="session")
def shared_xray() -> Path:
    """The real X-ray folder (dicom/, real/<Class>/, coronahack/)."""
    return require_shared_data()


@pytest.fixture(scope="session")
def real_images(shared_xray: Path) -> list[Path]:
    """Every labelled real JPEG/PNG, sorted."""
    return sorted(p for p in (shared_xray / "real").rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def real_dicoms(shared_xray: Path) -> list[Path]:
    return sorted((shared_xray / "dicom").glob("*.dcm"))


@pytest.fixture(scope="session")
def tiny_onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified, metadata-complete tinycnn ONNX model (random weights, 32 px, 4 classes).

    Built once per session through the real export code (tests/helpers/models.py).
    """
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from tests.helpers.models import make_tiny_onnx

    return make_tiny_onnx(tmp_path_factory.mktemp("tiny_onnx") / "model.onnx")


@pytest.fixture(scope="session")
def fitted_run(tmp_path_factory: pytest.TempPathFactory, shared_xray: Path) -> Path:
    """A run folder with a briefly trained tinycnn (64 px, real images) and RUN/model.onnx
    exported with cam, temperature and scope guard fitted on the run's splits."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from tests.helpers.models import train_and_export

    return train_and_export(tmp_path_factory.mktemp("fitted"), shared_xray / "real")
