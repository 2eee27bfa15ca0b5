"""Decoding in worker processes (:mod:`xrwatch.serve.decoders`): the model input and meta a
worker gives are the ones a thread gives; errors come back typed, log lines come back to
the daemon's log; a worker that dies is replaced, a file that kills its worker twice is an
error naming it and the next file decodes; ``auto`` means processes with a DICOM port; a
daemon decoding in processes writes the reports a daemon decoding in threads writes, and
leaves no worker behind when killed."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.decoding import KILLER, ODD, decode_or_die
from tests.helpers.dicom_factory import gradient, truncate, write_dicom
from tests.helpers.procs import alive, children, descendants, ended, niceness
from xrwatch.errors import ImageDecodeError, TruncatedImageError, UnsupportedImageError
from xrwatch.preprocess import PreprocessSpec, load_model_input
from xrwatch.serve.decoders import CRASHED, NICENESS, Decoders

SPEC = PreprocessSpec(size=64)


@pytest.fixture
def decoders() -> Iterator[Decoders]:
    made = Decoders(SPEC, "processes", dicom_port=False, work=decode_or_die)
    assert made.ready(120), "a decoder process starts"
    yield made
    made.close()


def _files(tmp_path: Path) -> list[Path]:
    made = [
        write_dicom(tmp_path / "a.dcm", pixels=gradient(300, 240, dtype=np.uint16)),
        write_dicom(tmp_path / "b.dcm", photometric="MONOCHROME1", window=(2000.0, 3000.0),
                    pixels=gradient(200, 260, dtype=np.uint16)),
    ]  # fmt: skip
    png = tmp_path / "c.png"
    Image.fromarray(gradient(180, 220, dtype=np.uint8)).save(png)
    return [*made, png]


def test_a_worker_process_gives_the_input_and_meta_a_thread_gives(
    tmp_path: Path, decoders: Decoders
) -> None:
    [pid] = decoders.pids()
    assert pid != os.getpid()
    for path in _files(tmp_path):
        data = path.read_bytes()
        array, meta = decoders.decode(path, data)
        want, want_meta = load_model_input(path, SPEC, data=data)
        assert array.dtype == want.dtype and np.array_equal(array, want), path.name
        assert meta == want_meta
    assert decoders.pids() == [pid]  # decoded there, by the one worker of this thread


def test_errors_come_back_typed_with_the_file_and_the_reason(
    tmp_path: Path, decoders: Decoders
) -> None:
    cut = truncate(write_dicom(tmp_path / "cut.dcm"), drop=2000)
    with pytest.raises(TruncatedImageError) as caught:
        decoders.decode(cut, cut.read_bytes())
    assert caught.value.path == str(cut) and caught.value.reason
    with pytest.raises(UnsupportedImageError, match="not a DICOM, PNG or JPEG file"):
        decoders.decode(tmp_path / "notes.txt", b"just some text, no image at all" * 20)


def test_the_workers_log_lines_are_logged_by_the_daemon(
    tmp_path: Path, decoders: Decoders, caplog: pytest.LogCaptureFixture
) -> None:
    lut = write_dicom(
        tmp_path / "lut.dcm",
        pixels=gradient(64, 64, dtype=np.uint16),
        voi_lut=(0, 8, list(range(0, 4096, 4))),  # values far above its 8-bit descriptor
    )
    with caplog.at_level(logging.WARNING):
        decoders.decode(lut, lut.read_bytes())
    [record] = [r for r in caplog.records if "exceed its 8-bit descriptor" in r.getMessage()]
    assert record.name == "xrwatch.imageio.voi" and record.levelno == logging.WARNING


def test_a_worker_killed_between_files_is_replaced(tmp_path: Path, decoders: Decoders) -> None:
    path = _files(tmp_path)[0]
    [first] = decoders.pids()
    os.kill(first, signal.SIGKILL)
    assert ended(first)
    array, _ = decoders.decode(path, path.read_bytes())  # tried again in a new worker
    assert np.array_equal(array, load_model_input(path, SPEC)[0])
    [second] = decoders.pids()
    assert second != first


def test_a_file_that_kills_its_worker_twice_is_an_error_and_the_next_file_decodes(
    tmp_path: Path, decoders: Decoders
) -> None:
    [first] = decoders.pids()
    killer = tmp_path / "killer.dcm"
    with pytest.raises(ImageDecodeError) as caught:
        decoders.decode(killer, KILLER + b"\0" * 500)
    assert caught.value.path == str(killer) and caught.value.reason == CRASHED
    assert ended(first)
    path = _files(tmp_path)[2]
    array, meta = decoders.decode(path, path.read_bytes())
    assert meta.kind == "png" and array.shape == (64, 64)
    assert first not in decoders.pids()


def test_the_worker_ignores_the_daemons_sigterm(tmp_path: Path, decoders: Decoders) -> None:
    [pid] = decoders.pids()
    os.kill(pid, signal.SIGTERM)  # as systemd signals the whole control group
    path = _files(tmp_path)[0]
    decoders.decode(path, path.read_bytes())
    assert decoders.pids() == [pid] and alive(pid)


def test_after_close_decodes_run_in_the_thread_and_the_workers_end(
    tmp_path: Path, decoders: Decoders
) -> None:
    [pid] = decoders.pids()
    decoders.close()
    assert ended(pid)
    path = _files(tmp_path)[0]
    array, _ = decoders.decode(path, path.read_bytes())
    assert array.shape == (64, 64) and decoders.pids() == []


def test_auto_means_processes_with_a_dicom_port_and_threads_without() -> None:
    assert Decoders(SPEC, "auto", dicom_port=True).processes
    assert not Decoders(SPEC, "auto", dicom_port=False).processes
    assert Decoders(SPEC, "processes", dicom_port=False).processes
    assert not Decoders(SPEC, "threads", dicom_port=True).processes


def _rows(reports: Path) -> dict[str, tuple[str, dict[str, float]]]:
    rows = {}
    for path in (reports / "json").rglob("*.json"):
        record = json.loads(path.read_text())
        rows[record["file"]] = (record["status"], record.get("probabilities"))
    return rows


def test_a_daemon_decoding_in_processes_writes_what_one_decoding_in_threads_writes(
    tmp_path: Path, folders, daemons, tiny_onnx_model: Path
) -> None:
    from serve_harness import run_once, wait_for

    incoming, reports = folders
    d = daemons(incoming, reports, "--decode-in", "processes").start()
    first = write_dicom(incoming / "first.dcm")
    wait_for(lambda: (reports / "json" / "first.dcm.json").exists(), 90, "the first report")

    # the first decode started the workers (it ran in its thread meanwhile): the children
    # of the fork server (the daemon's other child, the resource tracker, has none)
    def workers() -> list[int]:
        return [k for c in children(d.proc.pid) for k in children(c)]

    wait_for(lambda: workers(), 90, "a decoder process")
    assert "2 worker(s) decode each in a process of its own (decode_in = processes)" in (
        d.log_text()
    )
    files = [first, *_files(tmp_path)]
    for path in files[1:]:
        os.link(path, incoming / path.name)
    wait_for(lambda: len(_rows(reports)) == 4, 90, "four reports")
    running = descendants(d.proc.pid)
    assert workers() and set(workers()) <= set(running)
    d.kill9()
    wait_for(lambda: not any(alive(p) for p in running), 30, "the decoder processes gone")

    again_in, again_rep = tmp_path / "in2", tmp_path / "rep2"
    again_in.mkdir()
    again_rep.mkdir()
    for path in files:
        os.link(path, again_in / path.name)
    done = run_once(again_in, again_rep, tiny_onnx_model, "--decode-in", "threads")
    assert done.returncode == 0, done.stderr
    got, want = _rows(reports), _rows(again_rep)
    assert got.keys() == want.keys() and {s for s, _ in got.values()} == {"ok"}
    for name, (_, probs) in got.items():  # batches may differ: equal to float32 rounding
        assert probs.keys() == want[name][1].keys()
        for label, p in probs.items():
            assert p == pytest.approx(want[name][1][label], abs=1e-5), (name, label)


def test_the_workers_decode_between_the_daemon_and_the_sr_builder(decoders: Decoders) -> None:
    """Behind the daemon's threads (reception, the model), ahead of the SR builder."""
    from xrwatch.dicom.builder import NICENESS as BUILDER

    [pid] = decoders.pids()
    assert niceness(pid) == min(niceness(os.getpid()) + NICENESS, 19)
    assert 0 < NICENESS < BUILDER


def test_an_error_that_cannot_come_back_as_it_is_says_its_type_and_message(
    tmp_path: Path, decoders: Decoders, caplog: pytest.LogCaptureFixture
) -> None:
    odd = tmp_path / "odd.dcm"
    with caplog.at_level(logging.ERROR), pytest.raises(ImageDecodeError) as caught:
        decoders.decode(odd, ODD + b"\0" * 100)
    assert caught.value.path == str(odd)
    assert caught.value.reason == (
        "unexpected error while decoding: TwoPartError: a library's own error and two arguments"
    )
    [record] = [r for r in caplog.records if "in the decoder process" in r.getMessage()]
    assert "Traceback" in record.getMessage() and "_odd" in record.getMessage()
    [pid] = decoders.pids()  # the worker lives on
    path = _files(tmp_path)[0]
    decoders.decode(path, path.read_bytes())
    assert decoders.pids() == [pid]


def test_each_decode_thread_has_a_worker_of_its_own(tmp_path: Path) -> None:
    import concurrent.futures as cf

    made = Decoders(SPEC, "processes", dicom_port=False)
    files = _files(tmp_path)
    try:
        with cf.ThreadPoolExecutor(2) as threads:
            assert all(threads.map(lambda _: made.ready(120), range(2)))
            outs = list(threads.map(lambda p: made.decode(p, p.read_bytes()), files * 4))
        assert len(set(made.pids())) == 2
        for path, (array, _) in zip(files * 4, outs, strict=True):
            assert np.array_equal(array, load_model_input(path, SPEC)[0])
    finally:
        made.close()
