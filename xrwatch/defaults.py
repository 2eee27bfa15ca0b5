"""The model shipped inside the package, used when a command is given no ``--model``.

``xrwatch/models/default.onnx`` is an exported, verified xrwatch model trained on real
CoronaHack images; ``xrwatch/models/default.md`` is its model card (data, recipe, measured
metrics with CIs, intended use, known shortcuts) and names the file's sha256. An explicit
``--model`` always wins. ``benchmarks/real_subset.py --ship`` writes both files.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from xrwatch.errors import ConfigError

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "default.onnx"
DEFAULT_CARD = MODELS_DIR / "default.md"
_CARD_SHA = re.compile(r"sha256 of default\.onnx:\s*`?([0-9a-f]{64})`?")


def default_model() -> Path | None:
    """The shipped default model, or None when this install has none."""
    return DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None


def resolve_model(explicit: Path | str | None) -> Path:
    """``explicit`` when given (it wins), else the shipped default; a :class:`ConfigError`
    when neither exists."""
    if explicit is not None:
        return Path(explicit)
    shipped = default_model()
    if shipped is None:
        raise ConfigError(
            f"no --model given and no default model shipped at {DEFAULT_MODEL}; pass --model "
            "MODEL.onnx (an `xrwatch export` output)"
        )
    logger.info("no --model given: using the shipped default %s", shipped)
    return shipped


def card_sha256(card: Path = DEFAULT_CARD) -> str | None:
    """The sha256 the model card states for ``default.onnx`` (None when absent)."""
    if not card.is_file():
        return None
    m = _CARD_SHA.search(card.read_text(encoding="utf-8"))
    return m.group(1) if m else None
