"""training.presets carries the study's figures as ../shared/STUDY.md states them."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers.tools import require_shared_data
from xrwatch_training.data import index_dataset
from xrwatch_training.presets import (
    CSV_CLASS_TOTALS,
    PAPER_CLASS_TOTALS,
    PUBLISHED,
    PUBLISHED_WITH_EXTRA,
)

STUDY = Path(__file__).resolve().parents[2].parent / "shared" / "STUDY.md"


def _table(text: str, title: str) -> dict[str, dict[str, float]]:
    after = text.split(title, 1)[1].splitlines()[1:]
    lines = []
    for ln in after:
        if not ln.startswith("|"):
            break
        lines.append(ln)
    names = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        key = {"Train": "train", "Validation": "val", "Test": "test"}[cells[0]]
        for n, v in zip(names, cells[1:], strict=True):
            out[n][key] = float(v)
    return out


def test_published_figures_are_the_studys_tables() -> None:
    text = require_shared_data(STUDY).read_text(encoding="utf-8")
    assert _table(text, "## Table 1") == PUBLISHED
    assert _table(text, "## Table 2") == PUBLISHED_WITH_EXTRA
    flat = " ".join(text.split())
    paper = re.search(r"Normal ([\d,]+), Bacteria ([\d,]+), Virus ([\d,]+), COVID-19 (\d+)", flat)
    assert paper and [int(g.replace(",", "")) for g in paper.groups()] == list(
        PAPER_CLASS_TOTALS.values()
    )
    csv_totals = re.search(r"which has (\d+) COVID-19 images, ([\d,]+) Normal", flat)
    assert csv_totals and int(csv_totals.group(1)) == CSV_CLASS_TOTALS["COVID-19"]
    assert int(csv_totals.group(2).replace(",", "")) == CSV_CLASS_TOTALS["Normal"]


def test_csv_class_totals_are_the_metadata_csvs(shared_xray: Path) -> None:
    index = index_dataset(shared_xray / "coronahack", "multiclass")
    assert index.counts() == CSV_CLASS_TOTALS
