from __future__ import annotations

from pathlib import Path

from xrwatch import engine
from xrwatch.inputs import IGNORE_PATTERNS, expand_inputs, is_ignored
from xrwatch.serve.config import DEFAULT_IGNORE
from xrwatch.serve.watcher import is_ignored as watcher_is_ignored


def test_expand_inputs(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "x.dcm").write_bytes(b"\0" * 132)
    (tmp_path / "a" / ".hidden").write_text("skip me")
    (tmp_path / "top.png").write_bytes(b"")
    found = expand_inputs([tmp_path, tmp_path / "missing.jpg"])
    assert found == [nested / "x.dcm", tmp_path / "top.png", tmp_path / "missing.jpg"]


def test_folders_skip_the_names_the_daemon_ignores(tmp_path: Path) -> None:
    study = tmp_path / "study"
    (study / ".git").mkdir(parents=True)
    (study / ".git" / "blob.dcm").write_bytes(b"x")
    for name in ("DICOMDIR", "a.dcm.part", "b.tmp", "c.crdownload", "~lock.png", "img.dcm"):
        (study / name).write_bytes(b"x")
    assert expand_inputs([study]) == [study / "img.dcm"]
    # a file named directly is always kept: the user asked for it
    assert expand_inputs([study / "b.tmp"]) == [study / "b.tmp"]


def test_one_definition_of_ignored_names() -> None:
    assert DEFAULT_IGNORE == IGNORE_PATTERNS
    assert watcher_is_ignored is is_ignored
    assert engine.expand_inputs is expand_inputs  # still importable where export finds it
    assert is_ignored("sub/.hidden/x.dcm") and is_ignored("sub/x.dcm.part")
    assert not is_ignored("sub/x.dcm")
    assert is_ignored("x.dcm", ("*.dcm",)) and not is_ignored("x.dcm", ())
