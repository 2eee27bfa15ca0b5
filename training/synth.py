"""A synthetic dataset in the CoronaHack layout, for tests, demos and benchmarks. Torch-free.

``write_synthetic(out, scale=1.0)`` writes ``Chest_xray_Corona_Metadata.csv`` and
``train/``/``test/`` JPEGs with the real dataset's row types in the real proportions (scale
1.0 = the real 5,910 images) and Kermany-style file names (``personN_bacteria_K.jpeg``,
``IM-NNNN-0001.jpeg``), so splits group patients exactly as on the real data. The other
images (journal-figure names, as COVID-19's are) get their patient from
``covid_collection_patients.csv``, written beside the metadata as the real dataset has one.

Each image is a chest-like phantom (two dark lung fields, a bright mediastinum, noise and a
random exposure) carrying a class-dependent pattern that survives flips and rotations:

* Normal — nothing more;
* Bacteria — one bright, dense blob in one lung (lobar consolidation);
* Virus — fine bilateral streaks across both lungs (interstitial pattern);
* COVID-19 — bright bilateral patches at the lungs' periphery (ground glass).

It says nothing about real X-rays: it only proves the plumbing learns.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .data import PATIENTS_CSV

logger = logging.getLogger(__name__)

# (Dataset_type, Label, Label_1_Virus_category, Label_2_Virus_category, count): the real CSV.
REAL_ROWS: tuple[tuple[str, str, str, str, int], ...] = (
    ("TRAIN", "Normal", "", "", 1342),
    ("TRAIN", "Pnemonia", "bacteria", "", 2530),
    ("TRAIN", "Pnemonia", "bacteria", "Streptococcus", 5),
    ("TRAIN", "Pnemonia", "Virus", "", 1345),
    ("TRAIN", "Pnemonia", "Virus", "COVID-19", 58),
    ("TRAIN", "Pnemonia", "Virus", "SARS", 4),
    ("TRAIN", "Pnemonia", "Stress-Smoking", "ARDS", 2),
    ("TEST", "Normal", "", "", 234),
    ("TEST", "Pnemonia", "bacteria", "", 242),
    ("TEST", "Pnemonia", "Virus", "", 148),
)
REAL_TOTAL = sum(r[-1] for r in REAL_ROWS)  # 5910


def _phantom(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A chest-like image in [0, 1], plus the coordinate grids (y, x in [-1, 1])."""
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j].astype(np.float32)
    img = 0.55 + 0.1 * rng.standard_normal() * 0.3 + 0.15 * (np.abs(x) > 0.85)
    for side in (-1, 1):
        cx = side * (0.42 + 0.04 * rng.standard_normal())
        lung = ((x - cx) / 0.3) ** 2 + ((y + 0.05) / 0.62) ** 2 < 1
        img = np.where(lung, img - 0.3, img)
    return img.astype(np.float32), y, x


def _bacteria(img: np.ndarray, y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> None:
    side = rng.choice([-1, 1])
    cx, cy = side * rng.uniform(0.3, 0.55), rng.uniform(-0.3, 0.4)
    r = rng.uniform(0.14, 0.22)
    img += 0.45 * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)))


def _virus(img: np.ndarray, y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> None:
    freq, phase = rng.uniform(9, 13), rng.uniform(0, 2 * np.pi)
    lungs = np.exp(-((np.abs(x) - 0.42) ** 2) / 0.05 - (y / 0.7) ** 4)
    img += 0.22 * lungs * (0.5 + 0.5 * np.sin(freq * np.pi * (x + y) + phase))


def _covid(img: np.ndarray, y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> None:
    for side in (-1, 1):
        cy = rng.uniform(-0.2, 0.4)
        img += 0.35 * np.exp(-(((x - side * 0.7) ** 2) / 0.01 + ((y - cy) ** 2) / 0.08))


Pattern = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], None]
_PATTERNS: dict[str, Pattern | None] = {
    "Normal": None,
    "Bacteria": _bacteria,
    "Virus": _virus,
    "COVID-19": _covid,
}


def synth_image(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic image of class ``kind`` as uint8 (size x size)."""
    img, y, x = _phantom(rng, size)
    pattern = _PATTERNS[kind]
    if pattern is not None:
        pattern(img, y, x, rng)
    img += 0.04 * rng.standard_normal(img.shape).astype(np.float32)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _pattern_of(label1: str, label2: str, label: str) -> str:
    if label == "Normal":
        return "Normal"
    if label2 == "COVID-19":
        return "COVID-19"
    if label1 == "bacteria":
        return "Bacteria"
    return "Virus"  # Virus, SARS; ARDS images look viral here (they are left out anyway)


def write_synthetic(
    out: str | Path, *, scale: float = 1.0, image_size: int = 256, seed: int = 0
) -> dict[str, int]:
    """Write a synthetic CoronaHack dataset to ``out``; returns the image count per split."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if not 16 <= image_size <= 4096:
        raise ValueError(f"image_size must be in 16..4096, got {image_size}")
    root = Path(out)
    rng = np.random.default_rng(seed)
    rows: list[list[str]] = []
    patients: list[list[str]] = []  # the names that carry no patient id
    person, normal_id, other_id = 1, 1, 1
    counts: dict[str, int] = {"TRAIN": 0, "TEST": 0}
    for split, label, label1, label2, real_count in REAL_ROWS:
        n = max(2, round(real_count * scale))
        folder = root / split.lower()
        folder.mkdir(parents=True, exist_ok=True)
        kind = _pattern_of(label1, label2, label)
        k = 0
        while k < n:
            per_patient = int(rng.integers(1, 4))  # 1-3 images per patient, as in Kermany
            for _ in range(min(per_patient, n - k)):
                if label == "Normal":
                    name = f"IM-{normal_id:04d}-{k % 3 + 1:04d}.jpeg"
                elif label2 in ("", "Streptococcus") and label1 in ("bacteria", "Virus"):
                    tag = "bacteria" if label1 == "bacteria" else "virus"
                    name = f"person{person}_{tag}_{other_id}.jpeg"
                else:  # COVID-19, SARS, ARDS: journal-figure style names, one series each
                    name = f"{label2.lower()}-p{person}x-fig{k % 3 + 1}-day{other_id}.jpeg"
                    patients.append([name, f"synth-{person}"])
                other_id += 1
                k += 1
                pixels = synth_image(kind, image_size, rng)
                Image.fromarray(pixels, mode="L").save(folder / name, quality=92)
                rows.append([name, label, split, label2, label1])
            person += 1
            normal_id += 1
        counts[split] += n
    with (root / "Chest_xray_Corona_Metadata.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["", "X_ray_image_name", "Label", "Dataset_type", "Label_2_Virus_category",
             "Label_1_Virus_category"]
        )  # fmt: skip
        for i, row in enumerate(rows):
            w.writerow([i, *row])
    with (root / PATIENTS_CSV).open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["X_ray_image_name", "patientid"], *patients])
    logger.info("wrote %d synthetic images to %s", len(rows), root)
    return counts
