"""Outcomes: turning a batch's outputs into report records and heatmap jobs.

Owns the shape of one result as the ledger, the reports and the DICOM SR see it
(:meth:`Outcomes.record`: the file, its hash, label and probabilities, the model, the DICOM
identifiers and when the file was first seen), the flag of an ok result
(:meth:`Outcomes.explain`, through the engine's :mod:`xrwatch.flags` rule) and, when
heatmaps are on and the model has a ``cam`` output, the :class:`~xrwatch.heatmap.HeatmapJob`
that draws its overlay under ``REPORTS/heatmaps``. Also the :class:`Engine` protocol: what
the serving rooms need from :class:`xrwatch.engine.InferenceEngine`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from xrwatch.fields import DICOM_IDS
from xrwatch.preprocess import PreprocessSpec
from xrwatch.serve.intake import Work

if TYPE_CHECKING:
    from xrwatch.heatmap import HeatmapJob

logger = logging.getLogger(__name__)

HEATMAPS_DIR = "heatmaps"  # REPORTS/heatmaps/<relative path>.png


class Engine(Protocol):
    """What the daemon needs from :class:`xrwatch.engine.InferenceEngine`."""

    @property
    def classes(self) -> tuple[str, ...]: ...
    @property
    def spec(self) -> PreprocessSpec: ...

    provider: str
    model_sha256: str

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray: ...


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Outcomes:
    """Builds the records of one model's results (``heatmaps``: draw overlays when the
    model can)."""

    def __init__(self, engine: Engine, model_name: str, reports: Path, *, heatmaps: bool) -> None:
        self.engine = engine
        self.classes = list(engine.classes)
        self.spec = engine.spec
        self.model_name = model_name
        self.heatmaps_root = reports / HEATMAPS_DIR
        self.heatmaps = heatmaps

    def record(self, work: Work, probs: np.ndarray | None) -> dict[str, Any]:
        meta = work.meta
        record: dict[str, Any] = {
            "processed_at": _utc_now(),
            "file": work.rel,
            "sha256": work.sha256,
            "status": "ok" if probs is not None else "error",
            "label": None,
            "confidence": None,
            "probabilities": {},
            "error": work.error or None,
            "model": self.model_name,
            "model_sha256": self.engine.model_sha256,
            "provider": self.engine.provider,
            **{name: getattr(meta, name, None) for name in DICOM_IDS},
            "kind": getattr(meta, "kind", None),
            "modality": getattr(meta, "modality", None),
            "width": getattr(meta, "width", None),
            "height": getattr(meta, "height", None),
            "flag": "",
            "flag_reason": None,
            "ood_score": None,
            "heatmap": None,  # relative to REPORTS
            "detected_at": datetime.fromtimestamp(work.cand.seen_at, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        }
        if probs is not None:
            row = np.asarray(probs, dtype=np.float64).reshape(-1)
            best = int(np.argmax(row))
            record["label"] = self.classes[best]
            record["confidence"] = float(row[best])
            record["probabilities"] = {c: float(p) for c, p in zip(self.classes, row, strict=True)}
        return record

    def explain(self, record: dict[str, Any], work: Work, out: Any, i: int) -> HeatmapJob | None:
        """Add the flag of one ok result; return its heatmap to write, when enabled."""
        flag = getattr(self.engine, "flag", None)
        ood = getattr(out, "ood_score", None)
        contrast = getattr(out, "contrast", None)
        record["ood_score"] = float(ood[i]) if ood is not None else None
        if flag is not None:
            record["flag"], reason = flag(
                record["confidence"],
                ood_score=record["ood_score"],
                contrast=float(contrast[i]) if contrast is not None else None,
                meta=work.meta,
                **_population(out, i),
            )
            record["flag_reason"] = reason or None
        cam = getattr(out, "cam", None)
        if not self.heatmaps or cam is None or work.array is None:
            return None
        from xrwatch.heatmap import HeatmapJob

        best = self.classes.index(record["label"])
        return HeatmapJob(
            root=self.heatmaps_root,
            rel=work.rel,
            pixels=np.asarray(work.array).reshape(self.spec.size, self.spec.size),
            cam=cam[i][best],
            label=record["label"],
            confidence=record["confidence"],
            flag=record.get("flag") or "",  # the overlay shows it (a banner; no map out of scope)
        )


def _population(out: Any, i: int) -> dict[str, float]:
    """The population gate's score of result ``i``, for engines that output one."""
    population = getattr(out, "population", None)
    return {} if population is None else {"population": float(population[i])}
