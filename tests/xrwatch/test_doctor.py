"""``xrwatch doctor``: the table, the JSON, the hand-built ONNX model and CUDA reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xrwatch.cli import main
from xrwatch.cli.doctor_cmd import (
    collect_checks,
    cuda_failure_reason,
    cuda_session_check,
    tiny_onnx_model,
)


def test_json_lists_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["doctor", "--json", "--no-cuda"])
    rows = json.loads(capsys.readouterr().out)
    items = {(r["section"], r["item"]): r for r in rows}
    assert ("system", "python") in items
    assert (
        "AVX" in items[("system", "CPU")]["value"] or "none of" in items[("system", "CPU")]["value"]
    )
    assert items[("packages", "pydicom")]["status"] == "ok"
    assert items[("packages", "onnxruntime")]["status"] in ("ok", "warn")
    assert ("onnxruntime", "providers") in items
    assert "CPUExecutionProvider" in items[("onnxruntime", "providers")]["value"]
    jpeg2000 = items[("DICOM pixel plugins", "JPEG 2000 Image Compression")]
    assert jpeg2000["status"] == "ok" and "pylibjpeg" in jpeg2000["value"]
    assert items[("torch", "torch")]["value"].startswith(("installed", "not installed"))
    assert code == (1 if any(r["status"] == "fail" for r in rows) else 0)


def test_table_mentions_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    main(["doctor"])
    out = capsys.readouterr().out
    assert "CUDA session" in out and "DICOM pixel plugins" in out


def test_cuda_check_always_gives_an_answer() -> None:
    row = next(c for c in collect_checks() if c.item == "CUDA session")
    assert row.value.startswith(("yes", "no: "))
    if row.value.startswith("no"):
        assert len(row.value) > len("no: ") + 10  # and says why


def test_tiny_model_runs_on_the_cpu() -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(tiny_onnx_model(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.array([[1, 2, 3, 4]], np.float32)})[0]
    np.testing.assert_array_equal(out, [[2, 4, 6, 8]])


def test_tiny_model_is_valid_onnx() -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(tiny_onnx_model())
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Add"]


def test_cuda_failure_reason_finds_the_missing_library() -> None:
    log = (
        "\x1b[1;31m2026-01-01 10:00:00.1 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 "
        "operator()] /src/provider_bridge_ort.cc:2043 onnxruntime::Provider& Get() "
        "[ONNXRuntimeError] : 1 : FAIL : Failed to load library /x/libonnxruntime_providers_cuda.so"
        " "
        "with error: libcublasLt.so.13: cannot open shared object file: No such file or directory"
        "\x1b[m\n\x1b[0;93m2026-01-01 [W:onnxruntime:Default, x.cc:1] fallback\x1b[m\n"
    )
    reason = cuda_failure_reason(log)
    assert reason.startswith("libonnxruntime_providers_cuda.so does not load: libcublasLt.so.13")
    assert "\x1b" not in reason
    assert cuda_failure_reason("") == "ONNX Runtime fell back to the CPU without saying why"


class _FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers

    def run(self, _outputs: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [feeds["x"] * 2]


@pytest.mark.parametrize(
    ("session_providers", "expected"),
    [
        (["CUDAExecutionProvider", "CPUExecutionProvider"], "yes: created and ran"),
        (["CPUExecutionProvider"], "no: "),
    ],
)
def test_cuda_check_reports_what_the_session_got(
    monkeypatch: pytest.MonkeyPatch, session_providers: list[str], expected: str
) -> None:
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: _FakeSession(session_providers))
    monkeypatch.setattr("xrwatch.ortsession._cuda_driver_present", lambda: True)
    preloaded: list[bool] = []
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: preloaded.append(True), raising=False)
    check = cuda_session_check()
    assert check.value.startswith(expected)
    assert check.status == ("ok" if expected.startswith("yes") else "warn")
    assert preloaded, "doctor must preload CUDA/cuDNN from pip wheels, as the engine does"


def test_cuda_check_without_a_driver_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr("xrwatch.ortsession._cuda_driver_present", lambda: False)
    check = cuda_session_check()
    assert check.value == "no: no CUDA driver (libcuda) on this machine"
    assert check.status == "warn"


def test_cuda_check_without_a_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    check = cuda_session_check()
    assert check.value.startswith("no: this onnxruntime build has no CUDA provider")


def test_onnxruntime_row_names_the_build_not_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort, "get_device", lambda: "GPU")  # a CUDA build, on any machine
    rows = {c.item: c.value for c in collect_checks(cuda=False) if c.section == "onnxruntime"}
    assert "device" not in rows
    assert rows["build"].startswith("GPU (CUDA): can use an NVIDIA GPU; whether one is usable")
    monkeypatch.setattr(ort, "get_device", lambda: "CPU")
    rows = {c.item: c.value for c in collect_checks(cuda=False) if c.section == "onnxruntime"}
    assert rows["build"] == "CPU: runs on the CPU only"
