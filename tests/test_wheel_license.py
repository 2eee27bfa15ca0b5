"""The wheel carries the LICENSE and an SPDX license expression, and builds without
setuptools' deprecation warnings (``project.license`` as a table stops building in 2027)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
)


def test_license_file_is_the_apache_2_0_text() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_pyproject_uses_an_spdx_license_and_a_setuptools_that_reads_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_wheel_builds_without_deprecation_warnings_and_ships_the_license(
    tmp_path: Path,
) -> None:
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)  # a clean tree: no build/ left in ROOT
    out = tmp_path / "dist"
    out.mkdir()
    result = subprocess.run(
        [
            sys.executable, "-W", "always", "-c",
            "import sys; from setuptools import build_meta; "
            "print(build_meta.build_wheel(sys.argv[1]))",
            str(out),
        ],
        cwd=src, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "deprecated" not in log.lower(), log
    wheel = out / result.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(f"{info}/METADATA").decode()
        license_text = zf.read(f"{info}/licenses/LICENSE").decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()
    assert license_text == (ROOT / "LICENSE").read_text(encoding="utf-8")
    # issue 12 item 15: training/ and export/ install under names no user package shadows
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"xrwatch", "xrwatch_training", "xrwatch_export"}, top
    assert "xrwatch_training/engine.py" in names and "xrwatch_export/pipeline.py" in names
    for init in (ROOT / "xrwatch").rglob("__init__.py"):  # every subpackage is listed
        assert init.relative_to(ROOT).as_posix() in names, init
    assert "xrwatch/models/default.onnx" in names and "xrwatch/models/default.md" in names
    samples = ROOT / "xrwatch" / "samples"
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in samples.rglob("*") if p.is_file())
    # two X-rays per class of the shipped default (Normal, Bacteria, Virus) + ATTRIBUTION.md
    assert len(shipped) >= 7 and set(shipped) <= set(names)
    assert "xrwatch/samples/ATTRIBUTION.md" in shipped
    assert "would be ignored" not in log, log  # every importable-looking folder is listed


def test_a_users_own_training_and_export_packages_do_not_shadow_ours(tmp_path: Path) -> None:
    """Run from a folder holding a user's own ``training`` and ``export`` packages (the
    working directory comes first on sys.path): xrwatch's commands still use its own."""
    for name in ("training", "export"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s {name}')\n")
    result = subprocess.run(
        [sys.executable, "-m", "xrwatch", "synth", str(tmp_path / "synth"), "--scale", "0.002",
         "--image-size", "32"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the user's" not in result.stdout + result.stderr
    assert any((tmp_path / "synth").rglob("*.jpeg"))
