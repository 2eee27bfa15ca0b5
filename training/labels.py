"""Tasks and the mapping from the CoronaHack metadata (or folder names) to class labels.

``multiclass``: Normal, Bacteria, Virus, COVID-19.
``binary``: Bacteria vs Virus (COVID-19 and SARS count as Virus; Normal is left out).

CoronaHack's metadata has three label columns: ``Label`` (``Normal`` or ``Pnemonia``, sic),
``Label_1_Virus_category`` (``bacteria``, ``Virus``, ``Stress-Smoking``) and
``Label_2_Virus_category`` (``COVID-19``, ``SARS``, ``Streptococcus``, ``ARDS``). Mapping:

* Streptococcus is a bacterium → Bacteria.
* SARS is a coronavirus but not SARS-CoV-2 → Virus.
* COVID-19 → COVID-19 (multiclass) or Virus (binary).
* Stress-Smoking/ARDS (2 images) is neither infection class → left out, with a note.

Torch-free.
"""

from __future__ import annotations

import logging
from typing import Literal

logger = logging.getLogger(__name__)

Task = Literal["multiclass", "binary"]
TASKS: tuple[Task, ...] = ("multiclass", "binary")
TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "multiclass": ("Normal", "Bacteria", "Virus", "COVID-19"),
    "binary": ("Bacteria", "Virus"),
}
# Why an image is left out, by its fine label; shown by ``xrwatch dataset`` and the run log.
EXCLUSION_NOTES: dict[str, str] = {
    "ARDS": "Stress-Smoking/ARDS is neither an infection class of the study; left out",
    "Normal": "the binary task is Bacteria vs Virus; Normal images are left out",
}

# Folder names a hospital might use, normalised (lower case, no separators) → fine label.
_FOLDER_ALIASES = {
    "normal": "Normal",
    "bacteria": "Bacteria",
    "bacterial": "Bacteria",
    "streptococcus": "Bacteria",
    "virus": "Virus",
    "viral": "Virus",
    "sars": "SARS",
    "covid19": "COVID-19",
    "covid": "COVID-19",
    "ards": "ARDS",
}


def fine_label(label: str, label1: str, label2: str) -> str | None:
    """The fine label of one CoronaHack metadata row (``None`` if unrecognised)."""
    label, label1, label2 = label.strip(), label1.strip(), label2.strip()
    if label == "Normal":
        return "Normal"
    if label2 == "COVID-19":
        return "COVID-19"
    if label2 == "SARS":
        return "SARS"
    if label2 == "ARDS" or label1 == "Stress-Smoking":
        return "ARDS"
    if label1.lower() == "bacteria":
        return "Bacteria"  # includes Label_2 Streptococcus
    if label1.lower() == "virus":
        return "Virus"
    return None


def folder_label(name: str) -> str | None:
    """The fine label a class folder's name stands for (``None`` if it is not a class)."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    return _FOLDER_ALIASES.get(key)


def task_label(fine: str, task: str) -> str | None:
    """Map a fine label to the task's class, or ``None`` when the task leaves it out."""
    if task not in TASK_CLASSES:
        raise ValueError(f"Invalid task {task!r}. Only {', '.join(TASKS)} are supported.")
    if fine == "ARDS":
        return None
    if fine == "SARS":
        return "Virus"
    if task == "multiclass":
        return fine if fine in TASK_CLASSES["multiclass"] else None
    if fine == "COVID-19":
        return "Virus"
    return fine if fine in ("Bacteria", "Virus") else None
