"""Pretrained backbone weights: ImageNet (torchvision) and CheXNet, loaded under a new head.

* ``imagenet``: torchvision's weights API (``IMAGENET1K_V1``, what ``pretrained=True`` gave
  the study). It looks in the torch hub cache, ``$TORCH_HOME/hub/checkpoints/<file>``, and
  downloads there when it can. Offline, put the file there, or pass ``--imagenet-weights
  PATH`` (a state_dict, or a dict holding one under ``state_dict``/``model``).
* ``chexnet``: ``--chexnet-weights PATH`` to the CheXNet checkpoint ``model.pth.tar`` (the
  arnoweng/CheXNet re-implementation): a dict with ``state_dict`` whose keys are prefixed
  ``module.densenet121.``, use the old ``norm.1``/``conv.2`` layer names, and end in a
  14-class ``classifier.0`` Linear (+ Sigmoid). Names are remapped, the head dropped, and
  loading refuses to continue unless every feature tensor was loaded.

Either way the classification head stays freshly initialised for our classes.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from xrwatch.errors import ConfigError, ModelError

from .models import head_parameter_names

logger = logging.getLogger(__name__)

IMAGENET_WEIGHTS: dict[str, tvm.WeightsEnum] = {
    "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
    "densenet121": tvm.DenseNet121_Weights.IMAGENET1K_V1,
    "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
}
_OLD_DENSENET_NAME = re.compile(r"\.(norm|relu|conv)\.(\d+)\.")  # norm.1. -> norm1.


def imagenet_cache_path(arch: str) -> Path:
    """Where torchvision looks for ``arch``'s ImageNet weights: the torch hub cache."""
    filename = IMAGENET_WEIGHTS[arch].url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Checkpoints from old torch versions (CheXNet's is from 0.3) may pickle objects
        # the safe loader refuses. The user named this file explicitly, so load it fully,
        # as torch did by default until 2.6, and say so.
        logger.warning(
            "%s: holds objects torch's safe loader refuses (%s); loading it fully, which "
            "can run code from the file: use only files you trust",
            path,
            str(exc).rsplit("WeightsUnpickler error: ", 1)[-1].split(".", 1)[0],
        )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelError(f"{path}: cannot read {what} ({exc2})") from exc2
    except Exception as exc:
        raise ModelError(f"{path}: cannot read {what} ({exc})") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: {what} is not a state_dict (a dict of tensors)")
    return obj


def remap_legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.``/``densenet121.`` prefixes and rename ``norm.1`` → ``norm1`` etc."""
    out = {}
    for key, value in state.items():
        k = key.removeprefix("module.").removeprefix("densenet121.")
        out[_OLD_DENSENET_NAME.sub(r".\1\2.", k)] = value
    return out


def _load_backbone(
    model: nn.Module, arch: str, state: dict[str, torch.Tensor], source: str
) -> None:
    """Load every non-head tensor of ``state`` into ``model``; refuse partial loads."""
    head = set(head_parameter_names(arch))
    head_prefix = {name.rsplit(".", 1)[0] for name in head}
    state = {
        k: v
        for k, v in state.items()
        if k not in head and not any(k.startswith(p + ".") for p in head_prefix)
    }
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ModelError(f"{source}: weights do not fit {arch}: {exc}") from exc
    # Old checkpoints (CheXNet, torch 0.3) predate BatchNorm's num_batches_tracked counter,
    # which only matters with momentum=None; every real tensor must be there.
    missing = [
        k for k in result.missing_keys if k not in head and not k.endswith("num_batches_tracked")
    ]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"{source}: refusing partially loaded {arch} weights: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})"
        )
    logger.info("loaded %d pretrained tensors from %s", len(state), source)


def load_imagenet(model: nn.Module, arch: str, path: str | None = None) -> None:
    """Load ImageNet weights into ``model`` (all but the head); see the module docstring."""
    if arch not in IMAGENET_WEIGHTS:
        raise ConfigError(f"no ImageNet weights for {arch!r}; use weights='none'")
    if path is not None:
        p = Path(path)
        _load_backbone(
            model, arch, remap_legacy_names(_read_state_dict(p, "ImageNet weights")), str(p)
        )
        return
    weights = IMAGENET_WEIGHTS[arch]
    target = imagenet_cache_path(arch)
    try:
        state = weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # offline: URLError, socket errors ...
        raise ConfigError(
            f"ImageNet weights for {arch} are not in the torch hub cache and could not be "
            f"downloaded ({type(exc).__name__}: {exc}). Put {weights.url.rsplit('/', 1)[-1]} "
            f"(from {weights.url}) at {target}, or pass --imagenet-weights PATH"
        ) from exc
    _load_backbone(model, arch, remap_legacy_names(state), str(target))


def load_chexnet(model: nn.Module, arch: str, path: str | None) -> None:
    """Load a CheXNet ``model.pth.tar`` into a DenseNet121 (all but the 14-class head)."""
    if arch != "densenet121":
        raise ConfigError(f"CheXNet weights are a DenseNet121's; got arch {arch!r}")
    if not path:
        raise ConfigError(
            "weights 'chexnet' needs --chexnet-weights PATH to the CheXNet checkpoint "
            "model.pth.tar (e.g. from github.com/arnoweng/CheXNet)"
        )
    p = Path(path)
    state = remap_legacy_names(_read_state_dict(p, "CheXNet checkpoint"))
    # CheXNet's head is Sequential(Linear(1024, 14), Sigmoid): classifier.0.*
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    _load_backbone(model, arch, state, str(p))


def load_pretrained(model: nn.Module, arch: str, weights: str, cfg: Any) -> None:
    """Apply ``weights`` (``imagenet``, ``chexnet`` or ``none``) to a freshly built model."""
    if weights == "none":
        return
    if weights == "imagenet":
        load_imagenet(model, arch, cfg.imagenet_weights)
    elif weights == "chexnet":
        load_chexnet(model, arch, cfg.chexnet_weights)
    else:
        raise ConfigError(
            f"Invalid weights {weights!r}. Only imagenet, chexnet and none are supported."
        )
