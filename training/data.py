"""Indexing training data: the CoronaHack layout and a folder per class. Torch-free.

Two layouts are read:

* **CoronaHack** (Kaggle): ``Chest_xray_Corona_Metadata.csv`` plus images under ``train/``
  and ``test/``, either flat in DATA_DIR or nested as Kaggle ships it
  (``Coronahack-Chest-XRay-Dataset/Coronahack-Chest-XRay-Dataset/{train,test}``).
* **A folder per class**: ``DATA/<Class>/**/*.{dcm,png,jpg,jpeg}`` (a hospital's own data);
  optionally ``DATA/train/<Class>`` and ``DATA/test/<Class>`` for a fixed test set.

Indexing only reads the CSV and lists files; the images are decoded later, once, by
:mod:`training.cache`, which also lists the files that are missing or unreadable.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from training.labels import TASK_CLASSES, fine_label, folder_label, task_label
from xrwatch.errors import DatasetError
from xrwatch.inputs import expand_inputs

logger = logging.getLogger(__name__)

METADATA_CSV = "Chest_xray_Corona_Metadata.csv"
KAGGLE_DIR = "Coronahack-Chest-XRay-Dataset"
IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg"}
_CSV_COLUMNS = ("X_ray_image_name", "Label", "Dataset_type", "Label_1_Virus_category")


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``source_split`` is the dataset's own split (TRAIN/TEST) or None."""

    path: Path
    label: str  # the task's class
    fine: str  # the fine label (Normal, Bacteria, Virus, COVID-19, SARS ...)
    group: str  # patient (or image series) identifier: never split across train/val/test
    source_split: str | None = None


@dataclass
class DatasetIndex:
    """The labelled samples of one dataset for one task, and what was left out and why."""

    kind: str  # "coronahack" or "folders"
    root: Path
    task: str
    classes: tuple[str, ...]
    samples: list[Sample]
    excluded: Counter[str] = field(default_factory=Counter)  # reason -> count
    images_root: Path | None = None

    def counts(self, split: str | None = None) -> dict[str, int]:
        """Class counts (every class present, zeros included), optionally of one source split."""
        c = Counter(s.label for s in self.samples if split is None or s.source_split == split)
        return {name: c.get(name, 0) for name in self.classes}


_KERMANY = re.compile(r"^(person\d+)_", re.IGNORECASE)
_KERMANY_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+$", re.IGNORECASE)
# Trailing tokens that number images of one series: day3, Fig9c, -a, -b2, -003, lrg, g001 ...
_SERIES_TOKEN = re.compile(r"[-_](day\d+|fig\w*|[a-z]\d*|\d{1,4}|g\d+\w*|gr\d+|lrg)$", re.I)


def image_files(folder: Path) -> list[Path]:
    """The images under ``folder`` (recursively, sorted), by suffix; names every part of
    xrwatch ignores (hidden, e.g. macOS ``._name.jpg``; temporary; DICOMDIR) are skipped."""
    return [p for p in expand_inputs([folder]) if p.suffix.lower() in IMAGE_SUFFIXES]


def patient_group(path: Path, class_dir: Path | None = None) -> str:
    """A patient (or image-series) key, so that no patient ends up in two splits.

    Kermany names carry ``personN``; Normal images are ``[NORMAL2-]IM-NNNN-MMMM`` (one
    patient per ``IM-NNNN``). Other names (COVID-19 figures, SARS series) share a stem
    once series numbering (``-day3``, ``-a``, ``-b2``, ``-Fig9c``) is stripped: a deliberately
    conservative rule, since grouping too much only costs balance, never leaks. In a folder
    per class, a sub-folder under the class folder is taken as the patient.
    """
    if class_dir is not None:
        rel = path.relative_to(class_dir)
        if len(rel.parts) > 1:
            return f"{class_dir.name}/{rel.parts[0]}"
    stem = path.stem
    if m := _KERMANY.match(stem):
        return m.group(1).lower()
    if m := _KERMANY_NORMAL.match(stem):
        return m.group(1).upper()
    while (m := _SERIES_TOKEN.search(stem)) and m.start() > 0:
        stem = stem[: m.start()]
    return stem.lower()


def find_metadata(root: Path) -> Path | None:
    """The CoronaHack metadata CSV in ``root`` or up to three folders below, if any."""
    for depth in range(4):
        hits = sorted(root.glob("/".join(["*"] * depth + [METADATA_CSV])))
        if hits:
            return hits[0]
    return None


def find_images_root(root: Path, csv_path: Path) -> Path | None:
    """The folder holding ``train/`` and ``test/`` (flat or Kaggle-nested), if any."""
    candidates = [
        csv_path.parent,
        root,
        root / KAGGLE_DIR,
        root / KAGGLE_DIR / KAGGLE_DIR,
        csv_path.parent / KAGGLE_DIR,
        csv_path.parent / KAGGLE_DIR / KAGGLE_DIR,
    ]
    for cand in candidates:
        if (cand / "train").is_dir() or (cand / "test").is_dir():
            return cand
    return None


def index_coronahack(root: Path, task: str, csv_path: Path | None = None) -> DatasetIndex:
    """Index the CoronaHack layout (see the module docstring)."""
    csv_path = csv_path or find_metadata(root)
    if csv_path is None:
        raise DatasetError(f"{root}: no {METADATA_CSV} found (looked up to three folders deep)")
    images_root = find_images_root(root, csv_path)
    if images_root is None:
        logger.warning(
            "%s: no train/ or test/ image folder found beside the metadata (flat or under %s/%s); "
            "every image will be reported missing",
            root,
            KAGGLE_DIR,
            KAGGLE_DIR,
        )
    base = images_root or csv_path.parent
    samples: list[Sample] = []
    excluded: Counter[str] = Counter()
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in _CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(
                    f"{csv_path}: metadata lacks column(s) {missing}; found {reader.fieldnames}"
                )
            for line, row in enumerate(reader, start=2):
                fine = fine_label(
                    row["Label"],
                    row["Label_1_Virus_category"] or "",
                    row.get("Label_2_Virus_category") or "",
                )
                if fine is None:
                    raise DatasetError(f"{csv_path}:{line}: unrecognised labels {dict(row)}")
                label = task_label(fine, task)
                if label is None:
                    excluded[_exclusion_reason(fine, task)] += 1
                    continue
                split = row["Dataset_type"].strip().upper()
                if split not in ("TRAIN", "TEST"):
                    raise DatasetError(
                        f"{csv_path}:{line}: Dataset_type {split!r} is not TRAIN/TEST"
                    )
                path = base / split.lower() / row["X_ray_image_name"]
                samples.append(Sample(path, label, fine, patient_group(path), split))
    except OSError as exc:
        raise DatasetError(f"{csv_path}: cannot read metadata: {exc}") from exc
    return DatasetIndex(
        "coronahack", root, task, TASK_CLASSES[task], samples, excluded, images_root
    )


def _exclusion_reason(fine: str, task: str) -> str:
    if fine == "ARDS":
        return "Stress-Smoking/ARDS: not an infection class of the study"
    return f"{fine}: not a class of the {task} task"


def _class_dirs(root: Path) -> list[tuple[Path, str]]:
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        fine = folder_label(d.name)
        if fine is not None:
            out.append((d, fine))
    return out


def index_folders(root: Path, task: str) -> DatasetIndex:
    """Index ``DATA/<Class>/**`` (or ``DATA/{train,test}/<Class>/**``)."""
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    parts: list[tuple[str | None, Path]] = []
    if (root / "train").is_dir() and _class_dirs(root / "train"):
        parts.append(("TRAIN", root / "train"))
        if (root / "test").is_dir():
            parts.append(("TEST", root / "test"))
    else:
        parts.append((None, root))
    samples: list[Sample] = []
    excluded: Counter[str] = Counter()
    for split, base in parts:
        dirs = _class_dirs(base)
        if not dirs:
            raise DatasetError(
                f"{base}: no class folders found; expected sub-folders named after the classes "
                f"{list(TASK_CLASSES[task])} (or Streptococcus, SARS, ARDS), or a CoronaHack "
                f"{METADATA_CSV}"
            )
        for class_dir, fine in dirs:
            label = task_label(fine, task)
            files = image_files(class_dir)
            if label is None:
                excluded[_exclusion_reason(fine, task)] += len(files)
                continue
            samples += [Sample(p, label, fine, patient_group(p, class_dir), split) for p in files]
    return DatasetIndex("folders", root, task, TASK_CLASSES[task], samples, excluded, root)


def index_dataset(root: str | Path, task: str) -> DatasetIndex:
    """Index ``root``: CoronaHack when its metadata CSV is there, else a folder per class."""
    r = Path(root)
    if not r.exists():
        raise DatasetError(f"{r}: data folder not found")
    csv_path = find_metadata(r) if r.is_dir() else (r if r.name == METADATA_CSV else None)
    if csv_path is not None:
        return index_coronahack(r if r.is_dir() else r.parent, task, csv_path)
    return index_folders(r, task)


def extra_samples(spec: str, task: str) -> list[Sample]:
    """Samples of ``--extra DIR:LABEL``: every image under DIR, of class LABEL, for TRAIN."""
    directory, sep, label_name = spec.rpartition(":")
    if not sep or not directory:
        raise DatasetError(f"--extra {spec!r}: expected DIR:LABEL, e.g. extra_covid:COVID-19")
    fine = folder_label(label_name)
    label = task_label(fine, task) if fine else None
    if label is None:
        raise DatasetError(
            f"--extra {spec!r}: {label_name!r} is not a class of the {task} task "
            f"({', '.join(TASK_CLASSES[task])})"
        )
    d = Path(directory)
    if not d.is_dir():
        raise DatasetError(f"--extra {spec!r}: folder {d} not found")
    files = image_files(d)
    if not files:
        raise DatasetError(f"--extra {spec!r}: no .dcm/.png/.jpg/.jpeg files under {d}")
    return [Sample(p, label, fine or label, "extra:" + patient_group(p, d), "TRAIN") for p in files]
