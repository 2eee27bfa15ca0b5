"""A tiny stand-in for ``../shared/data/xray`` with the layout and manifests the default's
pool reads (``coronahack-subset``, ``kermany``, ``adult``, ``real``): small synthetic
phantoms whose brightness pattern depends on the class, so training has something to learn."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

SUBSET = "coronahack-subset/Coronahack-Chest-XRay-Dataset/Coronahack-Chest-XRay-Dataset"
CLASSES = ("Normal", "Bacteria", "Virus")


def _image(path: Path, label: str, rng: np.random.Generator, size: tuple[int, int]) -> None:
    h, w = size
    img = 0.3 + 0.1 * rng.random((h, w))
    if label == "Bacteria":
        img[h // 4 : h // 2, w // 5 : w // 2] += 0.5
    elif label == "Virus":
        img[:, ::4] += 0.4
    elif label == "Adult":
        img[: h // 3] += 0.4
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def _name(label: str, patient: int, k: int) -> tuple[str, str]:
    if label == "Normal":
        return f"IM-{patient:04d}-{k + 1:04d}.jpeg", f"IM-{patient:04d}"
    return f"person{patient}_{label.lower()}_{k}.jpeg", f"person{patient}"


def write_fake_shared(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """Write the fake layout under ``root`` and return it."""
    rng = np.random.default_rng(seed)
    rows_subset, rows_kermany, rows_adult = [], [], []
    patient = 1
    for label in CLASSES:
        for _ in range(per_class):  # two images per patient
            for k in range(2):
                name, pid = _name(label, patient, k)
                rel = f"train/{name}"
                _image(root / SUBSET / rel, label, rng, (40, 48))
                rows_subset.append({"relpath": f"{SUBSET.split('/', 1)[1]}/{rel}", "label": label,
                                    "coronahack_split": "TRAIN"})  # fmt: skip
            patient += 1
        # kermany TRAIN (half squashed) and TEST
        for split in ("TRAIN", "TEST"):
            for i in range(per_class):
                name, pid = _name(label, patient, 0)
                rel = f"kermany/{split}/{label}/{name}"
                squashed = i % 2 == 0
                _image(root / rel, label, rng, (32, 32) if squashed else (40, 52))
                stored = "224x224" if squashed else "52x40"
                rows_kermany.append({"relpath": rel, "label": label, "patient_id": pid,
                                     "split": split, "stored_size": stored})  # fmt: skip
                patient += 1
        for _ in range(3):  # real/
            name, _ = _name(label, patient, 0)
            _image(root / "real" / label / name, label, rng, (44, 50))
            patient += 1
    # a COVID-19 image in the subset: never in the default's pool
    _image(root / SUBSET / "train/covid1.png", "Adult", rng, (40, 40))
    rows_subset.append({"relpath": f"{SUBSET.split('/', 1)[1]}/train/covid1.png",
                        "label": "COVID-19", "coronahack_split": "TRAIN"})  # fmt: skip
    for i in range(per_class * 2):
        rel = f"adult/Normal/nih_{i:05d}.png"
        _image(root / rel, "Adult", rng, (48, 48))
        rows_adult.append({"relpath": rel, "label": "Normal" if i % 3 else "Other",
                           "patient_id": f"nih-{i // 2}", "age": "40"})  # fmt: skip
    for folder, rows in (("coronahack-subset", rows_subset), ("kermany", rows_kermany),
                         ("adult", rows_adult)):  # fmt: skip
        with (root / folder / "MANIFEST.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root
