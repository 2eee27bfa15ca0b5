"""Indexing training data: the CoronaHack layout and a folder per class. Torch-free.

Two layouts are read:

* **CoronaHack** (Kaggle): ``Chest_xray_Corona_Metadata.csv`` plus images under ``train/``
  and ``test/``, either flat in DATA_DIR or nested as Kaggle ships it
  (``Coronahack-Chest-XRay-Dataset/Coronahack-Chest-XRay-Dataset/{train,test}``).
* **A folder per class**: ``DATA/<Class>/**/*.{dcm,png,jpg,jpeg}`` (a hospital's own data);
  optionally ``DATA/train/<Class>`` and ``DATA/test/<Class>`` for a fixed test set.

Patients: Kermany file names carry the patient (``personN_…``, ``[NORMAL2-]IM-NNNN-…``), numbered
separately in Kermany's train and test folders, so the id is qualified by the CoronaHack split
(``TRAIN:person1``). The other CoronaHack images (COVID-19, SARS, ARDS, Streptococcus; many
named by UUID) carry none: ``covid_collection_patients.csv`` (file name → ``patientid`` of the
COVID-19 image data collection) gives it. It is read from ``--patients CSV`` or, when that is
not given, found beside the metadata, in DATA_DIR or in a folder beside DATA_DIR (so the
``coronahack-subset`` finds the one in ``coronahack/``). Without it those images are grouped by
file-name stem only, i.e. mostly split per image, and a warning says so.

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

from xrwatch.errors import DatasetError
from xrwatch.inputs import expand_inputs

from .labels import TASK_CLASSES, fine_label, folder_label, task_label

logger = logging.getLogger(__name__)

METADATA_CSV = "Chest_xray_Corona_Metadata.csv"
PATIENTS_CSV = "covid_collection_patients.csv"
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
    patients_csv: Path | None = None  # the file-name → patient table used, if any
    warnings: list[str] = field(default_factory=list)

    def counts(self, split: str | None = None) -> dict[str, int]:
        """Class counts (every class present, zeros included), optionally of one source split."""
        c = Counter(s.label for s in self.samples if split is None or s.source_split == split)
        return {name: c.get(name, 0) for name in self.classes}


_KERMANY = re.compile(r"^(person\d+)_", re.IGNORECASE)
# IM-0439-0001.jpeg and IM-0439-0001-0002.jpeg are both patient IM-0439 (NORMAL2- likewise).
_KERMANY_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)
# Trailing tokens that number images of one series: day3, Fig9c, -a, -b2, -003, lrg, g001 ...
_SERIES_TOKEN = re.compile(r"[-_](day\d+|fig\w*|[a-z]\d*|\d{1,4}|g\d+\w*|gr\d+|lrg)$", re.I)


def image_files(folder: Path) -> list[Path]:
    """The images under ``folder`` (recursively, sorted), by suffix; names every part of
    xrwatch ignores (hidden, e.g. macOS ``._name.jpg``; temporary; DICOMDIR) are skipped."""
    return [p for p in expand_inputs([folder]) if p.suffix.lower() in IMAGE_SUFFIXES]


def kermany_patient(name: str) -> str | None:
    """The patient of a Kermany file name (``person12``, ``IM-0439``, ``NORMAL2-IM-0406``),
    unqualified by split; ``None`` for any other name."""
    stem = Path(name).stem
    if m := _KERMANY.match(stem):
        return m.group(1).lower()
    if m := _KERMANY_NORMAL.match(stem):
        return m.group(1).upper()
    return None


def patient_group(
    path: Path,
    class_dir: Path | None = None,
    *,
    source_split: str | None = None,
    patients: dict[str, str] | None = None,
) -> str:
    """A patient (or image-series) key, so that no patient ends up in two splits.

    In order: the patient ``patients`` (a :func:`read_patients` table) gives the file name;
    in a folder per class, a sub-folder under the class folder; a Kermany name's patient
    (:func:`kermany_patient`), qualified by ``source_split`` since Kermany numbers its train
    and test patients separately. Other names (COVID-19 figures, SARS series) share a stem
    once series numbering (``-day3``, ``-a``, ``-b2``, ``-Fig9c``) is stripped: a deliberately
    conservative rule, since grouping too much only costs balance, never leaks.
    """
    if patients and path.name in patients:
        return patients[path.name]
    if class_dir is not None:
        rel = path.relative_to(class_dir)
        if len(rel.parts) > 1:
            return f"{class_dir.name}/{rel.parts[0]}"
    stem = path.stem
    if (kermany := kermany_patient(path.name)) is not None:
        return f"{source_split}:{kermany}" if source_split else kermany
    while (m := _SERIES_TOKEN.search(stem)) and m.start() > 0:
        stem = stem[: m.start()]
    return stem.lower()


def read_patients(path: Path) -> dict[str, str]:
    """File name → patient key (``collection:<patientid>``) from a table with the columns
    ``X_ray_image_name`` and ``patientid`` (``covid_collection_patients.csv``)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [
                c for c in ("X_ray_image_name", "patientid") if c not in (reader.fieldnames or [])
            ]
            if missing:
                raise DatasetError(
                    f"{path}: patients table lacks column(s) {missing}; found {reader.fieldnames}"
                )
            table: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                name, pid = row["X_ray_image_name"].strip(), row["patientid"].strip()
                if not name or not pid:
                    raise DatasetError(f"{path}:{line}: empty file name or patientid")
                table[name] = f"collection:{pid}"
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read patients table: {exc}") from exc
    return table


def find_patients(root: Path, csv_path: Path | None = None) -> Path | None:
    """``covid_collection_patients.csv`` beside the metadata, in ``root``, beside ``root`` or
    in a folder beside ``root`` (first found), if any."""
    places = [*([csv_path.parent] if csv_path else []), root, root.parent]
    for place in places:
        if (place / PATIENTS_CSV).is_file():
            return place / PATIENTS_CSV
    siblings = sorted(p / PATIENTS_CSV for p in root.parent.iterdir() if p.is_dir() and p != root)
    return next((p for p in siblings if p.is_file()), None)


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


def _patients_table(
    patients: str | Path | None, found: Path | None
) -> tuple[Path | None, dict[str, str]]:
    path: Path | None = found
    if patients:
        path = Path(patients)
        if not path.is_file():
            raise DatasetError(f"--patients {path}: file not found")
    if path is None:
        return None, {}
    table = read_patients(path)
    logger.info("patients of images without one in their names: %s (%d images)", path, len(table))
    return path, table


def _ungrouped_warning(samples: list[Sample], table_path: Path | None, hint: str) -> list[str]:
    """A warning when images have no patient id (not in their name, folder or table)."""
    loose = [
        s
        for s in samples
        if not s.group.startswith("collection:")
        and "/" not in s.group  # a patient sub-folder of a class folder
        and kermany_patient(s.path.name) is None
    ]
    if not loose:
        return []
    fines = ", ".join(sorted({s.fine for s in loose}))
    where = f"are not in {table_path}" if table_path else hint
    return [
        f"{len(loose)} image(s) ({fines}) carry no patient id in their file names and {where}: "
        "they are grouped by file-name stem only, i.e. mostly split per image"
    ]


def index_coronahack(
    root: Path,
    task: str,
    csv_path: Path | None = None,
    *,
    patients: str | Path | None = None,
) -> DatasetIndex:
    """Index the CoronaHack layout (see the module docstring); ``patients``: a file-name →
    patient table (default: ``covid_collection_patients.csv`` found by :func:`find_patients`)."""
    csv_path = csv_path or find_metadata(root)
    if csv_path is None:
        raise DatasetError(f"{root}: no {METADATA_CSV} found (looked up to three folders deep)")
    patients_csv, table = _patients_table(
        patients, None if patients else find_patients(root, csv_path)
    )
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
                group = patient_group(path, source_split=split, patients=table)
                samples.append(Sample(path, label, fine, group, split))
    except OSError as exc:
        raise DatasetError(f"{csv_path}: cannot read metadata: {exc}") from exc
    return DatasetIndex(
        "coronahack", root, task, TASK_CLASSES[task], samples, excluded, images_root,
        patients_csv,
        _ungrouped_warning(
            samples, patients_csv, f"no {PATIENTS_CSV} was found (give one with --patients CSV)"
        ),
    )  # fmt: skip


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


def index_folders(root: Path, task: str, *, patients: str | Path | None = None) -> DatasetIndex:
    """Index ``DATA/<Class>/**`` (or ``DATA/{train,test}/<Class>/**``); ``patients``: an
    optional file-name → patient table (:func:`read_patients`)."""
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    patients_csv, table = _patients_table(patients, None)
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
            samples += [
                Sample(p, label, fine, patient_group(p, class_dir, patients=table), split)
                for p in files
            ]
    return DatasetIndex(
        "folders", root, task, TASK_CLASSES[task], samples, excluded, root,
        patients_csv,
        _ungrouped_warning(
            samples,
            patients_csv,
            "sit directly in their class folder (put each patient's images in a sub-folder, "
            "DATA/<Class>/<patient>/, or give --patients CSV)",
        ),
    )  # fmt: skip


def index_dataset(
    root: str | Path, task: str, *, patients: str | Path | None = None
) -> DatasetIndex:
    """Index ``root``: CoronaHack when its metadata CSV is there, else a folder per class.
    ``patients``: a file-name → patient table (``--patients``; see the module docstring)."""
    r = Path(root)
    if not r.exists():
        raise DatasetError(f"{r}: data folder not found")
    csv_path = find_metadata(r) if r.is_dir() else (r if r.name == METADATA_CSV else None)
    if csv_path is not None:
        return index_coronahack(r if r.is_dir() else r.parent, task, csv_path, patients=patients)
    return index_folders(r, task, patients=patients)


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
