"""Dataset indexing, labels and splits (torch-free)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xrwatch.errors import DatasetError
from xrwatch_training.data import extra_samples, index_dataset, patient_group
from xrwatch_training.labels import task_label
from xrwatch_training.splits import make_splits, write_split_files


def test_real_metadata_counts_multiclass(shared_xray: Path) -> None:
    index = index_dataset(shared_xray / "coronahack", "multiclass")
    assert index.kind == "coronahack"
    assert index.counts("TRAIN") == {
        "Normal": 1342,
        "Bacteria": 2535,
        "Virus": 1349,
        "COVID-19": 58,
    }
    assert index.counts("TEST") == {"Normal": 234, "Bacteria": 242, "Virus": 148, "COVID-19": 0}
    assert sum(index.excluded.values()) == 2  # Stress-Smoking/ARDS


def test_real_metadata_counts_binary(shared_xray: Path) -> None:
    index = index_dataset(shared_xray / "coronahack", "binary")
    # COVID-19 (58) and SARS (4) count as Virus; Normal left out
    assert index.counts("TRAIN") == {"Bacteria": 2535, "Virus": 1345 + 58 + 4}
    assert index.counts("TEST") == {"Bacteria": 242, "Virus": 148}


def test_label_mapping() -> None:
    assert task_label("SARS", "multiclass") == "Virus"
    assert task_label("COVID-19", "binary") == "Virus"
    assert task_label("Normal", "binary") is None
    assert task_label("ARDS", "multiclass") is None


def test_patient_groups() -> None:
    assert patient_group(Path("person1036_bacteria_2970.jpeg")) == "person1036"
    assert patient_group(Path("person1036_virus_12.jpeg")) == "person1036"
    assert patient_group(Path("NORMAL2-IM-0406-0001.jpeg")) == "NORMAL2-IM-0406"
    assert patient_group(Path("IM-0128-0001.jpeg")) == patient_group(Path("IM-0128-0002.jpeg"))
    a = patient_group(Path("SARS-10.1148rg.242035193-g04mr34g09c-Fig9c-day27.jpeg"))
    b = patient_group(Path("SARS-10.1148rg.242035193-g04mr34g07b-Fig7b-day12.jpeg"))
    assert a == b
    assert patient_group(Path("jkms-35-e79-g001-l-c.jpg")) == patient_group(
        Path("jkms-35-e79-g001-l-a.jpg")
    )


@pytest.mark.parametrize("mode", ["official", "patient"])
def test_splits_are_patient_disjoint_and_seeded(shared_xray: Path, mode: str) -> None:
    index = index_dataset(shared_xray / "coronahack", "multiclass")
    s1 = make_splits(index, mode, val_fraction=0.1, test_fraction=0.15, seed=3)
    s2 = make_splits(index, mode, val_fraction=0.1, test_fraction=0.15, seed=3)
    assert [x.path for x in s1.val] == [x.path for x in s2.val]
    groups = {name: {x.group for x in part} for name, part in s1.by_name().items()}
    assert not groups["train"] & groups["val"]
    if mode == "patient":
        assert not (groups["train"] | groups["val"]) & groups["test"]
        assert s1.counts(index.classes)["test"]["COVID-19"] > 0
    else:
        assert any("no COVID-19" in w for w in s1.warnings)
    counts = s1.counts(index.classes)
    # stratified: each class's validation share is near 10 %
    for c in ("Normal", "Bacteria", "Virus"):
        share = counts["val"][c] / (counts["train"][c] + counts["val"][c])
        assert 0.07 < share < 0.13


def test_kaggle_nested_layout_and_split_files(synth_data: Path, tmp_path: Path) -> None:
    nested = tmp_path / "kaggle" / "Coronahack-Chest-XRay-Dataset" / "Coronahack-Chest-XRay-Dataset"
    nested.mkdir(parents=True)
    for sub in ("train", "test"):
        (nested / sub).symlink_to(synth_data / sub)
    shutil.copy(synth_data / "Chest_xray_Corona_Metadata.csv", tmp_path / "kaggle")
    index = index_dataset(tmp_path / "kaggle", "multiclass")
    assert index.images_root == nested
    assert all(s.path.is_file() for s in index.samples)
    splits = make_splits(index, "official", val_fraction=0.1, test_fraction=0.1, seed=0)
    write_split_files(splits, tmp_path / "run")
    lines = (tmp_path / "run" / "splits" / "val.csv").read_text().splitlines()
    assert lines[0].startswith("path,label") and len(lines) == len(splits.val) + 1


def test_folder_per_class_and_extra(shared_xray: Path) -> None:
    index = index_dataset(shared_xray / "real", "multiclass")
    assert index.kind == "folders"
    assert index.counts() == {"Normal": 30, "Bacteria": 33, "Virus": 33, "COVID-19": 34}
    with pytest.raises(DatasetError, match="--split patient"):
        make_splits(index, "official", val_fraction=0.1, test_fraction=0.1, seed=0)
    # the default picks the split that works for the layout, and says which and why
    auto = make_splits(index, "auto", val_fraction=0.1, test_fraction=0.1, seed=0)
    assert auto.mode == "patient" and "no fixed test set" in auto.why
    assert auto.test and auto.shared_patients() == []
    coronahack = index_dataset(shared_xray / "coronahack", "multiclass")
    official = make_splits(coronahack, "auto", val_fraction=0.1, test_fraction=0.1, seed=0)
    assert official.mode == "official" and "CoronaHack's TEST" in official.why
    extra = extra_samples(f"{shared_xray / 'real' / 'COVID-19'}:COVID-19", "multiclass")
    assert len(extra) == 34 and {s.label for s in extra} == {"COVID-19"}
    with pytest.raises(DatasetError, match="not a class"):
        extra_samples(f"{shared_xray / 'real' / 'Normal'}:Normal", "binary")


def test_folder_listing_takes_images_and_skips_hidden_and_temporary_files(tmp_path: Path) -> None:
    for rel in ("Normal/a.PNG", "Normal/p1/b.dcm", "Normal/notes.txt", "Normal/._a.PNG",
                "Normal/.thumbs/c.jpg", "Virus/d.jpeg", "Virus/e.jpg", "Virus/~e.jpg",
                "Virus/DICOMDIR"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    index = index_dataset(tmp_path, "multiclass")
    assert sorted(str(s.path.relative_to(tmp_path)) for s in index.samples) == [
        "Normal/a.PNG", "Normal/p1/b.dcm", "Virus/d.jpeg", "Virus/e.jpg",
    ]  # fmt: skip
    extra = extra_samples(f"{tmp_path / 'Normal'}:COVID-19", "multiclass")
    assert [s.path.name for s in extra] == ["a.PNG", "b.dcm"]


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no class folders"):
        index_dataset(tmp_path, "multiclass")


def test_dataset_and_synth_commands_do_not_import_torch(shared_xray: Path, tmp_path: Path) -> None:
    code = (
        "import sys, json; from xrwatch.cli import main\n"
        f"rc1 = main(['synth', {str(tmp_path / 's')!r}, '--scale', '0.01', '--image-size', '32'])\n"
        f"rc2 = main(['dataset', {str(shared_xray / 'coronahack')!r}, '--json'])\n"
        "assert rc1 == rc2 == 0, (rc1, rc2)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert '"TRAIN"' in out.stdout and '"Bacteria": 2535' in out.stdout
    assert (tmp_path / "s" / "Chest_xray_Corona_Metadata.csv").is_file()


def test_synth_data_groups_every_image_by_patient_without_a_warning(tmp_path: Path) -> None:
    from xrwatch_training.synth import write_synthetic

    write_synthetic(tmp_path, scale=0.02, image_size=16, seed=0)
    index = index_dataset(tmp_path, "multiclass")
    assert index.patients_csv == tmp_path / "covid_collection_patients.csv"
    assert not [w for w in index.warnings if "patient id" in w]
    covid = [s for s in index.samples if s.fine == "COVID-19"]
    assert covid and all(s.group.startswith("collection:synth-") for s in covid)
