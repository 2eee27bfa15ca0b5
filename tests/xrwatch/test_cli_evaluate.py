"""``xrwatch evaluate``: labelled folders, CoronaHack layout and a run's split file; outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.tools import require_shared_data
from xrwatch.cli._app import EXIT_ERROR, EXIT_OK, main
from xrwatch.cli.evaluate_cmd import load_labelled

CLASSES = ["Normal", "Bacteria", "Virus", "COVID-19"]


@pytest.fixture
def labelled(shared_xray: Path, tmp_path: Path) -> Path:
    """Three real images per class, in a folder per class (symlinks, nothing copied)."""
    root = tmp_path / "data"
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for src in sorted((shared_xray / "real" / cls).iterdir())[:3]:
            (root / cls / src.name).symlink_to(src)
    return root


def test_folder_evaluation_writes_json_table_and_png(
    labelled: Path, tiny_onnx_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    code = main(["evaluate", str(labelled), "--model", str(tiny_onnx_model), "--out", str(out),
                 "--replicates", "50"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == EXIT_OK
    assert "balanced accuracy" in printed and "95 % CI" in printed
    result = json.loads((out / "evaluation.json").read_text())
    assert result["classes"] == CLASSES
    assert result["n_images"] == 12
    assert result["model"]["sha256"] and result["model"]["name"].startswith("tinycnn")
    m = result["metrics"]
    assert m["bootstrap"]["unit"] == "patient" and m["bootstrap"]["replicates"] == 50
    assert sum(map(sum, m["confusion_matrix"])) == 12
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro"):
        assert m[key]["value"] is not None and len(m[key]["ci"]) == 2
    assert set(m["per_class"]) == set(CLASSES)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 12 and {r["true"] for r in rows} == set(CLASSES)
    with Image.open(out / "confusion_matrix.png") as img:
        assert img.size[0] > 300
    assert (out / "evaluation.md").read_text().count("|") > 20


def test_split_file_keeps_the_runs_patient_groups(
    labelled: Path, tiny_onnx_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = tmp_path / "test.csv"
    files = sorted(p for p in labelled.rglob("*") if p.is_file())
    with split.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "fine_label", "group", "source_split"])
        for i, p in enumerate(files):
            w.writerow([str(p), p.parent.name, p.parent.name, f"patient{i // 4}", "TRAIN"])
    samples = load_labelled(split, "multiclass")
    assert len({s.group for s in samples}) == 3
    code = main(["evaluate", str(split), "-m", str(tiny_onnx_model), "--json",
                 "--replicates", "20"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK and result["n_patients"] == 3 and result["n_images"] == 12


def test_coronahack_layout_with_split_filter(shared_xray: Path) -> None:
    subset = require_shared_data(shared_xray / "coronahack-subset")
    test_rows = load_labelled(subset, "multiclass", "TEST")
    assert len(test_rows) == 17 and {s.label for s in test_rows} == {"Virus"}
    assert len(load_labelled(subset, "multiclass")) == 759


def test_label_the_model_lacks_is_an_error(
    labelled: Path, tiny_onnx_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = tmp_path / "odd.csv"
    src = next(p for p in labelled.rglob("*") if p.is_file())
    split.write_text(f"path,label,group\n{src},Fracture,p1\n")
    code = main(["evaluate", str(split), "-m", str(tiny_onnx_model)])
    assert code == EXIT_ERROR
    assert "Fracture" in capsys.readouterr().err


def test_no_model_and_no_default_is_a_usage_error(
    labelled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from xrwatch import defaults

    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tmp_path / "absent" / "default.onnx")
    code = main(["evaluate", str(labelled)])
    assert code == EXIT_ERROR
    assert "no default model" in capsys.readouterr().err


def test_evaluate_never_loads_torch(labelled: Path, tiny_onnx_model: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom xrwatch.cli import main\n"
        f"rc = main(['evaluate', {str(labelled)!r}, '-m', {str(tiny_onnx_model)!r}, "
        "'--replicates', '10', '--json'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nraise SystemExit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def test_prints_the_risk_coverage_table_of_the_shipped_model(
    labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shipped model has calibration and a stored threshold: the table marks it, and
    its rates are those of the predictions written. Its classes are Normal, Bacteria and
    Virus: the COVID-19 folder is left out (evaluate refuses labels the model lacks)."""
    for img in (labelled / "COVID-19").iterdir():
        img.unlink()
    (labelled / "COVID-19").rmdir()
    out = tmp_path / "eval"
    assert main(["evaluate", str(labelled), "--out", str(out), "--replicates", "20"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "| flag below | flagged | accuracy of the unflagged |" in printed
    low = json.loads((out / "evaluation.json").read_text())["low_confidence"]
    assert [r["threshold"] for r in low["risk_coverage"]][:2] == [0.4, 0.5]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    right = [float(r["confidence"]) for r in rows if r["true"] == r["predicted"]]
    wrong = [float(r["confidence"]) for r in rows if r["true"] != r["predicted"]]
    t = low["threshold"]
    assert t is not None and f"| {t:g} (model) |" in printed
    assert low["rates"]["right_flagged"] == pytest.approx(sum(c < t for c in right) / len(right))
    if wrong:
        assert low["rates"]["wrong_flagged"] == pytest.approx(
            sum(c < t for c in wrong) / len(wrong)
        )
    for r in rows:  # the flag column is the engine's: low_confidence exactly below t
        if r["flag"] != "out_of_scope":
            assert (r["flag"] == "low_confidence") == (float(r["confidence"]) < t)


def test_out_escapes_formulas_and_is_written_while_classifying(
    shared_xray: Path, tiny_onnx_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xrwatch.engine

    root = tmp_path / "data"
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        src = sorted((shared_xray / "real" / cls).iterdir())[0]
        (root / cls / ("=cmd|calc" + src.suffix)).symlink_to(src)
    out = tmp_path / "eval"
    seen: list[int] = []
    real = xrwatch.engine.InferenceEngine.predict_paths

    def spy(self: object, paths: list[Path], *args: object, **kw: object) -> object:
        csv_path = out / "predictions.csv"
        seen.append(len(csv_path.read_text().splitlines()) if csv_path.exists() else 0)
        return real(self, paths, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(xrwatch.engine.InferenceEngine, "predict_paths", spy)
    argv = ["evaluate", str(root), "--model", str(tiny_onnx_model), "--out", str(out)]
    assert main([*argv, "--replicates", "10", "--batch-size", "1"]) == EXIT_OK
    assert seen == [0, 2, 3, 4]  # header + each earlier row on disk before the next batch
    text = (out / "predictions.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    # the patient group of a file directly in a class folder is its name's stem
    assert [r["group"] for r in rows] == ["'=cmd|calc"] * 4  # shown as text by a spreadsheet
    assert "\n=" not in text and ",=" not in text
