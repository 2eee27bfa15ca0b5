"""xrwatch against a real Triton Inference Server on loopback (no mock).

The server is the ``tritonserver`` bundled in ``nvidia-pytriton``, run from a server
environment (docs/triton.md: ``XRWATCH_TRITON_ENV``, default ``../tritonenv``), hosting the
exported model behind Triton's Python backend with ONNX Runtime. Skipped, with the reason,
when ``tritonclient`` or the server environment is missing (CI installs neither).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from xrwatch.cli._app import EXIT_ERROR, EXIT_FAILED, EXIT_OK, main
from xrwatch.defaults import resolve_model
from xrwatch.engine import InferenceEngine, Prediction
from xrwatch.errors import ConfigError, ModelError
from xrwatch.inputs import expand_inputs
from xrwatch.serve.config import ServeConfig
from xrwatch.serve.daemon import Daemon

pytest.importorskip("tritonclient.grpc", reason="needs the 'triton' extra (tritonclient[grpc])")

from xrwatch.remote.localserver import LocalTriton, default_env_root, find_server_env, free_port
from xrwatch.remote.repository import (
    KEY_MODEL_SHA256,
    write_python_repository,
)
from xrwatch.remote.triton import TritonEngine, parse_model, parse_urls

SAMPLES = Path(__file__).resolve().parents[2] / "xrwatch" / "samples"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def server_env():
    root = default_env_root()
    if root is None:
        pytest.skip("no Triton server environment: set XRWATCH_TRITON_ENV (docs/triton.md)")
    try:
        return find_server_env(root)
    except ConfigError as exc:
        pytest.skip(f"Triton server environment unusable: {exc}")


def _launcher(env, tmp_path_factory, started: list[LocalTriton]) -> Callable[..., LocalTriton]:
    def start(repository: Path, port: int | None = None) -> LocalTriton:
        server = LocalTriton(env, repository, tmp_path_factory.mktemp("triton"), port=port)
        started.append(server)
        return server.start(timeout=120)

    return start


@pytest.fixture
def start_server(server_env, tmp_path_factory) -> Iterator[Callable[..., LocalTriton]]:
    """Start servers for one test; each is stopped (SIGKILL at worst) when the test ends."""
    started: list[LocalTriton] = []
    yield _launcher(server_env, tmp_path_factory, started)
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def default_server(server_env, tmp_path_factory, default_repo: Path) -> Iterator[LocalTriton]:
    """One server of the shipped default for the module's tests."""
    started: list[LocalTriton] = []
    yield _launcher(server_env, tmp_path_factory, started)(default_repo)
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def default_model() -> Path:
    return resolve_model(None)


@pytest.fixture(scope="module")
def default_repo(default_model: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_python_repository(root, default_model, name="xrwatch", max_batch_size=16)
    return root


def local_meta_precision(model: Path) -> str:
    from xrwatch.modelmeta import read_model_metadata

    return read_model_metadata(model).precision


def _samples() -> list[Path]:
    return expand_inputs([SAMPLES])


def assert_same(local: list[Prediction], remote: list[Prediction]) -> None:
    """Same files, labels, flags and (within TOLERANCE) probabilities and guard scores."""
    assert [p.file for p in local] == [p.file for p in remote]
    for a, b in zip(local, remote, strict=True):
        assert (a.status, a.label, a.flag, a.flag_reason, a.sha256, a.model_sha256) == (
            b.status,
            b.label,
            b.flag,
            b.flag_reason,
            b.sha256,
            b.model_sha256,
        ), a.file
        assert a.probabilities.keys() == b.probabilities.keys()
        for name, p in a.probabilities.items():
            assert abs(p - b.probabilities[name]) <= TOLERANCE, (a.file, name)
        if a.ood_score is None:
            assert b.ood_score is None
        else:
            assert b.ood_score is not None and abs(a.ood_score - b.ood_score) <= TOLERANCE


def test_urls_and_model_names_are_parsed_or_refused() -> None:
    assert parse_urls("grpc://a:8001, grpc://b:9001/") == ("a:8001", "b:9001")
    assert parse_urls("gpu-node") == ("gpu-node:8001",)
    assert parse_model("xrwatch") == ("xrwatch", None)
    assert parse_model("xrwatch:3") == ("xrwatch", "3")
    for bad in ("http://a:8000", "grpc://a:x", ",", "grpc://a:1,grpc://a:1"):
        with pytest.raises(ConfigError):
            parse_urls(bad)
    with pytest.raises(ConfigError):
        parse_model("xrwatch:latest")


def test_config_carries_the_metadata_and_pins_the_version(default_repo: Path) -> None:
    text = (default_repo / "xrwatch" / "config.pbtxt").read_text()
    assert "version_policy: { specific: { versions: [ 1 ] } }" in text
    assert 'key: "xrwatch.model_version" value: { string_value: "1" }' in text
    assert f'key: "{KEY_MODEL_SHA256}"' in text
    assert 'name: "ood_score" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] }' in text


def test_default_model_through_triton_matches_local(
    default_server: LocalTriton, default_model: Path, tmp_path: Path
) -> None:
    """Labels, probabilities, flags, guard scores and heatmap files as a local run."""
    files = _samples()
    local = InferenceEngine(default_model, use_gpu=False).predict_paths(
        files, batch_size=3, heatmaps=tmp_path / "local", root=SAMPLES
    )
    engine = TritonEngine(default_server.url, "xrwatch")
    try:
        assert engine.model_sha256 == local[0].model_sha256
        # the shipped default's own precision (fp32 for the paediatric default, #20)
        assert engine.meta.precision == local_meta_precision(default_model)
        assert engine.has_cam and engine.has_guard
        remote = engine.predict_paths(
            files, batch_size=3, heatmaps=tmp_path / "remote", root=SAMPLES
        )
    finally:
        engine.close()
    assert_same(local, remote)
    heatmaps = sorted(
        p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.png")
    )
    assert len(heatmaps) == sum(p.ok for p in local) == len(files) - 1  # and ATTRIBUTION.md
    for rel in heatmaps:
        assert (tmp_path / "local" / rel).read_bytes() == (tmp_path / "remote" / rel).read_bytes()


def test_fp32_model_without_guard_matches_local(
    start_server, tiny_onnx_model: Path, tmp_path: Path
) -> None:
    """A second model: fp32, 32 px, its own classes and preprocessing from the server."""
    repo = tmp_path / "repo"
    write_python_repository(repo, tiny_onnx_model, name="tiny")
    server = start_server(repo)
    files = _samples()
    local = InferenceEngine(tiny_onnx_model, use_gpu=False).predict_paths(files, batch_size=4)
    engine = TritonEngine([server.url], "tiny")
    try:
        assert engine.spec.size == 32 and engine.meta.precision == "fp32"
        remote = engine.predict_paths(files, batch_size=4)
    finally:
        engine.close()
    assert_same(local, remote)


def test_served_model_must_be_the_expected_one(
    default_server: LocalTriton, default_model: Path
) -> None:
    with pytest.raises(ModelError, match="expected version 2"):
        TritonEngine(default_server.url, "xrwatch", version="2", retry_for=0)
    with pytest.raises(ModelError, match="expected " + "0" * 64):
        TritonEngine(default_server.url, "xrwatch", expect_sha256="0" * 64, retry_for=0)
    with pytest.raises(ModelError, match="no Triton server serves model 'other'"):
        TritonEngine(default_server.url, "other", retry_for=0)


def test_a_fleet_serving_two_models_is_refused(
    start_server, default_server: LocalTriton, default_model: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    write_python_repository(repo, default_model)
    write_python_repository(repo, default_model)  # version 2: the config now pins it
    second = start_server(repo)
    with pytest.raises(ModelError, match=r"serves version 2 .* but the fleet serves version 1"):
        TritonEngine([default_server.url, second.url], "xrwatch", retry_for=0)
    engine = TritonEngine(second.url, "xrwatch", version="2", retry_for=0)
    engine.close()


def test_kill9_of_one_server_the_other_takes_over(
    start_server, default_repo: Path, default_model: Path
) -> None:
    """Between batches and during one: every file classified once, as locally."""
    a, b = start_server(default_repo), start_server(default_repo)
    files = _samples()
    local = InferenceEngine(default_model, use_gpu=False).predict_paths(files, batch_size=2)
    engine = TritonEngine([a.url, b.url], "xrwatch", timeout=30, retry_for=60)
    try:
        first = engine.predict_paths(files[:2], batch_size=2)
        a.kill9()
        rest = engine.predict_paths(files[2:], batch_size=1)  # round robin reaches a: it fails
        states = {s["url"]: s for s in engine.fleet.servers()}
        registry = CollectorRegistry()
        registry.register(engine.collector())
        metrics = generate_latest(registry).decode()
        healthy, why = engine.health()
    finally:
        engine.close()
    assert f'xrwatch_triton_server_ready{{server="{a.url}"}} 0.0' in metrics
    assert f'xrwatch_triton_server_ready{{server="{b.url}"}} 1.0' in metrics
    assert f'xrwatch_triton_errors_total{{server="{a.url}"}} 1.0' in metrics
    assert f'xrwatch_triton_request_seconds_count{{server="{b.url}"}}' in metrics
    assert healthy and why == "1/2 server(s) usable"
    assert_same(local, first + rest)
    assert states[a.url]["errors"] >= 1 and states[a.url]["state"] in ("backing_off", "failing")
    assert states[b.url]["errors"] == 0 and states[b.url]["requests"] >= len(files) - 2


def test_a_restarted_server_is_checked_and_used_again(
    start_server, default_repo: Path, default_model: Path
) -> None:
    """One server, kill -9 while the engine is in use, restarted on its port: the engine
    waits (back-off), checks the model again, and finishes with nothing lost."""
    server = start_server(default_repo)
    files = _samples()
    local = InferenceEngine(default_model, use_gpu=False).predict_paths(files, batch_size=2)
    engine = TritonEngine(server.url, "xrwatch", timeout=30, retry_for=120)
    results: list[Prediction] = []
    error: list[BaseException] = []
    killed = threading.Event()

    def classify() -> None:
        try:
            results.extend(engine.predict_paths(files[:2], batch_size=2))
            killed.wait(60)
            results.extend(engine.predict_paths(files[2:], batch_size=2))
        except BaseException as exc:  # reported by the test thread
            error.append(exc)

    worker = threading.Thread(target=classify)
    worker.start()
    try:
        server.kill9()
        killed.set()
        server.start(timeout=120)  # same port
        worker.join(180)
        assert not worker.is_alive()
    finally:
        killed.set()
        engine.close()
    assert not error, error
    assert_same(local, results)
    served = engine.fleet.servers()[0]
    assert served["state"] == "ready" and served["requests"] >= len(files) // 2


def test_batches_larger_than_the_servers_limit_are_split(
    default_server: LocalTriton, default_model: Path
) -> None:
    rng = np.random.default_rng(0)
    local = InferenceEngine(default_model, use_gpu=False)
    size = local.spec.size
    batch = rng.random((37, size, size), dtype=np.float32)  # the repository's limit is 16
    engine = TritonEngine(default_server.url)
    try:
        assert engine.fleet.max_batch == 16
        for n in (1, 16, 37):
            a, b = local.predict_outputs(batch[:n]), engine.predict_outputs(batch[:n])
            np.testing.assert_allclose(b.probabilities, a.probabilities, atol=TOLERANCE, rtol=0)
            assert a.cam is not None and b.cam is not None
            np.testing.assert_allclose(b.cam, a.cam, atol=TOLERANCE, rtol=0)
            assert a.ood_score is not None and b.ood_score is not None
            assert b.ood_score.shape == (n,)
            np.testing.assert_allclose(b.ood_score, a.ood_score, atol=TOLERANCE, rtol=0)
    finally:
        engine.close()


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_command_through_triton(
    default_server: LocalTriton, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["classify", str(SAMPLES), "--format", "json", "--cpu"]
    code, out, _ = _cli(args, capsys)
    local = json.loads(out)
    code_r, out_r, _ = _cli([*args, "--triton", default_server.url], capsys)
    remote = json.loads(out_r)
    assert code == code_r == EXIT_FAILED  # ATTRIBUTION.md is not an image
    assert len(local) == len(remote) == 7  # 6 samples (#20: no COVID-19) + ATTRIBUTION.md
    for a, b in zip(local, remote, strict=True):
        pa, pb = a.pop("probabilities"), b.pop("probabilities")
        assert pa.keys() == pb.keys()
        assert all(abs(pa[k] - pb[k]) <= TOLERANCE for k in pa), a["file"]
        for key in ("confidence", "ood_score"):
            if a[key] is not None:
                assert abs(a.pop(key) - b.pop(key)) <= TOLERANCE
        assert a == b


def test_evaluate_command_through_triton(
    default_server: LocalTriton, capsys: pytest.CaptureFixture[str]
) -> None:
    ev = ["evaluate", str(SAMPLES), "--json", "--replicates", "20", "--cpu"]
    code, out, _ = _cli(ev, capsys)
    code_r, out_r, _ = _cli(
        [*ev, "--triton", default_server.url, "--triton-model", "xrwatch:1"], capsys
    )
    assert code == code_r == EXIT_OK
    a, b = json.loads(out), json.loads(out_r)
    assert a["metrics"]["confusion_matrix"] == b["metrics"]["confusion_matrix"]
    assert a["model"]["sha256"] == b["model"]["sha256"]


def test_classify_refuses_a_fleet_serving_another_file(
    default_server: LocalTriton,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = tmp_path / "other.onnx"
    other.write_bytes(b"not the served model")
    code, _, err = _cli(
        ["classify", str(SAMPLES), "--triton", default_server.url, "--model", str(other)], capsys
    )
    assert code == EXIT_ERROR
    assert "expected" in err and "sha256" in err, err


def _rows(reports: Path) -> list[dict[str, str]]:
    path = reports / "predictions.csv"
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _wait(pred: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_daemon_kill9_of_servers_loses_and_duplicates_nothing(
    start_server, default_repo: Path, default_model: Path, real_images: list[Path], tmp_path: Path
) -> None:
    """The daemon on a two-server fleet: kill -9 one mid-run, bring it back, kill -9 the
    other: every file is reported exactly once, with the local engine's results."""
    a, b = start_server(default_repo), start_server(default_repo)
    chosen = real_images[::5][:24]
    incoming, reports = tmp_path / "in", tmp_path / "reports"
    incoming.mkdir()
    config = ServeConfig(
        incoming, default_model, reports, stable_seconds=0.2, max_wait=0.05, batch_size=2
    )
    engines: list[TritonEngine] = []

    def factory(cfg: ServeConfig) -> TritonEngine:
        engine = TritonEngine(
            [a.url, b.url],
            timeout=30,
            retry_for=20,  # then the daemon's own retry (files stay claimed)
            low_confidence=cfg.low_confidence,
            scope_guard=cfg.scope_guard,
        )
        engines.append(engine)
        return engine

    daemon = Daemon(config, engine_factory=factory)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert daemon.ready.wait(60)

        def drop(first: int, last: int) -> None:
            for n in range(first, last):  # complete files appear by rename
                part = incoming / f".part-{n}"
                shutil.copyfile(chosen[n], part)
                os.replace(part, incoming / f"{n:02d}-{chosen[n].name}")

        drop(0, 6)
        _wait(lambda: len(_rows(reports)) >= 2, "the first results")
        a.kill9()  # while the daemon runs, maybe with a batch in flight
        drop(6, 12)  # inferred after the kill: round robin sends some to a, which fails
        _wait(lambda: len(_rows(reports)) >= 12, "the rest, from the other server")
        a.start(timeout=120)  # same port: checked again before it is used
        b.kill9()
        before = {s["url"]: s["requests"] for s in engines[0].fleet.servers()}
        drop(12, len(chosen))
        _wait(lambda: len(_rows(reports)) >= len(chosen), "every result")
    finally:
        daemon.request_stop()
        runner.join(120)
        for engine in engines:
            engine.close()
    assert not runner.is_alive()
    rows = _rows(reports)
    names = sorted(Path(r["file"]).name for r in rows)
    assert names == sorted(f"{n:02d}-{src.name}" for n, src in enumerate(chosen))  # once each
    local = InferenceEngine(default_model, use_gpu=False)
    expected = {
        Path(p.file).name: p for p in local.predict_paths(sorted(incoming.iterdir()), batch_size=4)
    }
    for row in rows:
        want = expected[Path(row["file"]).name]
        assert row["status"] == want.status == "ok"
        assert row["label"] == want.label and row["flag"] == want.flag
        assert row["provider"] == "triton"
        for cls, p in want.probabilities.items():
            assert abs(float(row[f"prob_{cls}"]) - p) <= TOLERANCE + 1e-6, row["file"]
    servers = {s["url"]: s for s in engines[0].fleet.servers()}
    assert servers[a.url]["errors"] >= 1 and servers[b.url]["errors"] >= 1
    assert servers[a.url]["requests"] > before[a.url]  # the restarted server took over


def test_doctor_checks_each_server(
    default_server: LocalTriton, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"grpc://127.0.0.1:{free_port()}"
    argv = ["doctor", "--json", "--no-cuda", "--triton", f"{default_server.url},{dead}"]
    code, out, _ = _cli(argv, capsys)
    rows = {r["item"]: r for r in json.loads(out) if r["section"] == "triton"}
    assert rows[default_server.url]["status"] == "ok"
    assert "version 1" in rows[default_server.url]["value"]
    assert "one image in" in rows[default_server.url]["value"]
    assert rows[dead]["status"] == "fail" and "unusable" in rows[dead]["value"]
    assert code == EXIT_FAILED
    code, out, _ = _cli([*argv[:-1], default_server.url], capsys)
    assert [r["status"] for r in json.loads(out) if r["section"] == "triton"] == ["ok"]


def test_a_hung_server_times_out_and_the_other_answers(
    start_server, default_repo: Path, default_model: Path
) -> None:
    """SIGSTOP one of two servers: its requests time out, the batches go to the other."""
    a, b = start_server(default_repo), start_server(default_repo)
    files = _samples()
    local = InferenceEngine(default_model, use_gpu=False).predict_paths(files, batch_size=2)
    engine = TritonEngine([a.url, b.url], "xrwatch", timeout=2.0, retry_for=60)
    try:
        a.pause()
        try:
            remote = engine.predict_paths(files, batch_size=2)
            states = {s["url"]: s for s in engine.fleet.servers()}
        finally:
            a.resume()
    finally:
        engine.close()
    assert_same(local, remote)
    assert states[a.url]["errors"] >= 1 and "DEADLINE_EXCEEDED" in states[a.url]["last_error"]
    images = sum(p.ok for p in local)  # ATTRIBUTION.md is never sent
    assert states[b.url]["requests"] == images // 2  # b answered every batch of two


@pytest.mark.slow
def test_exported_int8_model_with_population_gate_matches_local(
    start_server, tmp_path_factory, tmp_path: Path
) -> None:
    """A fresh int8 export of the default's recipe (tiny): its population output and
    out_of_population flags come through Triton as they come locally."""
    pytest.importorskip("torch")
    from tests.training.pedfixture import write_fake_shared
    from xrwatch_export.pipeline import ExportOptions, export_model
    from xrwatch_training.default_recipe import DefaultConfig, train_default

    root = tmp_path_factory.mktemp("gated")
    shared = write_fake_shared(root / "shared", per_class=8)
    cfg = DefaultConfig(data=str(shared), arch="tinycnn", image_size=32, epochs=1,
                        batch_size=8, max_steps_per_epoch=2, cache_dir=str(root / "cache"),
                        threads=1)  # fmt: skip
    run = train_default(cfg, root / "run")
    result = export_model(
        ExportOptions(source=run / "best.pt", output=root / "out" / "model.onnx",
                      int8=True, calibration=(shared / "real",), min_int8_agreement=0.0,
                      temperature=1.0, temperature_reason="test: tiny run")
    )  # fmt: skip
    int8 = result.variant("int8").path
    repo = tmp_path / "repo"
    write_python_repository(repo, int8, name="gated")
    server = start_server(repo)
    files = [*_samples(), *expand_inputs([shared / "real"])[:12]]
    local_engine = InferenceEngine(int8, use_gpu=False)
    local = local_engine.predict_paths(files, batch_size=4)
    engine = TritonEngine(server.url, "gated")
    try:
        assert engine.meta.precision == "int8" and engine.has_population
        assert engine.population_threshold == local_engine.population_threshold
        remote = engine.predict_paths(files, batch_size=4)
        x = np.stack([np.zeros((32, 32), np.float32), np.full((32, 32), 0.5, np.float32)])
        a, b = local_engine.predict_outputs(x), engine.predict_outputs(x)
    finally:
        engine.close()
    assert_same(local, remote)
    assert a.population is not None and b.population is not None
    assert b.population.shape == (2,)
    np.testing.assert_allclose(b.population, a.population, atol=TOLERANCE, rtol=0)


def _images(folder: Path) -> None:
    folder.mkdir(parents=True)
    for n, src in enumerate(p for p in _samples() if p.suffix != ".md"):
        shutil.copyfile(src, folder / f"{n}-{src.name}")


def test_serve_once_through_triton_matches_local(default_server: LocalTriton, tmp_path) -> None:
    """``xrwatch serve --once --triton``: the local run's rows and heatmap files."""
    incoming = tmp_path / "in"
    _images(incoming)
    base = [sys.executable, "-m", "xrwatch", "serve", str(incoming), "--once",
            "--stable-seconds", "0.1", "--batch-size", "3"]  # fmt: skip
    runs = {}
    for kind, extra in (
        ("local", ["--provider", "cpu"]),
        ("triton", ["--triton", default_server.url]),
    ):
        reports = tmp_path / kind
        done = subprocess.run(
            [*base, "--reports", str(reports), *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs[kind] = {Path(r["file"]).name: r for r in _rows(reports)}
    local, remote = runs["local"], runs["triton"]
    assert sorted(local) == sorted(remote) and len(local) == 6
    for name, a in local.items():
        b = remote[name]
        assert (a["status"], a["label"], a["flag"], a["model_sha256"]) == (
            b["status"], b["label"], b["flag"], b["model_sha256"],
        )  # fmt: skip
        for key in (k for k in a if k.startswith("prob_")):
            assert abs(float(a[key]) - float(b[key])) <= TOLERANCE + 1e-6, (name, key)
        assert b["provider"] == "triton" and b["model"].endswith("(triton:xrwatch@1)")
    pngs = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.png"))
    assert len(pngs) == 6
    for rel in pngs:
        assert (tmp_path / "local" / rel).read_bytes() == (tmp_path / "triton" / rel).read_bytes()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_serve_health_status_and_metrics_show_the_fleet(
    start_server, default_repo: Path, default_model: Path, tmp_path: Path
) -> None:
    """/healthz, the status line and /metrics follow the server: killed, then back."""
    server = start_server(default_repo)
    incoming, reports = tmp_path / "in", tmp_path / "reports"
    incoming.mkdir()
    port = free_port()
    config = ServeConfig(
        incoming, default_model, reports, stable_seconds=0.2, max_wait=0.05,
        metrics_port=port, triton=(server.url,),
    )  # fmt: skip
    daemon = Daemon(config)  # load_engine: the Triton engine, from the config
    runner = threading.Thread(target=daemon.run)
    runner.start()
    sources = [p for p in _samples() if p.suffix != ".md"]
    try:
        assert daemon.ready.wait(60)
        shutil.copyfile(sources[0], incoming / "a.jpeg")
        _wait(lambda: len(_rows(reports)) == 1, "the first result")
        code, text = _get(port, "/healthz")
        assert code == 200 and text.strip() == "ok; triton: 1/1 server(s) usable"
        assert "provider triton (1/1 server(s) usable)" in daemon.status_line()
        _, metrics = _get(port, "/metrics")
        assert f'xrwatch_triton_server_ready{{server="{server.url}"}} 1.0' in metrics
        assert f'xrwatch_triton_request_seconds_count{{server="{server.url}"}} 1.0' in metrics

        server.kill9()
        shutil.copyfile(sources[1], incoming / "b.jpeg")
        _wait(lambda: _get(port, "/healthz")[0] == 503, "/healthz to see the dead server")
        assert "unhealthy: triton: no server usable" in _get(port, "/healthz")[1]
        server.start(timeout=120)  # same port: the pipeline's retry gets the file through
        _wait(lambda: len(_rows(reports)) == 2, "the file held while the server was down")
        assert _get(port, "/healthz") == (200, "ok; triton: 1/1 server(s) usable\n")
    finally:
        daemon.request_stop()
        runner.join(120)
        daemon.engine.close()
    assert not runner.is_alive()
    assert sorted(r["file"].rsplit("/", 1)[-1] for r in _rows(reports)) == ["a.jpeg", "b.jpeg"]


def test_a_server_that_appears_with_another_version_is_never_used(
    start_server, server_env, default_repo: Path, default_model: Path, tmp_path: Path
) -> None:
    """A server unreachable at start, then up with version 2: refused, never sent a batch."""
    a = start_server(default_repo)
    other = tmp_path / "repo2"
    write_python_repository(other, default_model)
    write_python_repository(other, default_model)  # the config pins version 2
    late = LocalTriton(server_env, other, tmp_path / "late")
    (tmp_path / "late").mkdir()
    files = _samples()
    local = InferenceEngine(default_model, use_gpu=False).predict_paths(files, batch_size=1)
    engine = TritonEngine([a.url, late.url], "xrwatch", retry_for=30)
    try:
        assert [s["state"] for s in engine.fleet.servers()] == ["ready", "unverified"]
        late.start(timeout=120)
        remote = engine.predict_paths(files, batch_size=1)  # every other batch tries it first
        states = {s["url"]: s for s in engine.fleet.servers()}
    finally:
        engine.close()
        late.stop()
    assert_same(local, remote)
    assert states[late.url]["state"] == "refused" and states[late.url]["requests"] == 0
    assert "serves version 2" in states[late.url]["last_error"]
    assert states[a.url]["requests"] == sum(p.ok for p in local)
