"""``xrwatch reproduce``: the study's six experiments in a row, then Table 1.

Each experiment runs in ``OUT/<NAME>`` with the shared overrides (data, epochs, image size,
weights ...). A finished run (``test_metrics.json`` present) is reused and an interrupted one
resumed, so a stopped reproduction continues where it stopped; a run folder whose config
differs from the one asked for is refused rather than silently mixed into the table.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from xrwatch.errors import ConfigError

from .engine import barrier, load_run_config, resolve_split_config, train
from .presets import EXPERIMENTS, experiment_config
from .ranking import comparison_key
from .report import write_table1

logger = logging.getLogger(__name__)

# Fields that may differ between a stored run and a re-invocation without changing results.
_IRRELEVANT = {"progress", "workers", "cache_dir", "device", "name", "out", "world_size"}


def _same_recipe(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    keys = (set(stored) | set(wanted)) - _IRRELEVANT
    return all(stored.get(k) == wanted.get(k) for k in keys)


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The figures Table 1 needs from a finished run folder."""
    summary = json.loads((run_dir / "test_metrics.json").read_text(encoding="utf-8"))
    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    test = summary.get("test") or {}
    val = summary.get("val_at_best") or {}
    train_m = summary.get("train_at_best") or {}
    return {
        "run_dir": str(run_dir),
        "setup": f"{cfg['arch']}, weights {cfg['weights']}, loss {cfg['loss']}, "
        f"sampler {cfg['sampler']}",
        "best_epoch": summary.get("best_epoch"),
        "train_accuracy": train_m.get("accuracy"),
        "val_accuracy": val.get("accuracy"),
        "val_balanced_accuracy": val.get("balanced_accuracy"),
        "test_accuracy": test.get("accuracy"),
        "test_balanced_accuracy": test.get("balanced_accuracy"),
        "test_macro_f1": test.get("macro_f1"),
        "test_auroc_macro": test.get("auroc_macro"),
        "avg_train_accuracy": summary.get("avg_train_accuracy_over_epochs"),
        "avg_val_accuracy": summary.get("avg_val_accuracy_over_epochs"),
        "val_loss": val.get("loss"),
        "val_accuracy_ci": (val.get("ci95") or {}).get("accuracy"),
        "val_balanced_accuracy_ci": (val.get("ci95") or {}).get("balanced_accuracy"),
        "test_accuracy_ci": (test.get("ci95") or {}).get("accuracy"),
        "test_balanced_accuracy_ci": (test.get("ci95") or {}).get("balanced_accuracy"),
        "test_macro_f1_ci": (test.get("ci95") or {}).get("macro_f1"),
        "test_classes_missing": summary.get("test_classes_missing") if test else [],
        "classes": summary.get("classes"),
        "extra": bool(cfg.get("extra")),
        "comparison_key": comparison_key(cfg, summary.get("classes") or ()),
    }


def reproduce(overrides: dict[str, Any], *, only: list[str] | None = None) -> tuple[Path, Path]:
    """Train every preset (or ``only`` these) and write ``OUT/table1.{md,csv}``."""
    names = list(only) if only else list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ConfigError(f"unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}")
    out = Path(overrides.get("out") or "runs")
    results: dict[str, dict[str, Any]] = {}
    main = int(os.environ.get("RANK", "0")) == 0
    for name in names:
        barrier()  # under torchrun, no rank looks at a run folder another is creating
        cfg = resolve_split_config(
            experiment_config(name, {**overrides, "name": name, "out": str(out)})
        )
        run_dir = out / name
        if (run_dir / "config.json").is_file():
            stored = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
            if not _same_recipe(stored, cfg.to_dict()):
                raise ConfigError(
                    f"{run_dir} holds a run with a different config; use another --out or remove it"
                )
            if (run_dir / "test_metrics.json").is_file():
                logger.info("%s: finished run found in %s, reused", name, run_dir)
            elif (run_dir / "last.pt").is_file():
                logger.info("%s: resuming %s", name, run_dir)
                train(load_run_config(run_dir, {"progress": cfg.progress}), resume=run_dir)
            else:  # stopped before its first epoch ended: start it again
                (run_dir / "config.json").unlink()
                train(cfg)
        else:
            logger.info("%s: %s", name, cfg)
            train(cfg)
        if main:
            results[name] = run_summary(run_dir)
    if not main:
        return out / "table1.md", out / "table1.csv"
    return write_table1(results, out)
