"""A run folder's config and lock, for training, ``--resume`` and ``xrwatch reproduce``.

Owns the name of a new run folder, ``config.json`` (read back with overrides; kept the
config that is running, each change appended to ``config_history.jsonl``), ``split = auto``
resolved before it is recorded, and the exclusive lock that keeps two processes from
writing one run folder. Torch-free.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from xrwatch.config import build_config
from xrwatch.errors import ConfigError

from .data import index_dataset
from .presets import TrainConfig
from .report import write_json
from .splits import resolve_split

logger = logging.getLogger(__name__)


def default_name(cfg: TrainConfig) -> str:
    """A new run folder's name: ``<experiment>-<task>-<UTC time>``."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.experiment}-{cfg.task}-{stamp}"


def resolve_split_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``split = auto`` resolved for its data's layout (official when it has a
    fixed test set, else patient), so config.json records the split that ran."""
    if cfg.split != "auto" or not cfg.data:
        return cfg
    mode, why = resolve_split(index_dataset(cfg.data, cfg.task, patients=cfg.patients), "auto")
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("split: %s (%s)", mode, why)
    return replace(cfg, split=mode)  # type: ignore[arg-type]


def load_run_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of an existing run folder (``config.json``), with ``overrides``."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.json)")
    values = json.loads(path.read_text(encoding="utf-8"))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(TrainConfig, values, source=str(path))


def record_config(run_dir: Path, cfg: TrainConfig, *, event: str) -> None:
    """Keep ``config.json`` the config that is running (e.g. after ``--resume --epochs N``);
    each change is appended to ``config_history.jsonl`` (time, event, field: [old, new])."""
    path = run_dir / "config.json"
    stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    new = cfg.to_dict()
    changed = {k: [stored.get(k), v] for k, v in new.items() if stored.get(k) != v}
    if not changed:
        return
    entry = {
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "event": event,
        "changed": changed,
    }
    with (run_dir / "config_history.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    write_json(path, new)
    logger.info(
        "%s: config.json updated (%s)",
        run_dir,
        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
    )


@contextmanager
def hold_run_folder(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on ``run_dir`` for this process's lifetime in it: two processes
    writing one run folder (a ``--resume`` of a run still training) would interleave its
    checkpoints and metrics."""
    import fcntl

    fh = (run_dir / ".lock").open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise ConfigError(
                f"{run_dir} is in use by another training process ({holder}); wait for it "
                "to finish or stop it (Ctrl-C keeps last.pt, the last completed epoch) "
                "before --resume"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the lock
