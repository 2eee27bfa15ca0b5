"""DX *for processing* (raw detector data) is out of scope: the DICOM reader keeps
Presentation Intent Type, and ``xrwatch classify`` flags such an image ``out_of_scope``
while the same pixels *for presentation* are not."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.dicom_factory import write_dicom
from xrwatch import flags
from xrwatch.cli._app import main
from xrwatch.engine import InferenceEngine
from xrwatch.imageio import read_image

PROCESSING, PRESENTATION = "FOR PROCESSING", "FOR PRESENTATION"


def _intent(value: str) -> dict[str, str]:
    return {"PresentationIntentType": value}


def test_reader_keeps_the_presentation_intent(tmp_path: Path) -> None:
    raw = write_dicom(tmp_path / "raw.dcm", patient_name="Doe^Jane", extra=_intent(PROCESSING))
    shown = write_dicom(tmp_path / "shown.dcm", extra=_intent(PRESENTATION))
    plain = write_dicom(tmp_path / "plain.dcm")  # CR has no such attribute
    assert read_image(raw).meta.presentation_intent == PROCESSING
    assert read_image(shown).meta.presentation_intent == PRESENTATION
    assert read_image(plain).meta.presentation_intent is None
    # an image attribute, shown by inspect; still no patient data in the meta
    text = repr(read_image(raw).meta.to_dict())
    assert PROCESSING in text and "Doe" not in text
    assert flags.header_evidence(read_image(raw).meta)
    assert flags.header_evidence(read_image(shown).meta) == []


def _in_scope_chest(fitted_run: Path) -> np.ndarray:
    """The pixels of a held-out real chest X-ray that the model's guard passes."""
    engine = InferenceEngine(fitted_run / "model.onnx", use_gpu=False)
    rows = list(csv.DictReader((fitted_run / "splits" / "test.csv").open(encoding="utf-8")))
    paths = [Path(r["path"]) for r in rows]
    for path, pred in zip(paths, engine.predict_paths(paths), strict=True):
        if pred.ok and pred.flag != flags.OUT_OF_SCOPE:
            with Image.open(path) as img:
                return np.asarray(img.convert("L"), dtype=np.uint8)
    pytest.fail("the guard passes none of the held-out chest X-rays")


def test_classify_flags_dx_for_processing_only(
    fitted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pixels = _in_scope_chest(fitted_run)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, intent in (("raw", PROCESSING), ("shown", PRESENTATION)):
        write_dicom(folder / f"{name}.dcm", pixels=pixels, modality="DX", extra=_intent(intent))
    capsys.readouterr()
    code = main(["classify", str(folder), "-m", str(fitted_run / "model.onnx"), "-f", "json",
                 "--cpu"])  # fmt: skip
    out = capsys.readouterr().out
    rows = {Path(r["file"]).name: r for r in json.loads(out)}
    assert code == 0, out
    raw, shown = rows["raw.dcm"], rows["shown.dcm"]
    assert (raw["status"], raw["flag"]) == ("ok", flags.OUT_OF_SCOPE), raw
    assert "Presentation Intent Type FOR PROCESSING" in raw["flag_reason"], raw
    assert raw["label"] and raw["probabilities"]  # flagged, still classified
    assert shown["status"] == "ok" and shown["flag"] != flags.OUT_OF_SCOPE, shown
    assert PROCESSING not in (shown["flag_reason"] or "")
    # the intent is no column of the results: only what the flag reason says
    assert "presentation_intent" not in io.StringIO(out).getvalue()
