"""The training config and the study's six experiments, as data. Torch-free.

The study (Bolhassani 2021, arXiv:2105.08382) states one recipe for every experiment: Adam
lr 1e-3, StepLR every 10 epochs × 0.5, 20 epochs, horizontal and vertical flips p=0.5,
rotation p=0.3, a WeightedRandomSampler with 1/class-count weights (PRCW) and focal loss
(PRFL, PDCXFL). Everything else it does not state; xrwatch's choices for those are its own
**assumptions**, listed in :data:`ASSUMPTIONS` (shown by ``xrwatch train --help`` and the
README), never "the study's". The six experiments differ in four fields only, so each is one
row of :data:`EXPERIMENTS`; every field can still be overridden from the CLI.

Name key: P = pretrained, R = ResNet50, D = DenseNet121, CX = CheXNet weights, CE = cross
entropy, CW = cross entropy + class-weighted sampling, FL = focal loss. RCE is ResNet50 from
scratch with cross-entropy, as its name says; the study's text describes it with focal loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from xrwatch.config import build_config
from xrwatch.errors import ConfigError

logger = logging.getLogger(__name__)

Weights = Literal["imagenet", "chexnet", "none"]
Loss = Literal["ce", "focal"]
Sampler = Literal["plain", "weighted"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run; ``config.json`` in the run folder."""

    # what to train on
    data: str = ""  # DATA_DIR: CoronaHack layout or a folder per class
    task: Literal["multiclass", "binary"] = "multiclass"
    split: Literal["auto", "official", "patient"] = "auto"  # by layout; see training.splits
    val_fraction: float = 0.1  # of TRAIN, patient-grouped, stratified (assumption)
    test_fraction: float = 0.15  # of TRAIN, only for --split patient
    extra: tuple[str, ...] = ()  # DIR:LABEL folders added to TRAIN (the study's table 2)
    patients: str | None = None  # file name → patient CSV (default: found beside the data)
    strict: bool = False  # stop on a missing/unreadable image instead of leaving it out
    # the experiment
    experiment: str = "custom"  # preset name (PRCE ...) or custom
    arch: Literal["resnet50", "densenet121", "resnet18", "mobilenet_v3_small", "tinycnn"] = (
        "resnet50"
    )
    weights: Weights = "imagenet"  # pretrained backbone: imagenet, chexnet, or none (scratch)
    imagenet_weights: str | None = None  # a local torchvision ImageNet state_dict (offline)
    chexnet_weights: str | None = None  # CheXNet model.pth.tar (needed for weights=chexnet)
    loss: Loss = "ce"
    focal_gamma: float = 2.0  # focal loss focusing parameter (assumption: the study gives none)
    focal_alpha: tuple[float, ...] | None = None  # per-class α (assumption: none, see ASSUMPTIONS)
    sampler: Sampler = "plain"  # weighted = WeightedRandomSampler with 1/class-count weights
    # the recipe: the study's where it states it, else xrwatch's assumption (ASSUMPTIONS)
    epochs: int = 20
    batch_size: int = 32  # global: under torchrun divided across the processes (an assumption)
    lr: float = 1e-3  # Adam
    weight_decay: float = 0.0  # assumption: the study states none
    lr_step: int = 10  # StepLR step_size, epochs
    lr_gamma: float = 0.5  # StepLR gamma
    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.5  # probability of a vertical flip
    rotation_p: float = 0.3  # probability of a random rotation
    rotation_degrees: float = 10.0  # rotation angle drawn from ±this (the study gives no angle)
    # preprocessing (see xrwatch.preprocess.PreprocessSpec)
    image_size: int = 224  # assumption: the study states no input size
    resize: Literal["bilinear", "bicubic", "area"] = "bilinear"  # assumption
    aspect: Literal["stretch", "pad"] = "stretch"  # assumption
    # machinery
    seed: int = 0
    device: Device = "auto"
    amp: bool = True  # bf16/fp16 autocast on CUDA only
    channels_last: bool = True  # on CUDA only
    workers: int = 0  # image decoding processes for the cache (0 = min(8, CPUs))
    cache_dir: str | None = None  # decoded-image cache (default: OUT/.cache)
    out: str = "runs"  # runs are written to OUT/NAME
    name: str | None = None  # run folder name (default: experiment-task-timestamp)
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests, benchmarks)
    progress: bool = True  # rich progress bars (only on a terminal)
    world_size: int = 1  # processes the run trained with (recorded by the run, not a setting)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.lr_step >= 1, "lr_step must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (0.0 <= self.test_fraction < 1.0, "test_fraction must be in [0, 1)"),
            (self.focal_gamma >= 0, "focal_gamma must be >= 0"),
            (self.workers >= 0, "workers must be >= 0"),
        ]
        for p in (self.hflip, self.vflip, self.rotation_p):
            checks.append((0.0 <= p <= 1.0, "augmentation probabilities must be in [0, 1]"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.arch == "tinycnn" and self.weights != "none":
            raise ConfigError("tinycnn has no pretrained weights; use --weights none")
        if self.weights == "chexnet" and self.arch != "densenet121":
            raise ConfigError("CheXNet weights are a DenseNet121's; use --arch densenet121")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra"] = list(self.extra)
        d["focal_alpha"] = list(self.focal_alpha) if self.focal_alpha is not None else None
        return d

    def sha256(self) -> str:
        """The hash exported models carry as ``xrwatch.config_sha256``."""
        return config_sha256(self.to_dict())


def config_sha256(config: Any) -> str:
    """sha256 of the canonical JSON of a training config (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# The study's six experiments (Table 1). Everything else is the shared recipe above.
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "PRCE":   {"arch": "resnet50",    "weights": "imagenet", "loss": "ce",    "sampler": "plain"},
    "PRCW":   {"arch": "resnet50",    "weights": "imagenet", "loss": "ce",    "sampler": "weighted"},  # noqa: E501
    "PRFL":   {"arch": "resnet50",    "weights": "imagenet", "loss": "focal", "sampler": "plain"},
    "PDCXCE": {"arch": "densenet121", "weights": "chexnet",  "loss": "ce",    "sampler": "plain"},
    "PDCXFL": {"arch": "densenet121", "weights": "chexnet",  "loss": "focal", "sampler": "plain"},
    "RCE":    {"arch": "resnet50",    "weights": "none",     "loss": "ce",    "sampler": "plain"},
}  # fmt: skip

EXPERIMENT_NOTES: dict[str, str] = {
    "PRCE": "ResNet50, ImageNet weights, cross-entropy",
    "PRCW": "ResNet50, ImageNet weights, cross-entropy, WeightedRandomSampler (1/class count)",
    "PRFL": "ResNet50, ImageNet weights, focal loss",
    "PDCXCE": "DenseNet121, CheXNet weights, cross-entropy",
    "PDCXFL": "DenseNet121, CheXNet weights, focal loss",
    "RCE": "ResNet50 from scratch, cross-entropy (the study's text says focal loss)",
}

# Settings the study does not state (see ../shared/STUDY.md): what xrwatch assumes, and how it
# reads the study where the paper is ambiguous. Shown by `xrwatch train --help` and the README.
ASSUMPTIONS: dict[str, str] = {
    "batch_size": "32 (global batch; the study states no batch size)",
    "image_size": "224 px (the study states no input size)",
    "resize": "bilinear resize that stretches the image to a square (aspect 'stretch')",
    "normalisation": "ImageNet mean/std, applied inside the model",
    "focal loss": "γ = 2, no α: the paper writes FL = −α_t (1 − p_t)^γ log p_t but gives "
    "neither value; xrwatch reads α as unused (set focal_alpha to weight classes)",
    "frozen layers": "none: all layers are trained",
    "weight_decay": "0 (the study states none)",
    "rotation_degrees": "±10° (the study gives the probability 0.3, not the angle)",
    "validation": "10 % of TRAIN, stratified by class, grouped by patient, seeded",
    "RCE": "cross-entropy, as its name says; the paper's text describes it with focal loss",
    "reported accuracy": "the paper's figures may be final-epoch or averaged over epochs (its "
    "metric section says averaged); xrwatch reports the best epoch's (by validation balanced "
    "accuracy) and the average over epochs for train and validation",
}

# The study's Table 1 (accuracy %, train/validation/test), from ../shared/STUDY.md.
PUBLISHED: dict[str, dict[str, float | None]] = {
    "PRCE": {"train": 81.06, "val": 65.39, "test": 62.1},
    "PRCW": {"train": 86.06, "val": 73.43, "test": 80.2},
    "PRFL": {"train": 85.84, "val": 75.0, "test": 75.5},
    "PDCXCE": {"train": 85.28, "val": 76.062, "test": 80.0},
    "PDCXFL": {"train": 87.95, "val": 73.87, "test": 75.56},
    "RCE": {"train": 81.608, "val": 69.93, "test": 71.11},
}
# Its Table 2: after adding COVID-19 images from the internet (--extra DIR:COVID-19).
PUBLISHED_WITH_EXTRA: dict[str, dict[str, float | None]] = {
    "PRCE": {"train": 91.7, "val": 78.75, "test": 72.69},
    "PDCXCE": {"train": 91.37, "val": 81.83, "test": 84.6},
    "RCE": {"train": 88.48, "val": 80.26, "test": 71.11},
}
# Class totals as the paper states them, against the metadata CSV's (which xrwatch uses).
PAPER_CLASS_TOTALS = {"Normal": 1575, "Bacteria": 2778, "Virus": 1494, "COVID-19": 82}
CSV_CLASS_TOTALS = {"Normal": 1576, "Bacteria": 2777, "Virus": 1497, "COVID-19": 58}
CLASS_TOTALS_NOTE = (
    "Class totals differ between the paper (Normal 1,575, Bacteria 2,778, Virus 1,494, "
    "COVID-19 82) and the CoronaHack metadata CSV xrwatch uses (1,576, 2,777 incl. "
    "Streptococcus, 1,497 incl. SARS, 58); the paper does not explain the difference."
)


def experiment_config(name: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of preset ``name`` (or ``custom``) with ``overrides`` (None = not given)."""
    if name != "custom" and name not in EXPERIMENTS:
        raise ConfigError(
            f"Invalid experiment {name!r}. Only {', '.join(EXPERIMENTS)} and custom are supported."
        )
    values: dict[str, Any] = {"experiment": name, **EXPERIMENTS.get(name, {})}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(TrainConfig, values, source=f"experiment {name}")
