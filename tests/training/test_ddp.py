"""torchrun with DistributedDataParallel: 2 CPU processes with gloo, rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xrwatch_training.checkpoint import load_checkpoint


@pytest.mark.slow
def test_torchrun_two_processes_gloo(synth_data: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = Path(shutil.which("torchrun") or "torchrun")
    out = tmp_path / "runs"
    cmd = [
        str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "xrwatch", "train",
        "--data", str(synth_data), "--arch", "tinycnn", "--weights", "none",
        "--image-size", "32", "--batch-size", "16", "--epochs", "2", "--out", str(out),
        "--name", "ddp", "--device", "cpu", "--no-progress", "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["ddp"]
    run = out / "ddp"
    ckpt = load_checkpoint(run / "best.pt")
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # metrics gathered from both ranks: every image of the split is counted once
    for split in ("val", "test"):
        n = len((run / "splits" / f"{split}.csv").read_text().splitlines()) - 1
        metrics = ckpt["metrics"][split]
        assert metrics["n"] == n and sum(map(sum, metrics["confusion_matrix"])) == n
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 epochs, written once (by rank 0)
    assert proc.stdout.count("run folder:") == 1
    assert "on cpu, 2 process(es), global batch 16 (8 per process)" in proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["batch_size"], config["world_size"]) == (16, 2)
