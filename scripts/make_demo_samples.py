"""Write the real sample X-rays that ``xrwatch demo`` classifies: ``xrwatch/samples/``.

    .venv/bin/python scripts/make_demo_samples.py        # from the repository root

Takes the first ``PER_CLASS`` CC BY images of each class in ``../shared/data/xray/real/``
(per its ``MANIFEST.csv``; that set is patient-disjoint from the training subset, so the
demo shows the model images it never saw), downscales them to ``SIDE`` px on the shorter
side (JPEG stays JPEG, PNG stays PNG: the format is part of what a model may latch onto)
and writes ``xrwatch/samples/<Class>/<file>`` plus ``ATTRIBUTION.md``.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "xray"
OUT = ROOT / "xrwatch" / "samples"
CLASSES = ("Normal", "Bacteria", "Virus", "COVID-19")
PER_CLASS = 2
SIDE = 256  # px, shorter side; the shipped model reads 128 px


def main() -> None:
    rows = list(csv.DictReader((SHARED / "MANIFEST.csv").open(encoding="utf-8")))
    if OUT.exists():
        shutil.rmtree(OUT)
    lines = [
        "# Sample chest X-rays for `xrwatch demo`",
        "",
        "Real, publicly licensed images, downscaled to a 256 px shorter side by",
        "`scripts/make_demo_samples.py`. The folder name is the image's label. Research use only.",
        "",
        "| file | label | licence and attribution | source |",
        "|---|---|---|---|",
    ]
    for cls in CLASSES:
        picked = [
            r for r in sorted(rows, key=lambda r: r["relpath"])
            if r["relpath"].startswith(f"real/{cls}/")
            and r["license"].startswith("CC BY") and "NC" not in r["license"]
        ][:PER_CLASS]  # fmt: skip
        for r in picked:
            src = SHARED / r["relpath"]
            dst = OUT / cls / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as img:
                img = img.convert("L")
                scale = SIDE / min(img.size)
                if scale < 1:
                    size = (round(img.width * scale), round(img.height * scale))
                    img = img.resize(size, Image.Resampling.LANCZOS)
                if src.suffix.lower() == ".png":
                    img.save(dst, optimize=True)
                else:
                    img.save(dst, quality=90, optimize=True)
            lines.append(
                f"| `{cls}/{src.name}` | {r['label']} | {r['license']} | "
                f"{r['source_repo']} `{r['source_path']}` (commit {r['source_commit'][:10]}) |"
            )
    lines += [
        "",
        "Kermany et al. 2018 images (Normal, Bacteria, Virus): CC BY 4.0, D. Kermany, K. Zhang,",
        "M. Goldbaum, *Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for",
        "Classification*, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2. COVID-19 images: Hannover",
        "Medical School COVID-19 image repository, CC BY 3.0, doi:10.6084/m9.figshare.12275009.",
        "Changes: converted to 8-bit greyscale and downscaled.",
        "",
    ]
    (OUT / "ATTRIBUTION.md").write_text("\n".join(lines), encoding="utf-8")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT}: {total / 1024:.0f} KB")


if __name__ == "__main__":
    main()
