"""The SR builder process (:mod:`xrwatch.dicom.builder`): SRs built in a worker process are
the files an in-process build writes; errors come back typed; a worker that dies is
replaced; after close, builds run in the caller; a killed daemon leaves no worker behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.helpers.dicom_factory import write_dicom
from tests.helpers.procs import alive, descendants, ended, niceness
from xrwatch.dicom.builder import BuilderProcess, BuildError, BuildJob, Unbuildable, build

PROBS = {"Normal": 0.1, "Bacteria": 0.7, "Virus": 0.2}


def _job(tmp_path: Path, name: str = "a", **changes: object) -> BuildJob:
    src = tmp_path / "in" / f"{name}.dcm"
    src.parent.mkdir(exist_ok=True)
    sop = f"1.2.826.0.1.3680043.10.543.{abs(hash(name)) % 10**8}"
    write_dicom(
        src, sop_instance_uid=sop, study_instance_uid="1.2.3.4", series_instance_uid="1.2.3.4.5"
    )
    record = {"status": "ok", "label": "Bacteria", "probabilities": PROBS,
              "model_sha256": "ab" * 32, "flag": "", "study_instance_uid": "1.2.3.4"}  # fmt: skip
    values: dict[str, object] = dict(
        sources=(str(src),), source_sop_uid=sop, record=record, model_name="m.onnx",
        instance_number=3, reports=str(tmp_path / "rep"), rel=f"dicom/1.2.3.4/{sop}.SR.dcm",
    )  # fmt: skip
    values.update(changes)
    return BuildJob(**values)  # type: ignore[arg-type]


@pytest.fixture
def builder(tmp_path: Path) -> Iterator[BuilderProcess]:
    """A builder whose jobs write under ``tmp_path / "rep"``; closed after the test."""
    (tmp_path / "rep").mkdir()
    made = BuilderProcess()
    yield made
    made.close()


def _worker_pids(builder: BuilderProcess) -> list[int]:
    pool = builder._pool
    return list(pool._processes) if pool is not None and pool._processes else []


def test_a_worker_process_writes_the_sr_an_in_process_build_writes(
    tmp_path: Path, builder: BuilderProcess
) -> None:
    remote = builder.run(_job(tmp_path, "a"))
    pids = _worker_pids(builder)
    assert pids and os.getpid() not in pids  # built elsewhere
    local = build(_job(tmp_path, "b"))
    builder.close()
    for built in (remote, local):
        [(uid, rel)] = built.written
        sr = pydicom.dcmread(tmp_path / "rep" / rel)
        assert sr.SOPInstanceUID == uid and sr.Modality == "SR"
        assert sr.StudyInstanceUID == "1.2.3.4"
    assert not any(alive(p) for p in pids)  # close ended the worker


def test_errors_come_back_typed_with_their_message(tmp_path: Path, builder: BuilderProcess) -> None:
    with pytest.raises(BuildError, match="no longer in INCOMING or the archive"):
        builder.run(_job(tmp_path, "gone", sources=(str(tmp_path / "nothing.dcm"),)))
    with pytest.raises(Unbuildable, match="does not resolve to a file under"):
        builder.run(_job(tmp_path, "out", rel="../../elsewhere.SR.dcm"))


def test_a_dead_worker_is_replaced_and_after_close_builds_run_here(
    tmp_path: Path, builder: BuilderProcess
) -> None:
    builder.run(_job(tmp_path, "a"))
    [first] = _worker_pids(builder)
    os.kill(first, signal.SIGKILL)
    ended(first)
    built = builder.run(_job(tmp_path, "b"))  # a new worker (or, at worst, one retry)
    assert len(built.written) == 1
    [second] = _worker_pids(builder)
    assert second != first
    builder.close()
    assert builder._pool is None
    assert len(builder.run(_job(tmp_path, "c")).written) == 1  # closed: built in this process
    assert builder._pool is None


def test_the_worker_ignores_the_daemons_sigterm(tmp_path: Path, builder: BuilderProcess) -> None:
    builder.run(_job(tmp_path, "a"))
    [pid] = _worker_pids(builder)
    os.kill(pid, signal.SIGTERM)  # as systemd signals the whole control group
    time.sleep(0.3)
    assert alive(pid)
    assert len(builder.run(_job(tmp_path, "b")).written) == 1
    assert _worker_pids(builder) == [pid]


def test_a_killed_daemon_leaves_no_builder_process_behind(folders, daemons) -> None:
    from serve_harness import wait_for

    incoming, reports = folders
    d = daemons(incoming, reports, "--dicom-sr").start()
    write_dicom(incoming / "a.dcm")
    wait_for(lambda: list((reports / "dicom").rglob("*.SR.dcm")), 90, "its SR")
    helpers = descendants(d.proc.pid)
    assert helpers, "the SR was built in a worker process under the daemon"
    d.kill9()
    wait_for(lambda: not any(alive(p) for p in helpers), 30, "the builder processes gone")


def test_start_brings_the_worker_up_before_the_first_sr(
    tmp_path: Path, builder: BuilderProcess
) -> None:
    builder.start()  # returns at once; the worker comes up meanwhile
    deadline = time.monotonic() + 60
    while not _worker_pids(builder) and time.monotonic() < deadline:
        time.sleep(0.05)
    [pid] = _worker_pids(builder)
    assert alive(pid)
    assert len(builder.run(_job(tmp_path, "a")).written) == 1
    assert _worker_pids(builder) == [pid]  # the job ran in the worker started early


def test_the_worker_builds_below_the_daemons_priority(
    tmp_path: Path, builder: BuilderProcess
) -> None:
    """SRs get the CPU that receiving, decoding and the model leave (niceness +10)."""
    from xrwatch.dicom.builder import NICENESS

    builder.run(_job(tmp_path, "a"))
    [pid] = _worker_pids(builder)
    assert niceness(pid) == min(niceness(os.getpid()) + NICENESS, 19)
