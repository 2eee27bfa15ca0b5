"""Every Python package of the source tree is installed: pyproject lists packages by hand,
so a new subpackage missing from the list installs without it (an editable install hides
that; ``pip install .``, as deploy/README.md does, then fails at the first import)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_in_the_setuptools_list() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    listed = set(config["setuptools"]["packages"])
    dirs = config["setuptools"].get("package-dir", {})
    roots = {"xrwatch": ROOT / "xrwatch", **{name: ROOT / path for name, path in dirs.items()}}
    found = set()
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)))
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
