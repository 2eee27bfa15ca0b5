"""One name per fact: classify CSV/JSON, the daemon's CSV/JSON and inspect JSON agree."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.dicom_factory import gradient, write_dicom
from xrwatch import fields
from xrwatch.cli.classify_cmd import render_csv, render_json
from xrwatch.cli.inspect_cmd import inspect_file
from xrwatch.engine import InferenceEngine
from xrwatch.preprocess import PreprocessSpec

ROOT = Path(__file__).resolve().parents[2]
UIDS = {
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
    "series_instance_uid": "1.2.826.0.1.3680043.8.498.3",
    "sop_instance_uid": "1.2.826.0.1.3680043.8.498.2",
    "accession_number": "ACC-42",
}


def _without_probs(keys: list[str] | set[str]) -> set[str]:
    return {k for k in keys if not k.startswith(fields.PROB_PREFIX)}


def test_every_output_names_the_same_facts_the_same_way(
    tmp_path: Path, tiny_onnx_model: Path
) -> None:
    incoming, reports = tmp_path / "incoming", tmp_path / "reports"
    incoming.mkdir()
    dcm = write_dicom(incoming / "a.dcm", pixels=gradient(40, 30), **UIDS)
    (incoming / "bad.png").write_text("not an image")
    files = [dcm, incoming / "bad.png"]

    engine = InferenceEngine(tiny_onnx_model, use_gpu=False)
    predictions = engine.predict_paths(files)
    classify_json = json.loads(render_json(predictions))
    classify_csv = list(csv.DictReader(io.StringIO(render_csv(predictions, engine.classes))))
    inspect_json = [inspect_file(f, PreprocessSpec(size=32)).to_dict() for f in files]
    r = subprocess.run(
        [
            sys.executable, "-m", "xrwatch", "serve", str(incoming), "--model",
            str(tiny_onnx_model), "--reports", str(reports), "--once", "--stable-seconds", "0.2",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    with (reports / "predictions.csv").open(newline="", encoding="utf-8") as fh:
        daemon_csv = list(csv.DictReader(fh))
    daemon_json = [json.loads((reports / "json" / "a.dcm.json").read_text())]

    outputs = {
        "classify json": [set(d) for d in classify_json],
        "classify csv": [_without_probs(set(d)) for d in classify_csv],
        "daemon csv": [_without_probs(set(d)) for d in daemon_csv],
        "daemon json": [set(d) for d in daemon_json],
        "inspect json": [set(d) for d in inspect_json],
    }
    for name, key_sets in outputs.items():
        for keys in key_sets:
            assert keys <= fields.ALL, (
                f"{name} uses names not in xrwatch.fields: {keys - fields.ALL}"
            )
    # a prediction has the same fields in classify and the daemon, CSV and JSON alike
    for name in ("classify json", "classify csv", "daemon csv", "daemon json"):
        assert set(fields.PREDICTION) <= outputs[name][0], name
    # what inspect and the daemon both say about a file, they say under the same names
    shared = set(fields.IMAGE) & outputs["daemon csv"][0]
    assert shared >= {"kind", "modality", "width", "height", *UIDS}
    assert shared | {fields.FILE, fields.STATUS, fields.ERROR} <= outputs["inspect json"][0]

    # and the same values under those names
    by_file = {
        "classify json": classify_json[0],
        "classify csv": classify_csv[0],
        "daemon csv": next(d for d in daemon_csv if d["file"] == "a.dcm"),
        "daemon json": daemon_json[0],
        "inspect json": inspect_json[0],
    }
    for name, record in by_file.items():
        assert record[fields.STATUS] == "ok", name
        assert {k: record[k] for k in UIDS} == UIDS, name
    failed = inspect_json[1]
    assert failed[fields.STATUS] == "error" and "not a DICOM" in failed[fields.ERROR]
