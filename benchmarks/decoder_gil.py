"""Which image decoders release Python's interpreter lock while they work.

    .venv/bin/python benchmarks/decoder_gil.py [--repeat 5]

The daemon decodes in threads beside pynetdicom's reception threads, which need the lock
for every PDU; a decoder that keeps it stalls reception (docs/benchmarks.md, "DICOM
receiving"). For each decoder, on a real compressed frame of ``../shared/data/xray/dicom``
(JPEG 2000: RG1_J2KI; JPEG baseline: the RSNA film), this prints the time per decode alone,
and the share of its own solo rate that a spinning Python thread keeps while the decoder
runs beside it (about 1: the decoder releases the lock and each has a core; near 0: the
decoder holds it). Both measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xrwatch.sysinfo import describe as describe_machine  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "xray" / "dicom"


def first_frame(path: Path) -> bytes:
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(path)
    return next(generate_frames(ds.PixelData, number_of_frames=1))


class Spinner:
    """A Python thread that counts loops while the ``with`` block runs; ``rate`` after it:
    loops per second."""

    def __enter__(self) -> Spinner:
        self.count, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._spin)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _spin(self) -> None:
        while not self._stop.is_set():
            self.count += 1

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.rate = self.count / self.elapsed


def measure(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(seconds per decode alone, the spinner's share of its solo rate beside it)."""
    fn()  # first-call costs
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    alone = (time.perf_counter() - t0) / repeat
    with Spinner() as beside:
        for _ in range(repeat):
            fn()
    with Spinner() as solo:  # the main thread sleeps as long
        time.sleep(beside.elapsed)
    return alone, beside.rate / solo.rate


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=5, help="decodes per measurement")
    args = ap.parse_args()
    rsna = sorted(SHARED.glob("rsna_*.dcm"))
    if not (SHARED / "RG1_J2KI.dcm").is_file() or not rsna:
        print("needs ../shared/data/xray/dicom (RG1_J2KI.dcm, rsna_*.dcm)", file=sys.stderr)
        return 2
    import libjpeg
    import openjpeg
    from PIL import Image

    j2k, jpeg = first_frame(SHARED / "RG1_J2KI.dcm"), first_frame(rsna[0])

    def pillow(data: bytes) -> Callable[[], object]:
        def run() -> np.ndarray:
            img = Image.open(io.BytesIO(data))
            img.load()
            return np.asarray(img)

        return run

    decoders = [
        ("JPEG 2000, OpenJPEG via Pillow, full", pillow(j2k)),
        ("JPEG 2000, OpenJPEG via pylibjpeg-openjpeg, full", lambda: openjpeg.decode(j2k)),
        ("JPEG baseline, pylibjpeg-libjpeg", lambda: libjpeg.decode(jpeg)),
        ("JPEG baseline, Pillow (libjpeg-turbo)", pillow(jpeg)),
    ]
    print(describe_machine())
    for name, fn in decoders:
        alone, share = measure(fn, args.repeat)
        print(f"{name:50s} {1000 * alone:7.1f} ms per decode; a spinning thread keeps "
              f"{share:.2f} of its rate")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
