"""The README stays short and runs the commands CI runs; the documentation site and the
deploy folder point at files that exist and start from the shipped model."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FIRST_SCREEN = 40  # lines


def _ci_quickstart() -> list[str]:
    """The commands .ci/run marks "keep identical to README.md"."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if "keep identical to README.md" in line]


def test_readme_is_short_and_opens_with_the_quickstart() -> None:
    assert README.stat().st_size <= 12 * 1024
    commands = _ci_quickstart()
    assert len(commands) == 2
    first = README.read_text(encoding="utf-8").splitlines()[:FIRST_SCREEN]
    for command in commands:
        assert command in first, f"not on the README's first screen: {command}"
    assert any(line.strip() == ".venv/bin/xrwatch demo" for line in first)


def test_readme_and_docs_links_resolve() -> None:
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: {target}"


def test_every_nav_page_exists() -> None:
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert len(nav) >= 12
    for page in nav:
        assert (ROOT / "docs" / page).is_file(), page


def test_deploy_starts_from_the_shipped_model() -> None:
    from xrwatch import defaults
    from xrwatch.serve.config import load_serve_config

    config = load_serve_config(ROOT / "deploy" / "xrwatch.toml", {})
    assert config.model == defaults.default_model()
    guide = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    install = guide[guide.index("## Install") : guide.index("## Start, stop, follow")]
    assert "model.onnx" not in install and "xrwatch export" not in install
