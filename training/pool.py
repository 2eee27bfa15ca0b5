"""The packaged default's data: a paediatric pool, an adult set, and what is held out.

Torch-free (indexing only lists files and reads manifests). Layout of the shared data
(``../shared/data/xray``, see its README):

* **paediatric pool** (training, epoch selection, calibration, an internal test): the
  Kermany images (Normal, Bacteria, Virus - never COVID-19) of ``coronahack-subset``'s
  CoronaHack TRAIN split plus ``kermany/TRAIN``;
* **adult set**: ``adult/`` (807 adult, frontal, non-COVID films), the second population the
  gate output learns to recognise;
* **held out for reporting only** (never tuned on): ``kermany/TEST`` (with the 17 official
  TEST Virus images of ``coronahack-subset``) and the Kermany classes of ``real/``.

Patients come from the manifests (``patient_id``) or, for CoronaHack names, from
:func:`training.data.kermany_patient`; Kermany numbers its TRAIN and TEST patients
separately, so a group is ``<split>:<patient>``. Every split is patient-grouped and
stratified by class (:func:`training.splits.carve`). ``squashed`` marks the 3,053 Kermany
images a source had already resized to 224 x 224 without keeping the aspect ratio: every
input is resized to a square (``PreprocessSpec.aspect = "stretch"``), so that geometry is
not a paediatric-only trait, and figures are reported for both kinds separately.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xrwatch.errors import DatasetError

from .data import Sample, kermany_patient
from .splits import carve

logger = logging.getLogger(__name__)

DIAGNOSES = ("Normal", "Bacteria", "Virus")  # the default's classes
ADULT = "Adult"  # the population output's class (a unit of the head, not a diagnosis)
POPULATION = (
    "children aged 1-5, frontal (AP) chest radiographs (Kermany et al. 2018, Guangzhou "
    "Women and Children's Medical Center)"
)
SUBSET_DIR = "coronahack-subset"
SUBSET_IMAGES = "Coronahack-Chest-XRay-Dataset/Coronahack-Chest-XRay-Dataset"
SQUASHED_SIZE = "224x224"

# fractions of the paediatric pool / of the adult set, each patient-grouped and stratified
PAEDIATRIC_FRACTIONS = {"test": 0.10, "calib": 0.08, "select": 0.08}
ADULT_FRACTIONS = {"test": 0.20, "calib": 0.10, "select": 0.10}
SPLIT_NAMES = ("train", "select", "calib", "test")


@dataclass(frozen=True)
class PoolImage:
    """One image: ``label`` is a diagnosis, or ``ADULT`` for the adult set's films."""

    path: Path
    label: str
    group: str  # patient: never in two splits
    population: str  # "paediatric" or "adult"
    source: str  # "coronahack-subset", "kermany", "adult", "real"
    squashed: bool = False  # stored from a 224 x 224 copy squashed by its source
    fine: str = ""  # the source's finding (adult: Normal, Other, Bacteria, Virus)


@dataclass
class DefaultData:
    """The pool's patient-grouped splits and the held-out sets, by name."""

    splits: dict[str, list[PoolImage]]  # train, select, calib, test (both populations)
    heldout: dict[str, list[PoolImage]]  # kermany-test, real-kermany
    notes: list[str] = field(default_factory=list)

    def part(self, split: str, population: str | None = None) -> list[PoolImage]:
        return [i for i in self.splits[split] if population in (None, i.population)]


def _read_manifest(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found (see ../shared/data/xray/README.md)")
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def subset_images(root: Path, split: str) -> list[PoolImage]:
    """``coronahack-subset``'s Kermany images of CoronaHack ``split`` (TRAIN/TEST)."""
    folder = root / SUBSET_DIR
    out = []
    for row in _read_manifest(folder / "MANIFEST.csv"):
        if row["coronahack_split"] != split or row["label"] not in DIAGNOSES:
            continue
        path = folder / row["relpath"]
        patient = kermany_patient(path.name)
        if patient is None:
            raise DatasetError(f"{path}: a Kermany image without a patient in its name")
        out.append(PoolImage(path, row["label"], f"{split}:{patient}", "paediatric",
                             "coronahack-subset", fine=row["label"]))  # fmt: skip
    return out


def kermany_images(root: Path, split: str) -> list[PoolImage]:
    """``kermany/<split>`` with patients and the squashed flag from its manifest."""
    out = []
    for row in _read_manifest(root / "kermany" / "MANIFEST.csv"):
        if row["split"] != split or row["label"] not in DIAGNOSES:
            continue
        out.append(PoolImage(
            root / row["relpath"], row["label"], f"{split}:{row['patient_id']}", "paediatric",
            "kermany", squashed=row["stored_size"] == SQUASHED_SIZE, fine=row["label"],
        ))  # fmt: skip
    return out


def adult_images(root: Path) -> list[PoolImage]:
    """Every film of ``adult/`` (label ``ADULT``; ``fine`` keeps the source's class)."""
    return [
        PoolImage(
            root / row["relpath"],
            ADULT,
            f"adult:{row['patient_id']}",
            "adult",
            "adult",
            fine=row["label"],
        )
        for row in _read_manifest(root / "adult" / "MANIFEST.csv")
    ]


def real_kermany(root: Path) -> list[PoolImage]:
    """The Kermany classes of ``real/`` (original resolution), patients from file names."""
    out = []
    for label in DIAGNOSES:
        folder = root / "real" / label
        for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
            patient = kermany_patient(path.name) or path.stem
            out.append(PoolImage(path, label, f"real:{patient}", "paediatric", "real",
                                 fine=label))  # fmt: skip
    return out


def _carve(
    images: list[PoolImage], fractions: dict[str, float], rng: np.random.Generator
) -> dict[str, list[PoolImage]]:
    """Patient-grouped, class-stratified (by ``fine``) carving of each fraction of the
    whole; what is left is ``train``."""
    by_path = {str(i.path): i for i in images}
    rest = [Sample(i.path, i.fine, i.fine, i.group) for i in images]
    total = len(rest)
    out: dict[str, list[PoolImage]] = {}
    for name in ("test", "calib", "select"):
        share = fractions[name] * total / max(len(rest), 1)
        rest, carved = carve(rest, min(share, 0.95), rng)
        out[name] = [by_path[str(s.path)] for s in carved]
    out["train"] = [by_path[str(s.path)] for s in rest]
    return out


def build_default_data(root: str | Path, seed: int = 0) -> DefaultData:
    """Index the shared data and split the pool (same ``seed`` → same splits)."""
    root = Path(root)
    paediatric = subset_images(root, "TRAIN") + kermany_images(root, "TRAIN")
    adults = adult_images(root)
    check_unique(paediatric + adults)
    rng = np.random.default_rng(seed)
    ped = _carve(paediatric, PAEDIATRIC_FRACTIONS, rng)
    adult = _carve(adults, ADULT_FRACTIONS, rng)
    splits = {name: ped[name] + adult[name] for name in SPLIT_NAMES}
    heldout = {
        "kermany-test": kermany_images(root, "TEST") + subset_images(root, "TEST"),
        "real-kermany": real_kermany(root),
    }
    check_disjoint({**splits, **heldout})
    notes = [f"{name}: {describe(images)}" for name, images in {**splits, **heldout}.items()]
    return DefaultData(splits, heldout, notes)


def describe(images: Iterable[PoolImage]) -> str:
    images = list(images)
    counts = Counter(i.label for i in images)
    squashed = sum(i.squashed for i in images)
    patients = len({i.group for i in images})
    return (
        f"{len(images)} images ({patients} patients; "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; {squashed} squashed)"
    )


def check_unique(images: list[PoolImage]) -> None:
    seen = Counter(str(i.path) for i in images)
    twice = [p for p, n in seen.items() if n > 1]
    if twice:
        raise DatasetError(f"{twice[0]}: listed twice in the pool ({len(twice)} such files)")


def check_disjoint(parts: dict[str, list[PoolImage]]) -> None:
    """No patient in two parts (raises :class:`DatasetError` naming one)."""
    where: dict[str, str] = {}
    for name, images in parts.items():
        for i in images:
            other = where.setdefault(i.group, name)
            if other != name:
                raise DatasetError(f"patient {i.group} is in both {other} and {name} ({i.path})")


SPLIT_COLUMNS = ("path", "label", "group", "population", "source", "squashed", "fine_label")


def write_list(images: list[PoolImage], path: Path) -> None:
    """A split file readable by ``xrwatch evaluate`` and export (path, label, group ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(SPLIT_COLUMNS)
        for i in images:
            w.writerow([str(i.path), i.label, i.group, i.population, i.source,
                        int(i.squashed), i.fine])  # fmt: skip


def read_list(path: Path) -> list[PoolImage]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [
            PoolImage(
                Path(r["path"]),
                r["label"],
                r["group"],
                r["population"],
                r["source"],
                r["squashed"] == "1",
                r["fine_label"],
            )
            for r in csv.DictReader(fh)
        ]


def write_split_files(data: DefaultData, run_dir: Path) -> None:
    """``RUN/splits``: ``train``/``val``/``test.csv`` as export reads them (paediatric
    train, **calibration** and internal test: the temperature and the guard are fitted on
    data that did not choose the epoch), ``select.csv`` (the epoch choice), and each split's
    adult films and the held-out sets under their own names."""
    out = run_dir / "splits"
    write_list(data.part("train", "paediatric"), out / "train.csv")
    write_list(data.part("calib", "paediatric"), out / "val.csv")
    write_list(data.part("test", "paediatric"), out / "test.csv")
    write_list(data.part("select", "paediatric"), out / "select.csv")
    for name in SPLIT_NAMES:
        write_list(data.part(name, "adult"), out / f"adult-{name}.csv")
    for name, images in data.heldout.items():
        write_list(images, out / f"heldout-{name}.csv")
