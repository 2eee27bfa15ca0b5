"""The study's recipe as data, and the sample order each epoch (weighted sampler, DDP shards)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from training.engine import Dist, _epoch_order
from training.presets import EXPERIMENTS, TrainConfig, config_sha256, experiment_config


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
    order = _epoch_order(labels, cfg, epoch=1, d=Dist(), num_classes=3)
    assert len(order) == len(labels)  # an epoch draws as many samples as there are
    share = Counter(labels[order].tolist())
    for c in range(3):
        assert abs(share[c] / len(order) - 1 / 3) < 0.05, share
    plain = _epoch_order(labels, TrainConfig(seed=3), epoch=1, d=Dist(), num_classes=3)
    assert sorted(plain.tolist()) == list(range(len(labels)))  # plain: a permutation


@pytest.mark.parametrize("sampler", ["plain", "weighted"])
def test_ranks_share_one_seeded_order_per_epoch(sampler: str) -> None:
    """As DistributedSampler with set_epoch: one order per epoch, split between the ranks."""
    labels = torch.tensor([0, 1, 1, 2] * 25 + [0])
    cfg = TrainConfig(sampler=sampler, seed=5)  # type: ignore[arg-type]

    def shards(epoch: int) -> list[torch.Tensor]:
        return [_epoch_order(labels, cfg, epoch, Dist(rank, 2), 3) for rank in range(2)]

    one, again, other = shards(1), shards(1), shards(2)
    assert all(torch.equal(a, b) for a, b in zip(one, again, strict=True))  # seeded
    assert not torch.equal(one[0], other[0])  # reshuffled each epoch
    assert len(one[0]) == len(one[1]) == len(labels) // 2  # same step count on every rank
    whole = _epoch_order(labels, cfg, 1, Dist(), 3)
    assert torch.equal(torch.cat(one), whole[: 2 * (len(labels) // 2)])  # disjoint positions


def test_config_hash_survives_config_json() -> None:
    """The hash exported models carry is that of the run's config.json, tuples and all."""
    cfg = experiment_config("PRFL", {"focal_alpha": [1, 2, 3, 4], "extra": ["x:COVID-19"]})
    assert config_sha256(json.loads(json.dumps(cfg.to_dict()))) == cfg.sha256()
    assert cfg.sha256() != experiment_config("PRFL").sha256()
