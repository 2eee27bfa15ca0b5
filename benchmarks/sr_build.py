"""Benchmark building the DICOM results: milliseconds per SR (and per SC) as the daemon's
writer builds them (:func:`xrwatch.dicom.sr.build_sr`, :func:`xrwatch.dicom.sc.build_sc`),
on the headers of the real DICOMs in ``../shared/data/xray/dicom``.

    .venv/bin/python benchmarks/sr_build.py [--count 40] [--profile 25] [--dump DIR]

Each source is read as the writer reads it (``stop_before_pixels``) and given a new SOP
Instance UID per build, so nothing is cached across instances that a real stream would not
share. ``--profile N`` prints cProfile's top N functions (cumulative) of the SR builds.
``--dump DIR`` writes each source's SR (a judged 4-class record and a not-attempted one)
and its SC, with the content date and time fixed, so two versions of the builder can be
compared byte for byte (``cmp -r``).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from xrwatch.dicom.sc import build_sc  # noqa: E402
from xrwatch.dicom.sr import build_sr  # noqa: E402
from xrwatch.sysinfo import describe as describe_machine  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "xray" / "dicom"
SHA = "ab" * 32
PROBS = {"Normal": 0.1, "Bacteria": 0.6, "Virus": 0.2, "COVID-19": 0.1}
MODEL = "default.onnx (resnet50-PRCE-int8)"
# the timestamps highdicom stamps on each object: fixed for --dump
STAMPS = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
          "DateOfSecondaryCapture", "TimeOfSecondaryCapture")  # fmt: skip


def record(**changes: object) -> dict:
    return {"status": "ok", "label": "Bacteria", "probabilities": PROBS, "model_sha256": SHA,
            "flag": "", **changes}  # fmt: skip


def headers() -> list[pydicom.Dataset]:
    out = []
    for path in sorted(SHARED.glob("*.dcm")):
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        if "Rows" in ds and "StudyInstanceUID" in ds:
            out.append(ds)
    return out


def heatmap_png(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    path = folder / "heatmap.png"
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(path)
    return path


def fixed(ds: pydicom.Dataset) -> bytes:
    for keyword in STAMPS:
        if keyword in ds:
            setattr(ds, keyword, "20260101" if keyword.endswith("Date") else "120000")
    for item in ds.get("ContributingEquipmentSequence") or ():
        item.ContributionDateTime = "20260101120000"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# (Specific Character Set, Patient Name, model name): the source's set kept, or UTF-8
# when a text does not fit it (a name, or the model's), or a name pydicom does not know
CHARSETS = (
    ("ISO_IR 100", "Buc^Jérôme", MODEL),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", MODEL),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", MODEL),
    ("ISO_IR 100", "Yamada^Tarou=山田^太郎", MODEL),
    ("ISO_IR 100", "Doe^John", "modèle-日本.onnx"),
    ("ISO_IR 999", "Doe^John", MODEL),
    (None, "Doe^John", MODEL),
)


def in_charset(source: pydicom.Dataset, charset: object, name: str) -> pydicom.Dataset:
    """``source`` written with ``charset`` and ``name`` and read back (text decoded)."""
    ds = copy.deepcopy(source)
    ds.PatientName, ds.IssuerOfPatientID = name, "HOSPITAL-A"
    if charset is None:
        ds.pop("SpecificCharacterSet", None)
    else:
        ds.SpecificCharacterSet = charset
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    buf.seek(0)
    return pydicom.dcmread(buf, force=True)


def dump(sources: list[pydicom.Dataset], png: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (charset, name, model) in enumerate(CHARSETS):
        src = in_charset(sources[0], charset, name)
        sr = build_sr(src, record(flag="low_confidence", flag_reason=name), model)
        (out / f"charset{i}.SR.dcm").write_bytes(fixed(sr))
        (out / f"charset{i}.SC.dcm").write_bytes(fixed(build_sc(src, png, SHA)))
    for i, src in enumerate(sources):
        for name, rec in (("judged", record()), ("notattempted", record(flag="out_of_scope"))):
            (out / f"{i}.{name}.SR.dcm").write_bytes(fixed(build_sr(src, rec, MODEL)))
        (out / f"{i}.SC.dcm").write_bytes(fixed(build_sc(src, png, SHA, instance_number=3)))
    print(f"wrote {3 * len(sources) + 2 * len(CHARSETS)} objects to {out}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=40, help="SRs (and SCs) built per source")
    ap.add_argument("--profile", type=int, default=0, help="print the top N of cProfile")
    ap.add_argument("--dump", type=Path, help="write fixed-time SRs and SCs here; no timing")
    args = ap.parse_args()
    if not SHARED.is_dir():
        print("needs ../shared/data/xray/dicom", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")  # as the writer does
    sources = headers()
    with tempfile.TemporaryDirectory() as tmp:
        png = heatmap_png(Path(tmp))
        if args.dump:
            dump(sources, png, args.dump)
            return 0
        build_sr(sources[0], record(), MODEL)  # imports and first-call caches
        build_sc(sources[0], png, SHA)
        print(describe_machine())
        print(f"{len(sources)} source headers, {args.count} builds each")
        profiler = cProfile.Profile() if args.profile else None
        sr_s = sc_s = sr_cpu = 0.0
        n = 0
        for _ in range(args.count):
            for src in sources:
                src.SOPInstanceUID = pydicom.uid.generate_uid()
                t0, c0 = time.perf_counter(), time.process_time()
                if profiler:
                    profiler.enable()
                build_sr(src, record(), MODEL, instance_number=n + 1)
                if profiler:
                    profiler.disable()
                t1 = time.perf_counter()
                sr_cpu += time.process_time() - c0
                build_sc(src, png, SHA, instance_number=n + 1)
                t2 = time.perf_counter()
                sr_s += t1 - t0
                sc_s += t2 - t1
                n += 1
        print(f"SR (4-class TID 1500): {1000 * sr_s / n:7.1f} ms per SR ({n} built; "
              f"{1000 * sr_cpu / n:.1f} ms CPU)")  # fmt: skip
        print(f"SC (224 px overlay):   {1000 * sc_s / n:7.1f} ms per SC ({n} built)")
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
