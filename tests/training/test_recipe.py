"""The study's recipe as data, and the sample order each epoch (weighted sampler, DDP shards)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from xrwatch.errors import ConfigError
from xrwatch_training.batches import epoch_order, rank_batches
from xrwatch_training.distributed import Dist
from xrwatch_training.presets import EXPERIMENTS, TrainConfig, config_sha256, experiment_config


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_presets_carry_the_studys_recipe(name: str) -> None:
    cfg = experiment_config(name)
    recipe = (cfg.lr, cfg.lr_step, cfg.lr_gamma, cfg.epochs, cfg.batch_size)
    assert recipe == (1e-3, 10, 0.5, 20, 32)
    assert (cfg.hflip, cfg.vflip, cfg.rotation_p, cfg.focal_gamma) == (0.5, 0.5, 0.3, 2.0)
    assert cfg.experiment == name
    assert cfg.sampler == ("weighted" if name == "PRCW" else "plain")
    assert cfg.loss == ("focal" if name.endswith("FL") else "ce")
    assert cfg.arch == ("densenet121" if name.startswith("PD") else "resnet50")
    assert cfg.weights == {"PD": "chexnet", "PR": "imagenet", "RC": "none"}[name[:2]]


def test_weighted_sampler_draws_each_class_about_equally() -> None:
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    cfg = TrainConfig(sampler="weighted", seed=3)
    order = epoch_order(labels, cfg, epoch=1, num_classes=3)
    assert len(order) == len(labels)  # an epoch draws as many samples as there are
    share = Counter(labels[order].tolist())
    for c in range(3):
        assert abs(share[c] / len(order) - 1 / 3) < 0.05, share
    plain = epoch_order(labels, TrainConfig(seed=3), epoch=1, num_classes=3)
    assert sorted(plain.tolist()) == list(range(len(labels)))  # plain: a permutation


@pytest.mark.parametrize("sampler", ["plain", "weighted"])
def test_ranks_share_one_seeded_order_per_epoch(sampler: str) -> None:
    """As DistributedSampler with set_epoch: one order per epoch, the same on every rank."""
    labels = torch.tensor([0, 1, 1, 2] * 25 + [0])
    cfg = TrainConfig(sampler=sampler, seed=5)  # type: ignore[arg-type]
    one, again, other = (epoch_order(labels, cfg, e, 3) for e in (1, 1, 2))
    assert torch.equal(one, again)  # seeded
    assert not torch.equal(one, other)  # reshuffled each epoch


@pytest.mark.parametrize("world", [2, 4])
def test_the_batch_size_is_global_under_torchrun(world: int) -> None:
    """N processes take the same samples per optimizer step as one process does (the recipe's
    batch of 32, not 32 per process), an equal share each, and as many steps."""
    order = torch.randperm(104, generator=torch.Generator().manual_seed(0))  # 3 x 32 + 8
    single = rank_batches(order, 32, Dist())
    ranks = [rank_batches(order, 32, Dist(rank, world)) for rank in range(world)]
    assert len(single) == 4 and all(len(r) == 4 for r in ranks)  # same steps on every rank
    for step, whole in enumerate(single):
        parts = [r[step] for r in ranks]
        assert all(len(p) == len(whole) // world for p in parts)  # 32 / world, last 8 / world
        assert torch.equal(torch.cat(parts), whole)  # exactly the step's samples
    # a last batch too small to give every process 2 images is dropped
    assert len(rank_batches(order[:101], 32, Dist(0, 4))) == 3


def test_a_batch_that_does_not_divide_across_processes_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from xrwatch_training import engine

    monkeypatch.setattr(engine, "init_distributed", lambda kind: Dist(0, 3))
    cfg = TrainConfig(data=str(tmp_path), batch_size=16, out=str(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match="multiple of 3"):
        engine.train(cfg)
    assert not any(tmp_path.iterdir())  # refused before any run folder


def test_config_hash_survives_config_json() -> None:
    """The hash exported models carry is that of the run's config.json, tuples and all."""
    cfg = experiment_config("PRFL", {"focal_alpha": [1, 2, 3, 4], "extra": ["x:COVID-19"]})
    assert config_sha256(json.loads(json.dumps(cfg.to_dict()))) == cfg.sha256()
    assert cfg.sha256() != experiment_config("PRFL").sha256()
