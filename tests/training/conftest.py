"""Fixtures for training tests: a small synthetic CoronaHack dataset, written once."""

from __future__ import annotations

from pathlib import Path

import pytest

from xrwatch_training.synth import write_synthetic


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~600 synthetic 48-px images in the CoronaHack layout (scale 0.1)."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, scale=0.1, image_size=48, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~120 synthetic 32-px images (scale 0.02): for one-step smoke runs."""
    root = tmp_path_factory.mktemp("tiny_synth")
    write_synthetic(root, scale=0.02, image_size=32, seed=2)
    return root
