"""The ONNX Runtime inference engine shared by ``xrwatch classify`` and the daemon.

:class:`InferenceEngine` loads one exported model, refuses it without xrwatch's metadata
(:mod:`xrwatch.modelmeta`), picks the CUDA execution provider when a session can really be
created with it (else CPU; :mod:`xrwatch.ortsession`) and runs batches. Two entry points:

* :meth:`InferenceEngine.predict_paths` - files in, one :class:`Prediction` per file out,
  reading through :func:`xrwatch.preprocess.load_model_input` (:mod:`xrwatch.filebatches`).
  A file that cannot be read becomes a ``status="error"`` prediction; it never stops the
  batch.
* :meth:`InferenceEngine.predict_arrays` - preprocessed arrays in (the caller decoded them,
  e.g. in a worker pool), class probabilities out. Pair it with
  :meth:`InferenceEngine.prediction` / :meth:`InferenceEngine.failure` to build results.

Never imports torch, ``onnx``, ``training`` or ``export``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xrwatch import filebatches, flags
from xrwatch.errors import ModelError
from xrwatch.filehash import file_sha256
from xrwatch.inputs import expand_inputs as expand_inputs  # re-exported: callers import it here
from xrwatch.modelmeta import DEFAULT_GRAPH_OPTIMIZATION, ModelMeta, metadata_from_session
from xrwatch.ortsession import CPU_EP as CPU_EP  # re-exported: callers import it here
from xrwatch.ortsession import (
    CUDA_EP,
    create_session,
    optimization_caveat,
    session_options,
)
from xrwatch.ortsession import cuda_unavailable_reason as cuda_unavailable_reason  # re-exported
from xrwatch.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
LOGITS = "logits"
PROBABILITIES = "probabilities"
CAM = "cam"  # optional outputs (DEVELOPERS.md: ONNX model metadata); export names them here
OOD_SCORE = "ood_score"
CONTRAST = "contrast"
FEATURE_SCORE = "feature_score"
LAYOUT_SCORE = "layout_score"
GUARD_OUTPUTS = (OOD_SCORE, CONTRAST)  # the scope guard's outputs
LAYOUT_OUTPUTS = (FEATURE_SCORE, LAYOUT_SCORE)  # and, with the coarse-layout check, these
POPULATION = "population"  # P(outside the trained population), with xrwatch.population

Status = Literal["ok", "error"]


@dataclass(frozen=True)
class Prediction:
    """The result for one input file (``status`` ``ok`` or ``error``)."""

    file: str
    status: Status
    label: str | None = None
    confidence: float | None = None  # probability of ``label``
    probabilities: Mapping[str, float] = field(default_factory=dict)  # class -> p
    error: str | None = None  # why the file failed; None when ok
    sha256: str | None = None  # of the input file's bytes
    model_sha256: str | None = None
    study_instance_uid: str | None = None  # DICOM only
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    accession_number: str | None = None
    flag: str = ""  # "", "low_confidence" or "out_of_scope" (xrwatch.flags); ok results only
    flag_reason: str | None = None
    ood_score: float | None = None  # the scope guard's score (> 1 = out of scope)
    heatmap: str | None = None  # path of the overlay PNG, when one was written

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["probabilities"] = dict(self.probabilities)
        return d


@dataclass(frozen=True)
class BatchOutputs:
    """Everything the model computed for a batch; optional outputs are None when absent."""

    probabilities: np.ndarray  # N x C
    cam: np.ndarray | None = None  # N x C x h x w
    ood_score: np.ndarray | None = None  # N
    contrast: np.ndarray | None = None  # N
    population: np.ndarray | None = None  # N: the population gate's score


class InferenceEngine:
    """One exported xrwatch model, ready to run. Thread-safe for concurrent ``predict_*``."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        use_gpu: bool = True,
        require_gpu: bool = False,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        low_confidence: float | None = None,
        scope_guard: str = "combined",
    ) -> None:
        """Load ``model_path``.

        ``use_gpu``: try CUDA first (falls back to CPU); ``require_gpu``: raise
        :class:`ProviderError` instead of falling back. Thread counts of 0 leave ONNX
        Runtime's defaults. ``low_confidence`` overrides the model's threshold for the
        ``low_confidence`` flag. ``scope_guard``: ``combined`` (out of scope when the
        feature and the layout check both say so; the model's ``ood_score``) or
        ``features`` (the feature distance alone: catches more non-chest images, flags
        more chest X-rays from other hospitals; same as ``combined`` for a model without
        the layout check). Raises :class:`ModelError` (or :class:`ModelMetadataError`)
        naming the file when the model cannot be used.
        """
        path = Path(model_path)
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        if intra_op_threads < 0 or inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0 (0 = ONNX Runtime default)")
        if scope_guard not in flags.SCOPE_GUARDS:
            raise ValueError(
                f"scope_guard must be one of {flags.SCOPE_GUARDS}, got {scope_guard!r}"
            )
        self.path = path
        self.model_sha256 = file_sha256(path)
        options = session_options(intra_op_threads, inter_op_threads)
        self._session, why = create_session(
            path, want_gpu=use_gpu, require_gpu=require_gpu, options=options
        )
        self.meta: ModelMeta = metadata_from_session(self._session, path, self.model_sha256)
        if self.meta.graph_optimization != DEFAULT_GRAPH_OPTIMIZATION:
            # the level the model was verified at: results then match export's verification
            options = session_options(
                intra_op_threads, inter_op_threads, self.meta.graph_optimization
            )
            self._session, why = create_session(
                path, want_gpu=use_gpu, require_gpu=require_gpu, options=options
            )
        self._check_signature()
        self._init_extras(low_confidence, scope_guard)
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.provider: str = self.providers[0]
        logger.info(
            "model %s (%s, %d classes, input %dx%d, sha256 %s) runs on %s (%s)",
            path.name,
            self.meta.name,
            len(self.classes),
            self.spec.size,
            self.spec.size,
            self.model_sha256[:12],
            self.provider,
            why,
        )
        caveat = optimization_caveat(self.meta, self.provider)
        if caveat:
            logger.warning("%s", caveat)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.meta.classes

    @property
    def spec(self) -> PreprocessSpec:
        return self.meta.spec

    @property
    def on_gpu(self) -> bool:
        return self.provider == CUDA_EP

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if INPUT_NAME not in inputs or not {LOGITS, PROBABILITIES} <= set(outputs):
            raise ModelError(
                f"{self.path}: expected input {INPUT_NAME!r} and outputs {LOGITS!r}, "
                f"{PROBABILITIES!r}; found inputs {sorted(inputs)} and outputs {sorted(outputs)}"
            )
        shape = list(inputs[INPUT_NAME].shape)
        size = self.spec.size
        expected = [1, size, size]
        if len(shape) != 4 or any(
            isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=True)
        ):
            raise ModelError(
                f"{self.path}: input {INPUT_NAME!r} has shape {shape}; its metadata's "
                f"preprocessing expects [N, 1, {size}, {size}]"
            )
        n_out = outputs[PROBABILITIES].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.classes):
            raise ModelError(
                f"{self.path}: the model has {n_out} outputs but its metadata names "
                f"{len(self.classes)} classes"
            )

    def _init_extras(self, low_confidence: float | None, scope_guard: str) -> None:
        """Which optional outputs (heatmaps, guard) and thresholds this model has."""
        outputs = {o.name for o in self._session.get_outputs()}
        meta = self.meta
        self.has_cam = CAM in outputs and meta.cam is not None
        self.has_guard = {OOD_SCORE, CONTRAST} <= outputs and meta.guard is not None
        gate = meta.population or {}
        self.has_population = POPULATION in outputs and meta.population is not None
        self.population_threshold = (
            _as_float(gate.get("threshold")) if self.has_population else None
        )
        self.adult_age = _as_float(gate.get("adult_age_years")) or flags.ADULT_AGE_YEARS
        model_low = (meta.calibration or {}).get("low_confidence")
        if low_confidence is not None and not 0.0 <= low_confidence < 1.0:
            raise ValueError(f"low_confidence must be in [0, 1), got {low_confidence}")
        self.low_confidence: float | None = (
            low_confidence if low_confidence is not None else _as_float(model_low)
        )
        self.min_contrast = _as_float((meta.guard or {}).get("min_contrast"))
        layout = bool((meta.guard or {}).get("layout")) and FEATURE_SCORE in outputs
        # the output that decides out_of_scope, and whether it includes the layout check
        self.guard_output = FEATURE_SCORE if layout and scope_guard == "features" else OOD_SCORE
        self.guard_layout = layout and self.guard_output == OOD_SCORE
        missing = meta.missing_optional
        if missing or not self.has_cam or (meta.guard is not None and not self.has_guard):
            logger.warning(
                "model %s lacks %s (exported by an older xrwatch?): %s",
                self.path.name,
                ", ".join(missing) or "the outputs its metadata names",
                "; ".join(
                    part
                    for part, off in (
                        ("no heatmaps", not self.has_cam),
                        ("probabilities not calibrated", meta.calibration is None),
                        ("no out_of_scope flags", not self.has_guard),
                        ("no low_confidence flags", self.low_confidence is None),
                    )
                    if off
                ),
            )

    # -- arrays --------------------------------------------------------------------------

    def _as_input(self, batch: np.ndarray) -> np.ndarray:
        arr = np.asarray(batch, dtype=np.float32)
        size = self.spec.size
        if arr.ndim == 3:
            arr = arr[:, None, :, :]
        if arr.ndim != 4 or arr.shape[1:] != (1, size, size) or arr.shape[0] == 0:
            raise ValueError(
                f"expected a non-empty batch of shape (N, {size}, {size}) or "
                f"(N, 1, {size}, {size}), got {tuple(np.shape(batch))}"
            )
        return np.ascontiguousarray(arr)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, probabilities)``, each float32 N x C, for a preprocessed batch."""
        feed = {INPUT_NAME: self._as_input(batch)}
        try:
            logits, probs = self._session.run([LOGITS, PROBABILITIES], feed)
        except Exception as exc:  # onnxruntime's errors are untyped
            raise ModelError(f"{self.path}: inference failed: {exc}") from exc
        return np.asarray(logits, np.float32), np.asarray(probs, np.float32)

    def predict_outputs(self, batch: np.ndarray) -> BatchOutputs:
        """Probabilities plus the optional outputs (``cam``, guard) the model has."""
        names = [PROBABILITIES]
        if self.has_cam:
            names.append(CAM)
        if self.has_guard:
            names += [self.guard_output, CONTRAST]
        if self.has_population:
            names.append(POPULATION)
        try:
            values = self._session.run(names, {INPUT_NAME: self._as_input(batch)})
        except Exception as exc:  # onnxruntime's errors are untyped
            raise ModelError(f"{self.path}: inference failed: {exc}") from exc
        out = {n: np.asarray(v, np.float32) for n, v in zip(names, values, strict=True)}
        return BatchOutputs(
            probabilities=out[PROBABILITIES],
            cam=out.get(CAM),
            ood_score=out.get(self.guard_output),
            contrast=out.get(CONTRAST),
            population=out.get(POPULATION),
        )

    def flag(
        self,
        confidence: float,
        *,
        ood_score: float | None = None,
        contrast: float | None = None,
        meta: Any = None,
        population: float | None = None,
    ) -> tuple[str, str]:
        """``(flag, reason)`` of an ok result (see :mod:`xrwatch.flags`). The DICOM age
        counts for a model with a population gate even when ``population`` is not given."""
        gated = self.has_population
        return flags.decide(
            confidence,
            ood_score=ood_score if self.has_guard else None,
            contrast=contrast if self.has_guard else None,
            # header evidence with a guard; the age with a population gate
            image_meta=meta if self.has_guard or gated else None,
            low_confidence=self.low_confidence,
            min_contrast=self.min_contrast,
            layout_checked=self.guard_layout,
            layout_either=self.guard_layout and (self.meta.guard or {}).get("combine") == "either",
            population=population if gated else None,
            population_threshold=self.population_threshold,
            adult_age=self.adult_age,
        )

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (float32 N x C, columns in :attr:`classes` order).

        ``batch``: float32 N x H x W (or N x 1 x H x W) in [0, 1], each image the output of
        ``self.spec.apply`` / :func:`load_model_input` with ``self.spec``; H = W =
        ``self.spec.size``. Raises ``ValueError`` for a wrong shape, :class:`ModelError`
        if ONNX Runtime fails.
        """
        return self.run(batch)[1]

    # -- building results ----------------------------------------------------------------

    def prediction(
        self,
        file: str | Path,
        probabilities: np.ndarray,
        *,
        sha256: str | None = None,
        meta: Any = None,
        ood_score: float | None = None,
        contrast: float | None = None,
        heatmap: str | None = None,
        population: float | None = None,
    ) -> Prediction:
        """An ``ok`` :class:`Prediction` from one row of :meth:`predict_arrays`.

        ``meta`` is the :class:`~xrwatch.imageio.ImageMeta` of the file (for DICOM UIDs and
        header evidence of the scope guard); ``ood_score``/``contrast`` the guard's outputs.
        """
        row = np.asarray(probabilities, dtype=np.float64).reshape(-1)
        if row.shape[0] != len(self.classes):
            raise ValueError(f"expected {len(self.classes)} probabilities, got {row.shape[0]}")
        best = int(np.argmax(row))
        confidence = float(row[best])
        flag, reason = self.flag(
            confidence, ood_score=ood_score, contrast=contrast, meta=meta, population=population
        )
        return Prediction(
            file=str(file),
            status="ok",
            label=self.classes[best],
            confidence=confidence,
            flag=flag,
            flag_reason=reason or None,
            ood_score=ood_score if self.has_guard else None,
            heatmap=heatmap,
            probabilities={c: float(p) for c, p in zip(self.classes, row, strict=True)},
            sha256=sha256,
            model_sha256=self.model_sha256,
            study_instance_uid=getattr(meta, "study_instance_uid", None),
            series_instance_uid=getattr(meta, "series_instance_uid", None),
            sop_instance_uid=getattr(meta, "sop_instance_uid", None),
            accession_number=getattr(meta, "accession_number", None),
        )

    def failure(self, file: str | Path, error: str, *, sha256: str | None = None) -> Prediction:
        """An ``error`` :class:`Prediction` for a file that could not be classified."""
        return Prediction(
            file=str(file),
            status="error",
            error=error,
            sha256=sha256,
            model_sha256=self.model_sha256,
        )

    # -- files ---------------------------------------------------------------------------

    def predict_paths(
        self,
        paths: Iterable[str | Path],
        batch_size: int = 8,
        *,
        heatmaps: Path | None = None,
        root: Path | None = None,
    ) -> list[Prediction]:
        """One :class:`Prediction` per path, in order; unreadable files get ``status="error"``.

        Files are read through :func:`load_model_input` with the model's own spec and run
        ``batch_size`` at a time (:mod:`xrwatch.filebatches`). Only a failure of the model
        itself raises (:class:`ModelError`). With ``heatmaps`` (and a model with a ``cam``
        output), each ok file's overlay goes to ``heatmaps/<path relative to root>.png``.
        """
        return filebatches.predict_paths(self, paths, batch_size, heatmaps=heatmaps, root=root)

    def describe(self) -> dict[str, Any]:
        """Model and provider facts, for logs, reports and health endpoints."""
        return {**self.meta.to_dict(), "provider": self.provider, "providers": list(self.providers)}


def _as_float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
