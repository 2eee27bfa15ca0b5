"""The training loop end to end on synthetic data, at small sizes."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from xrwatch.cli import main
from xrwatch.errors import DatasetError
from xrwatch.preprocess import PreprocessSpec, load_model_input
from xrwatch_training import engine
from xrwatch_training import epoch as epoch_mod  # train_one_epoch looks augment up there
from xrwatch_training.checkpoint import load_checkpoint
from xrwatch_training.engine import augment, load_run_config, train
from xrwatch_training.models import model_from_checkpoint
from xrwatch_training.presets import EXPERIMENTS, TrainConfig, experiment_config

TINY: dict[str, Any] = {
    "arch": "tinycnn",
    "weights": "none",
    "image_size": 32,
    "batch_size": 16,
    "progress": False,
    "workers": 1,
}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_short_run_learns_and_writes_a_complete_run_folder(
    synth_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = experiment_config("custom", {**TINY, "data": str(synth_data), "epochs": 4,
                                       "out": str(tmp_path), "name": "run"})  # fmt: skip
    with caplog.at_level("INFO"):
        run = train(cfg)
    summary = json.loads((run / "test_metrics.json").read_text())
    # official split: no COVID-19 test image, and every figure that is shown says so
    assert summary["test_classes_missing"] == ["COVID-19"]
    assert "covers Normal, Bacteria, Virus only: no COVID-19 image" in caplog.text
    # 95 % intervals by bootstrap over the split's patients
    for part, metrics in (("test", summary["test"]), ("val", summary["val_at_best"])):
        ci = metrics["ci95"]
        groups = {r["group"] for r in _rows(run / "splits" / f"{part}.csv")}
        assert (ci["unit"], ci["patients"], ci["seed"]) == ("patient", len(groups), cfg.seed)
        for name in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert ci[name][0] <= metrics[name] <= ci[name][1], (part, name)
    # chance is 1/3 balanced accuracy (the official TEST set has three classes)
    assert summary["test"]["balanced_accuracy"] > 0.7, summary["test"]
    assert summary["val_at_best"]["balanced_accuracy"] > 0.7
    for name in (
        "config.json",
        "metrics.csv",
        "best.pt",
        "last.pt",
        "curves.png",
        "confusion_matrix.png",
        "splits/train.csv",
        "splits/val.csv",
        "splits/test.csv",
    ):
        assert (run / name).is_file(), name  # fmt: skip
    assert len(_rows(run / "metrics.csv")) == 4
    # config.json is complete: it rebuilds the same config, --split auto resolved
    assert load_run_config(run) == dataclasses.replace(cfg, split="official")
    # best.pt is self-describing, and rebuilding it gives the test metrics back
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["epoch"] == summary["best_epoch"] and ckpt["metrics"]["test"] == summary["test"]
    assert ckpt["preprocess"] == PreprocessSpec(size=32).to_dict()
    model = model_from_checkpoint(ckpt)
    test_rows = _rows(run / "splits" / "test.csv")
    x = torch.stack(
        [
            torch.from_numpy(load_model_input(r["path"], PreprocessSpec(size=32))[0])
            for r in test_rows
        ]
    )[:, None]
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = torch.tensor([ckpt["classes"].index(r["label"]) for r in test_rows])
    acc = float((pred == labels).float().mean())
    assert abs(acc - summary["test"]["accuracy"]) < 0.02  # float16 cache vs float32 input


def test_interrupt_then_resume_continues_the_same_run(
    tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {**TINY, "data": str(tiny_synth), "epochs": 3, "lr_step": 1, "out": str(tmp_path)}
    reference = train(experiment_config("custom", {**base, "name": "reference"}))
    cfg = experiment_config("custom", {**base, "name": "run"})
    real_epoch = engine.train_one_epoch

    def interrupted_at_2(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if args[8] == 2:  # the epoch argument
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", interrupted_at_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    run = tmp_path / "run"
    interrupted = load_checkpoint(run / "last.pt")
    assert interrupted["epoch"] == 1 and interrupted["metrics"]["val"]["accuracy"] is not None
    first = _rows(run / "metrics.csv")
    assert len(first) == 1
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    rows = _rows(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[0] == first[0]
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 3
    assert last["lr_scheduler"]["last_epoch"] == 3
    assert (run / "test_metrics.json").is_file()
    # exactly the uninterrupted run: same sample order, augmentation draws, optimizer and lr
    keep = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    assert [{k: r[k] for k in keep} for r in rows] == [
        {k: r[k] for k in keep} for r in _rows(reference / "metrics.csv")
    ]
    ref = load_checkpoint(reference / "last.pt")["model"]
    assert all(torch.equal(last["model"][k], ref[k]) for k in ref)


@pytest.fixture(scope="module")
def uninterrupted(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = {**TINY, "data": str(tiny_synth), "epochs": 3, "lr_step": 1, "name": "reference"}
    return train(experiment_config("custom", {**base, "out": str(tmp_path_factory.mktemp("r"))}))


_TIMING = {"train_images_per_s", "epoch_seconds"}


@pytest.mark.parametrize("where", ["mid-epoch", "validation"])
def test_ctrl_c_mid_epoch_or_in_validation_then_resume_is_the_uninterrupted_run(
    uninterrupted: Path, tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:  # fmt: skip
    base = {**TINY, "data": str(tiny_synth), "epochs": 3, "lr_step": 1, "out": str(tmp_path)}
    cfg = experiment_config("custom", {**base, "name": "run"})
    real_epoch, real_augment, real_evaluate = (
        engine.train_one_epoch,
        epoch_mod.augment,
        engine.evaluate,
    )
    state = {"epoch": 0, "steps": 0, "evals": 0}

    def epoch(*args: Any, **kwargs: Any) -> dict[str, Any]:
        state["epoch"], state["steps"] = args[8], 0
        return real_epoch(*args, **kwargs)

    def augment_then_stop(*args: Any, **kwargs: Any) -> torch.Tensor:
        state["steps"] += 1
        if state["epoch"] == 2 and state["steps"] == 3:  # two optimizer steps into epoch 2
            raise KeyboardInterrupt
        return real_augment(*args, **kwargs)

    def evaluate_then_stop(*args: Any, **kwargs: Any) -> Any:
        state["evals"] += 1
        if state["evals"] == 2:  # epoch 2 trained and its scheduler step taken
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", epoch)
    if where == "mid-epoch":
        monkeypatch.setattr(epoch_mod, "augment", augment_then_stop)
    else:
        monkeypatch.setattr(engine, "evaluate", evaluate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    run = tmp_path / "run"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in _rows(run / "metrics.csv")] == ["1"]
    monkeypatch.setattr(epoch_mod, "augment", real_augment)
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0

    def strip(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k not in _TIMING} for r in rows]

    assert strip(_rows(run / "metrics.csv")) == strip(_rows(uninterrupted / "metrics.csv"))
    last, ref = load_checkpoint(run / "last.pt"), load_checkpoint(uninterrupted / "last.pt")
    assert all(torch.equal(last["model"][k], ref["model"][k]) for k in ref["model"])
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["test"] == json.loads((uninterrupted / "test_metrics.json").read_text())["test"]


def test_resume_of_a_run_stopped_before_its_first_epoch_ended_starts_at_epoch_1(
    tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {**TINY, "data": str(tiny_synth), "epochs": 1, "out": str(tmp_path)}
    real_augment = epoch_mod.augment

    def stop(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise KeyboardInterrupt

    monkeypatch.setattr(epoch_mod, "augment", stop)
    with pytest.raises(KeyboardInterrupt):
        train(experiment_config("custom", {**base, "name": "run"}))
    assert not (tmp_path / "run" / "last.pt").exists()
    monkeypatch.setattr(epoch_mod, "augment", real_augment)
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_resume_with_more_epochs_updates_config_json_and_keeps_a_history(
    tiny_synth: Path, tmp_path: Path
) -> None:
    base = {**TINY, "data": str(tiny_synth), "epochs": 1, "out": str(tmp_path), "name": "run"}
    run = train(experiment_config("custom", base))
    assert not (run / "config_history.jsonl").exists()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert load_run_config(run).epochs == 2 and load_checkpoint(run / "last.pt")["epoch"] == 2
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["event"] == "resume"
    assert history[0]["changed"] == {"epochs": [1, 2]}
    assert load_checkpoint(run / "best.pt")["config"]["epochs"] in (1, 2)


def test_missing_and_unreadable_images_are_listed_or_stop_with_strict(
    tiny_synth: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    images = sorted((data / "train").glob("person*_bacteria_*.jpeg"))
    images[0].unlink()
    images[1].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    base = {**TINY, "data": str(data), "epochs": 1, "out": str(tmp_path / "runs")}
    run = train(experiment_config("custom", {**base, "name": "lenient"}))
    skipped = {Path(r["path"]).name: r["reason"] for r in _rows(run / "skipped_files.csv")}
    assert skipped[images[0].name] == "missing"
    assert skipped[images[1].name].startswith("unreadable")
    kept = {Path(r["path"]).name for part in ("train", "val", "test")
            for r in _rows(run / "splits" / f"{part}.csv")}  # fmt: skip
    assert images[0].name not in kept and images[1].name not in kept
    with pytest.raises(DatasetError, match="--strict"):
        train(experiment_config("custom", {**base, "name": "strict", "strict": True}))


def test_augment_flips_and_rotation() -> None:
    x = torch.rand(6, 1, 16, 16)
    cfg = TrainConfig(hflip=1.0, vflip=0.0, rotation_p=0.0)
    torch.testing.assert_close(augment(x, cfg, torch.Generator().manual_seed(0)), x.flip(3))
    none = TrainConfig(hflip=0.0, vflip=0.0, rotation_p=0.0)
    torch.testing.assert_close(augment(x, none, torch.Generator()), x)
    rot = TrainConfig(hflip=0.0, vflip=0.0, rotation_p=1.0, rotation_degrees=30.0)
    out = augment(x, rot, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.allclose(out, x)


@pytest.mark.slow
def test_all_six_presets_train_a_step(
    tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision import models as tvm

    from tests.training.test_weights import write_chexnet_checkpoint
    from xrwatch_training.weights import imagenet_cache_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = imagenet_cache_path("resnet50")
    target.parent.mkdir(parents=True)
    torch.save(tvm.resnet50(weights=None).state_dict(), target)
    chexnet = tmp_path / "model.pth.tar"
    write_chexnet_checkpoint(chexnet)
    for name, preset in EXPERIMENTS.items():
        cfg = experiment_config(name, {
            "data": str(tiny_synth), "image_size": 32, "batch_size": 2, "epochs": 1,
            "max_steps_per_epoch": 1, "chexnet_weights": str(chexnet), "out": str(tmp_path),
            "progress": False, "workers": 1,
        })  # fmt: skip
        run = train(cfg)
        ckpt = load_checkpoint(run / "best.pt")
        assert (ckpt["arch"], ckpt["experiment"]) == (preset["arch"], name)
        assert ckpt["config"]["loss"] == preset["loss"]
        assert ckpt["config"]["sampler"] == preset["sampler"]
        # the recipe as it ran: Adam lr 1e-3 and StepLR every 10 epochs x 0.5 (in last.pt,
        # for --resume; best.pt is for export and leaves the optimizer state out)
        assert ckpt["optimizer"] is None and ckpt["lr_scheduler"] is None
        last = load_checkpoint(run / "last.pt")
        assert {"betas", "lr"} <= set(last["optimizer"]["param_groups"][0])
        assert last["optimizer"]["param_groups"][0]["lr"] == 1e-3
        assert (last["lr_scheduler"]["step_size"], last["lr_scheduler"]["gamma"]) == (10, 0.5)
        torch.testing.assert_close(last["model"], ckpt["model"])  # one epoch: best = last


def test_reproduce_command_writes_table1(tiny_synth: Path, tmp_path: Path) -> None:
    args = ["reproduce", "--data", str(tiny_synth), "--epochs", "1", "--image-size", "32",
            "--arch", "tinycnn", "--weights", "none", "--out", str(tmp_path), "--no-progress",
            "--workers", "1"]  # fmt: skip
    assert main(args) == 0
    table = (tmp_path / "table1.md").read_text()
    for name in EXPERIMENTS:
        assert f"| {name} |" in table
        assert (tmp_path / name / "best.pt").is_file()
    assert "62.1" in table and "Best run" in table
    rows = _rows(tmp_path / "table1.csv")
    assert [r["experiment"] for r in rows] == list(EXPERIMENTS)
    stamp = (tmp_path / "PRCE" / "best.pt").stat().st_mtime_ns
    assert main(args) == 0  # finished runs are reused, not retrained
    assert (tmp_path / "PRCE" / "best.pt").stat().st_mtime_ns == stamp
    # a changed recipe is refused instead of being mixed into the table
    assert main([*args[:4], "2", *args[5:]]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_with_amp_and_channels_last(synth_data: Path, tmp_path: Path) -> None:
    cfg = experiment_config("custom", {**TINY, "data": str(synth_data), "epochs": 2,
                                       "out": str(tmp_path), "device": "cuda"})  # fmt: skip
    run = train(cfg)
    assert json.loads((run / "test_metrics.json").read_text())["test"]["balanced_accuracy"] > 0.5
    assert load_checkpoint(run / "best.pt")["model"]["fc.weight"].device.type == "cpu"


def test_folder_per_class_with_dicom_trains(shared_xray: Path, tmp_path: Path) -> None:
    """A hospital's own layout: real JPEG/PNG class folders plus real DICOM files."""
    data = tmp_path / "hospital"
    for cls in ("Normal", "Bacteria", "Virus", "COVID-19"):
        (data / cls).mkdir(parents=True)
        for src in sorted((shared_xray / "real" / cls).iterdir())[:12]:
            (data / cls / src.name).symlink_to(src)
    dicoms = sorted((shared_xray / "dicom").glob("*.dcm"))
    for i, src in enumerate(dicoms):  # one patient folder per DICOM, filed as Normal
        (data / "Normal" / f"patient{i}").mkdir()
        (data / "Normal" / f"patient{i}" / src.name).symlink_to(src)
    # the defaults: no --split needed, the layout has no fixed test set so it is carved
    cfg = experiment_config("custom", {**TINY, "data": str(data), "epochs": 1,
                                       "out": str(tmp_path / "runs")})  # fmt: skip
    assert cfg.split == "auto"
    run = train(cfg)
    assert json.loads((run / "config.json").read_text())["split"] == "patient"
    assert not (run / "skipped_files.csv").exists()
    listed = [r["path"] for part in ("train", "val", "test")
              for r in _rows(run / "splits" / f"{part}.csv")]  # fmt: skip
    assert sum(p.endswith(".dcm") for p in listed) == len(dicoms)
    assert len(listed) == 48 + len(dicoms)


def test_same_seed_same_run(tiny_synth: Path, tmp_path: Path) -> None:
    base = {**TINY, "data": str(tiny_synth), "epochs": 2, "out": str(tmp_path)}
    runs = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # whatever the global RNG holds, the run's seed decides
        runs.append(train(experiment_config("custom", {**base, "name": f"r{i}"})))
    keep = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    a, b = ([{k: r[k] for k in keep} for r in _rows(run / "metrics.csv")] for run in runs)
    assert a == b
    ca, cb = (load_checkpoint(run / "last.pt")["model"] for run in runs)
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_missing_imagenet_weights_stop_before_any_run_folder(
    tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = tmp_path / "runs"
    args = ["train", "--data", str(tiny_synth), "--experiment", "PRCE", "--out", str(out)]
    assert main(args) == 2
    assert not out.exists()


def test_every_field_can_be_set_from_the_cli(tiny_synth: Path, tmp_path: Path) -> None:
    from xrwatch.cli.train_cmd import _parse_sets

    assert _parse_sets(["focal_alpha=[0.5, 1, 1, 2]", "rotation-degrees=15", "resize=bicubic"]) == {
        "focal_alpha": [0.5, 1, 1, 2],
        "rotation_degrees": 15,
        "resize": "bicubic",
    }
    cfg = experiment_config("PRFL", _parse_sets(["focal_alpha=[0.5, 1, 1, 2]", "lr_step=3"]))
    assert cfg.focal_alpha == (0.5, 1.0, 1.0, 2.0) and cfg.lr_step == 3 and cfg.loss == "focal"
    out = tmp_path / "runs"
    assert main(["train", "--data", str(tiny_synth), "--set", "bogus=1", "--out", str(out)]) == 2
    assert (
        main(["train", "--data", str(tiny_synth), "--set", "epochs=zero", "--out", str(out)]) == 2
    )
    assert not out.exists()
