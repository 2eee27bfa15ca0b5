"""DICOM settings, the receiver's access control and ``xrwatch dicom-echo`` (no external
tools: pynetdicom on both ends, on loopback)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dicom_tools import free_port

from tests.helpers.tools import require_tool
from xrwatch.cli._app import main
from xrwatch.dicom.outbox import Outbox, backoff
from xrwatch.dicom.scp import Receiver
from xrwatch.dicom.settings import Destination, parse_destination
from xrwatch.errors import ConfigError
from xrwatch.serve.config import load_serve_config


def test_parse_destination() -> None:
    assert parse_destination("PACS@10.1.2.3:104") == Destination("PACS", "10.1.2.3", 104)
    assert parse_destination("ORTHANC@[::1]:4242") == Destination("ORTHANC", "::1", 4242)
    assert str(parse_destination("ORTHANC@[::1]:4242")) == "ORTHANC@[::1]:4242"
    for bad in ("PACS@host", "host:104", "A_TITLE_LONGER_THAN_16@h:1", "P\\X@h:1", "P@h:0"):
        with pytest.raises(ConfigError, match=r"AE|port|look like"):
            parse_destination(bad)


def _cfg(tmp_path: Path, **values: object):
    base = {"incoming": tmp_path, "model": tmp_path / "m.onnx", "reports": tmp_path / "r"}
    return load_serve_config(None, {**base, **values})


def test_dicom_config_is_checked(tmp_path: Path) -> None:
    assert not _cfg(tmp_path).dicom_enabled
    cfg = _cfg(tmp_path, dicom_port=11112, dicom_allow_ae=["CR1"])
    assert cfg.dicom_enabled and cfg.ae_title == "XRWATCH"
    with pytest.raises(ConfigError, match="dicom_allow_ae"):
        _cfg(tmp_path, dicom_port=11112)
    with pytest.raises(ConfigError, match="once"):
        _cfg(tmp_path, dicom_port=11112, dicom_allow_ae=["CR1"], once=True)
    with pytest.raises(ConfigError, match="dicom_allow_hosts"):
        _cfg(tmp_path, dicom_port=11112, dicom_allow_ae=["CR1"], dicom_allow_hosts=["nope"])
    with pytest.raises(ConfigError, match="dicom_destinations"):
        _cfg(tmp_path, dicom_destinations=["PACS"])
    toml = tmp_path / "x.toml"
    toml.write_text(
        '[serve]\nincoming = "."\nmodel = "m.onnx"\nreports = "r"\ndicom_port = 11112\n'
        'dicom_allow_ae = ["CR1", "DX2"]\ndicom_destinations = ["PACS@10.0.0.5:104"]\n'
    )
    cfg = load_serve_config(toml, {})
    assert cfg.dicom_allow_ae == ("CR1", "DX2") and cfg.dicom_destinations == ("PACS@10.0.0.5:104",)


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert backoff(50) == 300.0


@pytest.fixture
def receiver(tmp_path: Path, request: pytest.FixtureRequest):
    (tmp_path / "state").mkdir()
    outbox = Outbox(tmp_path / "state" / "ledger.sqlite3")
    outbox.create()
    rx = Receiver(
        incoming=tmp_path,
        outbox=outbox,
        ae_title="XRWATCH",
        host="127.0.0.1",
        port=free_port(),
        allow_ae=("MODALITY",),
        **getattr(request, "param", {}),
    )
    rx.start()
    yield rx
    rx.stop()
    outbox.close()


def test_dicom_echo_command(receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    peer = f"XRWATCH@127.0.0.1:{receiver.port}"
    assert main(["dicom-echo", peer, "--ae-title", "MODALITY"]) == 0
    assert "C-ECHO succeeded" in capsys.readouterr().out
    assert main(["dicom-echo", peer, "--ae-title", "STRANGER"]) == 1
    assert "rejected" in capsys.readouterr().out
    assert main(["dicom-echo", f"X@127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert main(["dicom-echo", "not-a-peer"]) == 2


def test_associations_negotiate_on_copies_of_the_shared_uid_contexts(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    from xrwatch.dicom.pynetdicom_glue import SharedUIDContexts

    server = receiver._server
    assert isinstance(server.contexts, SharedUIDContexts)
    before = [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in server.contexts]
    peer = f"XRWATCH@127.0.0.1:{receiver.port}"
    for _ in range(3):  # each association gets its own copy; the server's stay as they were
        assert main(["dicom-echo", peer, "--ae-title", "MODALITY"]) == 0
    assert [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in server.contexts] == before


@pytest.mark.parametrize("receiver", [{"allow_hosts": ("10.0.0.0/8",)}], indirect=True)
def test_a_source_address_outside_the_allow_list_is_refused(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    peer = f"XRWATCH@127.0.0.1:{receiver.port}"
    assert main(["dicom-echo", peer, "--ae-title", "MODALITY"]) == 1
    # the receiver's thread may log the refusal just after the client has its answer
    deadline = time.monotonic() + 10
    while "source address not in dicom_allow_hosts" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.02)


def test_a_missing_tool_skips_or_fails_under_require_shared_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("XRWATCH_REQUIRE_SHARED_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y no-such-pkg"):
        require_tool("no-such-tool-xrw", "no-such-pkg")
    monkeypatch.setenv("XRWATCH_REQUIRE_SHARED_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-xrw not found"):
        require_tool("no-such-tool-xrw", "no-such-pkg")
