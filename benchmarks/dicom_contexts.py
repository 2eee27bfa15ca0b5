"""CPU milliseconds per association for pynetdicom's copy of the receiver's presentation
contexts: its own ``deepcopy`` against :class:`xrwatch.dicom.pynetdicom_glue.SharedUIDContexts`.

    .venv/bin/python benchmarks/dicom_contexts.py [--repeat 20]

The contexts are the receiver's: every storage SOP class pynetdicom knows, each with every
transfer syntax the installed decoders handle (``Receiver.start``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pynetdicom import AE
from pynetdicom.presentation import AllStoragePresentationContexts

from xrwatch.dicom.pynetdicom_glue import (
    SharedUIDContexts,
    decodable_transfer_syntaxes,
)
from xrwatch.sysinfo import describe


def cpu_ms(contexts: list, repeat: int) -> float:
    t0 = time.process_time()
    for _ in range(repeat):
        copy.deepcopy(contexts)
    return 1000 * (time.process_time() - t0) / repeat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    ae, syntaxes = AE(), decodable_transfer_syntaxes()
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, syntaxes)
    plain = list(ae.supported_contexts)
    print(describe())
    print(f"{len(plain)} contexts x {len(syntaxes)} transfer syntaxes")
    print(f"pynetdicom's deepcopy:  {cpu_ms(plain, args.repeat):6.1f} CPU ms per association")
    shared = SharedUIDContexts(plain)
    print(f"SharedUIDContexts copy: {cpu_ms(shared, args.repeat):6.1f} CPU ms per association")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
