"""The packaged default's data pool, PACS augmentation and training loop, on tiny fake data."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.pedfixture import write_fake_shared
from xrwatch_training import default_recipe as dr
from xrwatch_training.checkpoint import load_checkpoint
from xrwatch_training.models import model_from_checkpoint, output_units
from xrwatch_training.pacs_augment import PacsAugment, equalize, jpeg, pacs_augment, stretch
from xrwatch_training.pool import ADULT, DIAGNOSES, build_default_data, read_list


@pytest.fixture(scope="module")
def fake_shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_shared(tmp_path_factory.mktemp("shared"))


def test_pool_is_patient_grouped_paediatric_and_leaves_covid_out(fake_shared: Path) -> None:
    data = build_default_data(fake_shared, seed=0)
    every = [i for part in (*data.splits.values(), *data.heldout.values()) for i in part]
    assert not any("covid" in i.path.name for i in every)
    where: dict[str, set[str]] = {}
    for name, part in {**data.splits, **data.heldout}.items():
        for i in part:
            where.setdefault(i.group, set()).add(name)
    assert all(len(v) == 1 for v in where.values())
    for name in ("train", "select", "calib", "test"):
        labels = {i.label for i in data.splits[name]}
        assert set(DIAGNOSES) <= labels and ADULT in labels, name
    assert {i.source for i in data.heldout["kermany-test"]} == {"kermany"}
    assert {i.source for i in data.heldout["real-kermany"]} == {"real"}
    assert all(i.population == "adult" for i in data.splits["train"] if i.label == ADULT)
    squashed = [i for i in data.splits["train"] if i.squashed]
    assert squashed and all(i.source == "kermany" for i in squashed)
    assert build_default_data(fake_shared, seed=0).splits == data.splits  # deterministic


def test_augment_is_seeded_bounded_and_does_what_it_says() -> None:
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    a = pacs_augment(x, PacsAugment(), torch.Generator().manual_seed(3))
    b = pacs_augment(x, PacsAugment(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.equal(a, x)
    off = PacsAugment(hflip=0, rotation_p=0, zoom_p=0, border_p=1, border_max=0.25, gamma_p=0,
                      contrast_p=0, stretch_p=0, equalize_p=0, jpeg_p=0)  # fmt: skip
    bordered = pacs_augment(x, off, torch.Generator().manual_seed(1))
    assert float((bordered == 0).float().mean()) > 0.05  # black borders were drawn
    eq = equalize(x[:1])
    assert abs(float(eq.mean()) - 0.5) < 0.06 and float(eq.max()) == 1.0
    big = torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(5))
    s = stretch(big, torch.tensor([0.02]))
    assert float((s == 0).float().mean()) == pytest.approx(0.02, abs=0.01)
    assert float((s == 1).float().mean()) == pytest.approx(0.02, abs=0.01)
    img = x[0, 0].numpy()
    assert np.abs(jpeg(img, 95) - img).mean() < 0.03


def _cfg(shared: Path, tmp: Path, epochs: int) -> dr.DefaultConfig:
    return dr.DefaultConfig(data=str(shared), arch="tinycnn", image_size=32, epochs=epochs,
                            batch_size=8, max_steps_per_epoch=2, cache_dir=str(tmp / "cache"),
                            threads=1)  # fmt: skip


def test_train_default_writes_a_four_unit_checkpoint_and_resumes_exactly(
    fake_shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = dr.train_default(_cfg(fake_shared, tmp_path, 2), tmp_path / "whole")
    ckpt = load_checkpoint(whole / "best.pt")
    assert ckpt["classes"] == list(DIAGNOSES) and ckpt["population"]["classes"] == [ADULT]
    assert output_units(ckpt) == 4
    logits = model_from_checkpoint(ckpt)(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 4)
    splits = whole / "splits"
    assert {r.label for r in read_list(splits / "val.csv")} <= set(DIAGNOSES)  # calibration
    assert {r.label for r in read_list(splits / "adult-test.csv")} == {ADULT}
    assert (whole / "done.json").is_file()

    real_epoch = dr._epoch
    calls = {"n": 0}

    def stop_in_epoch_two(*args: object, **kwargs: object) -> dict[str, object]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dr, "_epoch", stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        dr.train_default(_cfg(fake_shared, tmp_path, 2), tmp_path / "split")
    monkeypatch.setattr(dr, "_epoch", real_epoch)
    resumed = dr.train_default(_cfg(fake_shared, tmp_path, 2), tmp_path / "split")
    a = load_checkpoint(whole / "last.pt")["model"]
    b = load_checkpoint(resumed / "last.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_another_recipe_is_refused_but_a_longer_or_wider_run_resumes(
    fake_shared: Path, tmp_path: Path
) -> None:
    import dataclasses
    import json

    from xrwatch.errors import ConfigError

    dr.train_default(_cfg(fake_shared, tmp_path, 1), tmp_path / "run")
    with pytest.raises(ConfigError, match="another config"):
        dr.train_default(dataclasses.replace(_cfg(fake_shared, tmp_path, 1), lr=0.1),
                         tmp_path / "run")  # fmt: skip
    dr.train_default(_cfg(fake_shared, tmp_path, 2), tmp_path / "run")
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert "epochs" in (tmp_path / "run" / "config_history.jsonl").read_text()
    wider = dataclasses.replace(_cfg(fake_shared, tmp_path, 3), augment={"zoom": [0.75, 1.2]})
    dr.train_default(wider, tmp_path / "run")
    lines = (tmp_path / "run" / "config_history.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["after_epoch"] == 2
    assert last["changed"]["augment"] == [{}, {"zoom": [0.75, 1.2]}]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["augment"] == {
        "zoom": [0.75, 1.2]
    }


def test_learning_rate_is_cosine_from_lr_to_the_floor() -> None:
    cfg = dr.DefaultConfig(epochs=5, lr=1e-3, min_lr_factor=0.1)
    rates = [dr.learning_rate(cfg, e) for e in range(1, 6)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in itertools.pairwise(rates))
