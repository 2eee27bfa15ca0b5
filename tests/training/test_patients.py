"""No patient in two splits, checked on the real CoronaHack metadata with patient ids
derived here, independently of training.data's rules. Torch-free."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from xrwatch.errors import DatasetError
from xrwatch_training.data import index_dataset, patient_group
from xrwatch_training.splits import make_splits

# The one real image with no patient anywhere: a Normal image named by UUID, not in the table.
_UNMAPPED = "F051E018-DAD1-4506-AD43-BE4CA29E960B.jpeg"


def _collection_patients(shared_xray: Path) -> dict[str, str]:
    path = shared_xray / "coronahack" / "covid_collection_patients.csv"
    with path.open(newline="", encoding="utf-8") as fh:
        return {r["X_ray_image_name"]: r["patientid"] for r in csv.DictReader(fh)}


def _independent_patient(name: str, dataset_type: str, collection: dict[str, str]) -> str:
    """The patient of one CoronaHack row, by splitting the name on '_' and '-'."""
    if name in collection:
        return "collection " + collection[name]
    base = name.rsplit(".", 1)[0]
    first = base.split("_")[0]
    if first.startswith("person") and first[6:].isdigit():
        return f"{dataset_type} kermany {first}"
    parts = base.split("-")
    if parts[0] == "NORMAL2" and parts[1] == "IM":  # NORMAL2-IM-0406-0001[-0002]
        return f"{dataset_type} normal2 {int(parts[2])}"
    if parts[0] == "IM":  # IM-0439-0001[-0002]
        return f"{dataset_type} normal {int(parts[1])}"
    assert name == _UNMAPPED, name
    return "image " + name


def _real_rows(shared_xray: Path) -> dict[str, str]:
    csv_path = shared_xray / "coronahack" / "Chest_xray_Corona_Metadata.csv"
    with csv_path.open(newline="", encoding="utf-8") as fh:
        return {r["X_ray_image_name"]: r["Dataset_type"] for r in csv.DictReader(fh)}


@pytest.mark.parametrize("mode", ["patient", "official"])
def test_no_patient_in_two_splits_on_the_real_metadata(shared_xray: Path, mode: str) -> None:
    collection = _collection_patients(shared_xray)
    rows = _real_rows(shared_xray)
    index = index_dataset(shared_xray / "coronahack", "multiclass")
    assert index.patients_csv == shared_xray / "coronahack" / "covid_collection_patients.csv"
    # every image has a patient but one, and a warning names it
    assert len(index.warnings) == 1 and index.warnings[0].startswith("1 image(s) (Normal)")
    for seed in range(5):
        splits = make_splits(index, mode, val_fraction=0.1, test_fraction=0.15, seed=seed)
        where: dict[str, set[str]] = defaultdict(set)
        for name, part in splits.by_name().items():
            for s in part:
                where[_independent_patient(s.path.name, rows[s.path.name], collection)].add(name)
        shared = {p: sorted(n) for p, n in where.items() if len(n) > 1}
        assert not shared, f"seed {seed}: {len(shared)} patients in two splits, e.g. " + str(
            list(shared.items())[:5]
        )
        assert splits.shared_patients() == []


def test_three_part_and_normal2_names_group_with_their_patient() -> None:
    assert patient_group(Path("IM-0439-0001-0002.jpeg")) == patient_group(Path("IM-0439-0001.jpeg"))
    assert patient_group(Path("NORMAL2-IM-0395-0001-0002.jpeg")) == "NORMAL2-IM-0395"
    assert patient_group(Path("IM-0437-0001-0001.jpeg")) != patient_group(
        Path("IM-0439-0001-0001.jpeg")
    )
    # Kermany numbers its train and test patients separately
    assert patient_group(Path("person1_virus_1.jpeg"), source_split="TRAIN") != patient_group(
        Path("person1_virus_1.jpeg"), source_split="TEST"
    )


def test_collection_images_are_grouped_by_their_source_patient(shared_xray: Path) -> None:
    collection = _collection_patients(shared_xray)
    index = index_dataset(shared_xray / "coronahack", "multiclass")
    groups = {s.path.name: s.group for s in index.samples if s.path.name in collection}
    assert len(groups) == 67  # 69 mapped, less the 2 ARDS images left out
    by_patient: dict[str, set[str]] = defaultdict(set)
    for name, group in groups.items():
        by_patient[collection[name]].add(group)
    assert all(len(g) == 1 for g in by_patient.values())
    assert len({g for gs in by_patient.values() for g in gs}) == len(by_patient)


def _copy_metadata(shared_xray: Path, where: Path) -> Path:
    where.mkdir(parents=True)
    shutil.copy(shared_xray / "coronahack" / "Chest_xray_Corona_Metadata.csv", where)
    return where


def test_without_the_patients_table_a_warning_says_images_are_split_per_image(
    shared_xray: Path, tmp_path: Path
) -> None:
    data = _copy_metadata(shared_xray, tmp_path / "alone" / "data")
    index = index_dataset(data, "multiclass")
    assert index.patients_csv is None
    assert len(index.warnings) == 1 and "68 image(s)" in index.warnings[0]  # 67 mapped + 1 unmapped
    assert "--patients" in index.warnings[0]
    splits = make_splits(index, "patient", val_fraction=0.1, test_fraction=0.15, seed=0)
    assert index.warnings[0] in splits.warnings


def test_patients_option_and_a_table_beside_the_dataset(shared_xray: Path, tmp_path: Path) -> None:
    table = shared_xray / "coronahack" / "covid_collection_patients.csv"
    data = _copy_metadata(shared_xray, tmp_path / "a" / "subset")
    assert index_dataset(data, "multiclass", patients=table).patients_csv == table
    # a sibling folder holding the table, as ../coronahack is for ../coronahack-subset
    (tmp_path / "a" / "coronahack").mkdir()
    shutil.copy(table, tmp_path / "a" / "coronahack")
    index = index_dataset(data, "multiclass")
    assert index.patients_csv == tmp_path / "a" / "coronahack" / table.name
    assert [w[:19] for w in index.warnings] == ["1 image(s) (Normal)"]
    with pytest.raises(DatasetError, match="not found"):
        index_dataset(data, "multiclass", patients=tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,patient\nx.jpg,1\n")
    with pytest.raises(DatasetError, match="patientid"):
        index_dataset(data, "multiclass", patients=bad)


def test_the_subset_finds_the_table_beside_it(shared_xray: Path) -> None:
    index = index_dataset(shared_xray / "coronahack-subset", "multiclass")
    assert index.patients_csv == shared_xray / "coronahack" / "covid_collection_patients.csv"
    assert not index.warnings
    splits = make_splits(index, "patient", val_fraction=0.1, test_fraction=0.15, seed=0)
    assert splits.shared_patients() == []


def test_dataset_command_reports_patients_per_split(shared_xray: Path) -> None:
    code = (
        "from xrwatch.cli import main\n"
        f"raise SystemExit(main(['dataset', {str(shared_xray / 'coronahack')!r}, '--json', "
        "'--split', 'patient']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["shared_patients"] == 0
    assert set(report["patients"]) == {"train", "val", "test"}
    assert all(n > 0 for n in report["patients"].values())
    assert report["patients_csv"].endswith("covid_collection_patients.csv")
    text = subprocess.run(
        [sys.executable, "-c", code.replace("'--json', ", "")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "no patient is in two splits" in text.stdout, text.stdout
