"""The one preprocessing definition shared by training, export and serving.

An X-ray is first decoded by :func:`xrwatch.imageio.read_image` into a float32 2-D array in
[0, 1] (bright = dense tissue). :class:`PreprocessSpec` then turns that array into the model
input: a ``size`` x ``size`` float32 array in [0, 1]. Channel replication and ImageNet
normalisation (``mean``/``std``) happen *inside* the exported ONNX graph, so the serving
side only ever applies :meth:`PreprocessSpec.apply`. The spec travels inside every
checkpoint and every exported model; serving reads it back from the model, so training and
serving cannot drift apart.

Nothing else in xrwatch resizes X-rays.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from xrwatch.errors import ConfigError

if TYPE_CHECKING:
    from xrwatch.imageio.types import ImageMeta

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = 1  # bump whenever apply() changes what it computes
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# JPEG draft mode decodes at >= size * DRAFT_HEADROOM on the shorter side, so the final
# resize still shrinks by >= 1.5x with antialiasing. Measured on the 98 real JPEGs at
# size 224 (mean |difference| of the model input vs. a full decode, in 8-bit steps):
# 1.0x: 0.52, 1.5x: 0.28, 2.0x: 0.11 (benchmarks/decode.py prints this).
DRAFT_HEADROOM = 1.5

ResizeMethod = Literal["bilinear", "bicubic", "area"]
AspectMode = Literal["stretch", "pad"]

_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,  # antialiased when shrinking, like torchvision's
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded X-ray becomes the model input (see the module docstring)."""

    size: int = 224  # model input is size x size
    resize: ResizeMethod = "bilinear"  # Pillow filter; antialiased on downscale
    aspect: AspectMode = "stretch"  # stretch to square (as the study) or pad (letterbox, black)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # applied inside the ONNX graph
    std: tuple[float, float, float] = IMAGENET_STD  # applied inside the ONNX graph
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or not 16 <= self.size <= 4096:
            raise ConfigError(f"preprocess size must be an integer in 16..4096, got {self.size!r}")
        if self.resize not in _PIL_FILTERS:
            raise ConfigError(
                f"invalid resize method {self.resize!r}; choose one of {sorted(_PIL_FILTERS)}"
            )
        if self.aspect not in ("stretch", "pad"):
            raise ConfigError(f"invalid aspect mode {self.aspect!r}; choose 'stretch' or 'pad'")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean and std must have three entries each, std > 0")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def min_decode_side(self) -> int:
        """The shorter side a JPEG must keep when decoded in draft mode (see DRAFT_HEADROOM)."""
        return math.ceil(self.size * DRAFT_HEADROOM)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Map a decoded 2-D float array in [0, 1] to a (size, size) float32 array in [0, 1]."""
        if pixels.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {pixels.shape}")
        src = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        h, w = pixels.shape
        if self.aspect == "stretch" or h == w:
            out = src.resize((self.size, self.size), _PIL_FILTERS[self.resize])
            result = np.asarray(out, dtype=np.float32)
        else:
            scale = self.size / max(h, w)
            new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
            inner = np.asarray(src.resize((new_w, new_h), _PIL_FILTERS[self.resize]), np.float32)
            result = np.zeros((self.size, self.size), dtype=np.float32)
            top, left = (self.size - new_h) // 2, (self.size - new_w) // 2
            result[top : top + new_h, left : left + new_w] = inner
        return np.clip(result, 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(known)}"
            )
        version = int(data.get("version", PREPROCESS_VERSION))
        if version != PREPROCESS_VERSION:
            raise ConfigError(
                f"preprocessing version {version} is not supported by this xrwatch "
                f"(it implements version {PREPROCESS_VERSION})"
            )
        kwargs = dict(data)
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"preprocessing spec is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("preprocessing spec must be a JSON object")
        return cls.from_dict(data)


def load_model_input(
    path: str | Path, spec: PreprocessSpec, *, data: bytes | None = None
) -> tuple[np.ndarray, ImageMeta]:
    """Read one file and return ``(model_input, meta)``: the one path from bytes to model input.

    Training, export verification, ``classify`` and the daemon all call this. ``data``: the
    file's bytes when the caller already read them (to hash them), so they are not read
    twice; ``path`` then only names the file.
    """
    from xrwatch.imageio import read_image

    decoded = read_image(path, min_side=spec.min_decode_side, data=data)
    return spec.apply(decoded.pixels), decoded.meta
