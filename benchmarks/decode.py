"""Decode speed: ms per image for each real file kind, and JPEG draft mode on/off.

    .venv/bin/python benchmarks/decode.py [--data ../shared/data/xray] [--repeat 5]

Times :func:`xrwatch.imageio.read_image` (bytes -> float32 [0, 1]) per file, the median of
``--repeat`` runs after one warm-up. "draft" decodes with ``min_side`` set to what the
default model input needs (``PreprocessSpec().min_decode_side``), as serving does; only
JPEGs honour it. Prints a Markdown table that the README quotes, then what draft mode costs
in quality: the mean |difference| between the model input from a draft decode and from a
full decode, in 8-bit grey levels, for draft headrooms 1.0x, 1.5x (the default) and 2.0x.

Then DICOM against pydicom, best of ``--repeat`` runs (the least disturbed on a shared
machine): ``read_image`` vs pydicom's own ``dcmread(...).pixel_array`` (decode only, no VOI)
and vs the reference float64 VOI arithmetic (``voi.apply_*``, the path read_image used
before the float32 one), on the real DICOMs and two generated ones (a 3.7 MP 12-bit CR,
native; a 14 MP 12-bit JPEG 2000 mammogram-sized image); and JPEG 2000 decoded in full vs
at reduced resolution (``min_side`` 224, and 336 as serving asks); native data read as
serving reads it (``min_side`` 336: stored values box-averaged before the LUTs) against
pydicom and a full read, with the model-input difference. ``--memory`` adds the
peak memory of one 100 MP decode; ``--worker-memory`` how long a first decoder worker
process (``decode_in = "processes"``, :mod:`xrwatch.serve.decoders`) takes to start, and
its memory after it decoded the real DICOMs.
The first line names the CPU, its ISA features and ONNX Runtime (:mod:`xrwatch.sysinfo`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xrwatch.imageio import read_image
from xrwatch.preprocess import PreprocessSpec
from xrwatch.sysinfo import describe as describe_machine

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: imports, plugin discovery, file cache
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of ``repeat`` runs after a warm-up: on a shared machine the least disturbed."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return min(times)


def per_image_ms(
    paths: list[Path], min_side: int | None, repeat: int, spec: PreprocessSpec | None = None
) -> float:
    """Mean over ``paths`` of the median ms to decode (and, with ``spec``, to resize)."""

    def run(p: Path) -> object:
        pixels = read_image(p, min_side=min_side).pixels
        return spec.apply(pixels) if spec is not None else pixels

    return statistics.mean(median_ms(lambda p=p: run(p), repeat) for p in paths)


def measure(paths: list[Path], repeat: int, *, jpeg: bool) -> tuple[float, ...]:
    """(decode full, decode draft, +resize full, +resize draft); draft = NaN unless JPEG."""
    spec = PreprocessSpec()
    need = spec.min_decode_side
    nan = float("nan")
    return (
        per_image_ms(paths, None, repeat),
        per_image_ms(paths, need, repeat) if jpeg else nan,
        per_image_ms(paths, None, repeat, spec),
        per_image_ms(paths, need, repeat, spec) if jpeg else nan,
    )


def synthetic_jpeg(directory: Path, side: int = 2000) -> Path:
    """A 2000 x 2000 grayscale JPEG with chest-film-like structure and noise.

    The noise is set so the file holds ~0.1 bytes per pixel, like the median real Kermany
    JPEG (0.09): entropy decoding, which draft mode cannot skip, costs what it costs there.
    """
    y, x = np.mgrid[0:side, 0:side] / side
    body = np.exp(-(((x - 0.5) / 0.35) ** 2 + ((y - 0.55) / 0.45) ** 2))
    lungs = np.exp(-(((np.abs(x - 0.5) - 0.17) / 0.1) ** 2 + ((y - 0.45) / 0.22) ** 2))
    ribs = 0.08 * np.sin(y * 90) * (lungs > 0.2)
    noise = np.random.default_rng(0).normal(0, 0.006, (side, side))
    img = np.clip(0.15 + 0.7 * body - 0.45 * lungs + ribs + noise, 0, 1)
    path = directory / f"synthetic_{side}.jpg"
    Image.fromarray((img * 255).astype(np.uint8)).save(path, quality=90)
    return path


def describe(path: Path) -> str:
    decoded = read_image(path)
    m = decoded.meta
    ts = f", TS {m.transfer_syntax}" if m.transfer_syntax else ""
    return f"{m.width}x{m.height} {m.source_mode}{ts}, {path.stat().st_size / 1e3:.0f} kB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "xray")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-raster", action="store_true", help="only the DICOM tables")
    parser.add_argument(
        "--memory", action="store_true", help="also: peak RSS of one 100 MP decode (200 MB file)"
    )
    parser.add_argument(
        "--worker-memory",
        action="store_true",
        help="also: resident and proportional memory of a decoder worker process",
    )
    args = parser.parse_args()
    print(describe_machine())
    print()
    if args.worker_memory:
        worker_memory(args.data / "dicom")
        return
    if not args.skip_raster:
        raster_tables(args)
    dicom_tables(args)
    if args.memory:
        memory_table()


_RSS_PROBE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from xrwatch.imageio import read_image
from xrwatch.imageio.budget import estimate_decode_bytes

def peak_mib():  # VmHWM: this process's own peak (ru_maxrss survives exec from the parent)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

data = Path(sys.argv[1]).read_bytes()  # the daemon holds the file's bytes (read_and_hash)
before = peak_mib()
if sys.argv[2] == "read_image":
    read_image(sys.argv[1], data=data)
else:
    sys.path.insert(0, sys.argv[3] + "/benchmarks")
    from decode import reference_pixels
    reference_pixels(Path(sys.argv[1]))
print(peak_mib() - before, estimate_decode_bytes(100_000_000, 2) / 2**20)
"""


def worker_memory(folder: Path) -> None:
    """How long a first decoder worker process takes to run (the fork server's start with
    it), and its Rss and Pss (pages shared with the fork server counted in proportion) after
    it decoded every DICOM of ``folder``."""
    from xrwatch.serve.decoders import Decoders

    decoders = Decoders(PreprocessSpec(), "processes", dicom_port=False)
    t0 = time.perf_counter()
    if not decoders.ready(120):
        raise SystemExit("no decoder process could be started")
    print(f"first decoder worker process running after {time.perf_counter() - t0:.2f} s")
    files = sorted(folder.glob("*.dcm"))
    for path in files:
        decoders.decode(path, path.read_bytes())
    print(f"decoder worker process after decoding {len(files)} DICOMs of {folder}:")
    for pid in decoders.pids():
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) / 1024
        private = fields["Private_Clean"] + fields["Private_Dirty"]
        print(f"  Rss {fields['Rss']:.0f} MiB, Pss {fields['Pss']:.0f} MiB, "
              f"private {private:.0f} MiB")  # fmt: skip
    decoders.close()


def memory_table() -> None:
    """Peak RSS a 100 MP 12-bit native DICOM adds to a process, new path and old."""
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.helpers.dicom_factory import write_dicom

    with tempfile.TemporaryDirectory() as tmp:
        raw = np.random.default_rng(0).integers(0, 4096, (10000, 10000), dtype=np.uint16)
        path = write_dicom(Path(tmp) / "100mp.dcm", pixels=raw, bits_stored=12, window=(2000, 3000))
        del raw
        print()
        print("memory: peak RSS added by decoding one 100 MP 12-bit native DICOM (file bytes held)")
        print()
        print("| path | MiB above the file's bytes | budget estimate MiB |")
        print("|---|---:|---:|")
        for how in ("read_image", "old float64 VOI path"):
            out = subprocess.run(
                [sys.executable, "-c", _RSS_PROBE, str(path), how.split()[0], str(ROOT)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            print(f"| {how} | {float(out[0]):.0f} | {float(out[1]):.0f} |")


def raster_tables(args: argparse.Namespace) -> None:
    need = PreprocessSpec().min_decode_side
    rows: list[tuple[str, str, int, tuple[float, ...]]] = []
    for path in sorted((args.data / "dicom").glob("*.dcm")):
        rows.append(
            (f"DICOM {path.name[:24]}", describe(path), 1, measure([path], args.repeat, jpeg=False))
        )
    real = sorted(p for p in (args.data / "real").rglob("*") if p.is_file())
    for suffix, label in ((".jpeg", "real JPEG (Kermany)"), (".png", "real PNG (COVID-19)")):
        group = [p for p in real if p.suffix.lower() == suffix]
        if not group:
            continue
        metas = [read_image(p).meta for p in group]
        kb = statistics.median(p.stat().st_size for p in group) / 1e3
        widths = [m.width for m in metas]
        span = f"{min(widths)}-{max(widths)} px wide, median {kb:.0f} kB"
        rows.append((label, span, len(group), measure(group, args.repeat, jpeg=suffix == ".jpeg")))
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_jpeg(Path(tmp))
        decoded = read_image(path, min_side=need).meta
        what = (
            f"2000x2000 L, {path.stat().st_size / 1e3:.0f} kB "
            f"(draft decodes {decoded.decoded_width}x{decoded.decoded_height})"
        )
        rows.append(("generated JPEG", what, 1, measure([path], args.repeat, jpeg=True)))

    print(
        f"read_image, median of {args.repeat} runs per file; draft = min_side {need} "
        "(what a 224 px model input asks for); +resize = then PreprocessSpec().apply"
    )
    print()
    print(
        "| file kind | what | files | decode ms | decode ms, draft | decode+resize ms "
        "| decode+resize ms, draft | speed-up (decode+resize) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")

    def fmt(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.1f}"

    for label, what, n, (full, draft, full_r, draft_r) in rows:
        ratio = "-" if math.isnan(draft_r) else f"{full_r / draft_r:.1f}x"
        print(
            f"| {label} | {what} | {n} | {fmt(full)} | {fmt(draft)} | {fmt(full_r)} "
            f"| {fmt(draft_r)} | {ratio} |"
        )
    jpegs = [p for p in real if p.suffix.lower() in (".jpg", ".jpeg")]
    if jpegs:
        draft_quality(jpegs, PreprocessSpec())


def draft_quality(paths: list[Path], spec: PreprocessSpec) -> None:
    """Mean |model input (draft) - model input (full decode)| in 8-bit steps, per headroom."""
    full = {p: spec.apply(read_image(p).pixels) for p in paths}
    print()
    print(f"draft-mode quality on {len(paths)} real JPEGs, model input {spec.size} px:")
    print()
    print("| draft keeps shorter side >= | mean abs difference (of 255) | images reduced |")
    print("|---|---:|---:|")
    for headroom in (1.0, 1.5, 2.0):
        side = math.ceil(spec.size * headroom)
        diffs, reduced = [], 0
        for p in paths:
            decoded = read_image(p, min_side=side)
            reduced += decoded.meta.decoded_width < decoded.meta.width
            diffs.append(float(np.abs(spec.apply(decoded.pixels) - full[p]).mean()) * 255)
        print(
            f"| {headroom:.1f} x size ({side} px) | {statistics.mean(diffs):.2f} "
            f"| {reduced}/{len(paths)} |"
        )


def pydicom_read(path: Path) -> object:
    """dcmread as read_image does (force, transfer syntax inferred for files without meta)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        implicit, _ = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
    return ds


def reference_ms(path: Path, repeat: int) -> float:
    """dcmread + pixel_array + the float64 reference VOI arithmetic (the old read_image)."""
    return best_ms(lambda: reference_pixels(path), repeat)


def reference_pixels(path: Path) -> np.ndarray:
    """The old read_image arithmetic: float64 modality LUT, VOI, inversion, one at a time."""
    import pydicom

    from xrwatch.imageio.voi import (
        apply_modality_lut,
        apply_voi_lut,
        apply_window,
        robust_normalise,
    )

    ds: Any = pydicom_read(path)
    values = apply_modality_lut(ds.pixel_array, ds)
    if "VOILUTSequence" in ds:
        out = apply_voi_lut(values, ds.VOILUTSequence[0], signed=bool(ds.PixelRepresentation))
    elif "WindowCenter" in ds:
        wc, ww = ds.WindowCenter, ds.WindowWidth
        c = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
        w = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
        out = apply_window(values, c, w, str(ds.get("VOILUTFunction", "") or "LINEAR"))
    else:
        out = robust_normalise(values)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(np.asarray(out, np.float32), 0, 1)


def pydicom_ms(path: Path, repeat: int) -> float:
    return best_ms(lambda: pydicom_read(path).pixel_array, repeat)  # type: ignore[attr-defined]


def synthetic_dicoms(directory: Path) -> list[Path]:
    """A 3.7 MP 12-bit CR (native, with a window) and a 14 MP 12-bit JPEG 2000 image."""
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.helpers.dicom_factory import write_dicom

    def chest(rows: int, cols: int) -> np.ndarray:
        y, x = np.mgrid[0:rows, 0:cols] / max(rows, cols)
        body = np.exp(-(((x - 0.5) / 0.35) ** 2 + ((y - 0.55) / 0.45) ** 2))
        noise = np.random.default_rng(0).normal(0, 12, (rows, cols))
        return np.clip(600 + 2800 * body + 200 * np.sin(y * 90) + noise, 0, 4095).astype(np.uint16)

    cr = write_dicom(
        directory / "cr_3.7mp.dcm",
        pixels=chest(2140, 1760),
        bits_stored=12,
        modality="CR",
        rescale=(1.0, 0.0),
        window=(2100, 3000),
    )
    j2k = write_dicom(
        directory / "mg_14mp_j2k.dcm",
        pixels=chest(4096, 3328),
        bits_stored=12,
        modality="MG",
        photometric="MONOCHROME1",
        transfer_syntax="1.2.840.10008.1.2.4.90",
    )
    return [cr, j2k]


NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def native_table(paths: list[Path], spec: PreprocessSpec, repeat: int) -> None:
    """Native (uncompressed) DICOM read as serving reads it: ``min_side`` set, so the stored
    values are box-averaged before the LUTs; against pydicom's pixel_array and a full read."""
    native = [p for p in paths if read_image(p).meta.transfer_syntax in NATIVE]
    if not native:
        return
    print()
    print(
        f"Native DICOM at reduced resolution (block average of stored values, min_side "
        f"{spec.min_decode_side} as serving asks for a {spec.size} px model), best of {repeat}:"
    )
    print()
    print(
        "| file | pydicom dcmread+pixel_array ms | read_image full ms | read_image min_side ms, "
        "decoded size | min_side / pydicom | model input mean abs diff (of 255) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for path in native:
        theirs = pydicom_ms(path, repeat)
        full = best_ms(lambda p=path: read_image(p), repeat)
        reduced = best_ms(lambda p=path: read_image(p, min_side=spec.min_decode_side), repeat)
        small = read_image(path, min_side=spec.min_decode_side)
        diff = np.abs(spec.apply(small.pixels) - spec.apply(read_image(path).pixels)).mean()
        shape = f"{small.meta.decoded_width}x{small.meta.decoded_height}"
        print(
            f"| {path.name[:28]} | {theirs:.1f} | {full:.1f} | {reduced:.1f}, {shape} "
            f"| {reduced / theirs:.2f}x | {float(diff) * 255:.2f} |"
        )


def dicom_tables(args: argparse.Namespace) -> None:
    real = sorted((args.data / "dicom").glob("*.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = real + synthetic_dicoms(Path(tmp))
        print(f"DICOM: read_image vs pydicom, best of {args.repeat} runs per file (shared machine)")
        print()
        print(
            "| file | what | pydicom dcmread+pixel_array ms | read_image ms | read_image / pydicom "
            "| old float64 VOI path ms | speed-up vs old |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        for path in paths:
            # a full 14 MP JPEG 2000 decode takes seconds: fewer runs there
            n = 3 if path.name == "mg_14mp_j2k.dcm" else args.repeat
            ours = best_ms(lambda p=path: read_image(p), n)
            theirs = pydicom_ms(path, n)
            old = reference_ms(path, n)
            print(
                f"| {path.name[:28]} | {describe(path)} | {theirs:.1f} | {ours:.1f} "
                f"| {ours / theirs:.2f}x | {old:.1f} | {old / ours:.1f}x |"
            )
        spec = PreprocessSpec()
        native_table(paths, spec, args.repeat)
        j2k = [
            p for p in paths if (read_image(p).meta.transfer_syntax or "").endswith((".90", ".91"))
        ]
        print()
        print(
            "JPEG 2000 at reduced resolution (OpenJPEG reduce), decode + resize to the model input:"
        )
        print()
        print(
            "| file | full ms | min_side 224: ms, decoded size | speed-up "
            f"| min_side {spec.min_decode_side}: ms, decoded size | speed-up "
            "| model input mean abs diff (of 255), 224 / 336 |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for path in j2k:
            full_input = spec.apply(read_image(path).pixels)
            n = 3 if path.name == "mg_14mp_j2k.dcm" else args.repeat
            full = best_ms(lambda p=path: spec.apply(read_image(p).pixels), n)
            cells, diffs = [], []
            for side in (224, spec.min_decode_side):
                ms = best_ms(
                    lambda p=path, s=side: spec.apply(read_image(p, min_side=s).pixels), args.repeat
                )
                decoded = read_image(path, min_side=side)
                shape = f"{decoded.meta.decoded_width}x{decoded.meta.decoded_height}"
                cells.append(f"{ms:.1f}, {shape} | {full / ms:.1f}x")
                diffs.append(float(np.abs(spec.apply(decoded.pixels) - full_input).mean()) * 255)
            print(
                f"| {path.name[:28]} | {full:.1f} | {cells[0]} | {cells[1]} "
                f"| {diffs[0]:.2f} / {diffs[1]:.2f} |"
            )


if __name__ == "__main__":
    main()
