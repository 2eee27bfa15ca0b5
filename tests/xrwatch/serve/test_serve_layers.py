"""The import direction of the serving rooms and of the layers below them, read from the
source with ``ast`` (imports inside functions included): ``xrwatch.serve`` sits above
``xrwatch.dicom`` and every other library module, and inside it the daemon wires the rooms,
which never import it."""

from __future__ import annotations

import ast
from pathlib import Path

import xrwatch

PACKAGE = Path(xrwatch.__file__).parent
ABOVE_SERVE = ("xrwatch.cli", "xrwatch.__main__")  # the commands run the daemon


def _module(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> set[str]:
    """Every module ``path`` (below the package ``root``) imports, as absolute names."""
    module = _module(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _sources(root: Path = PACKAGE) -> dict[str, set[str]]:
    return {_module(p, root): _imports(p, root) for p in sorted(root.rglob("*.py"))}


def _reaches(name: str, target: str) -> bool:
    return name == target or name.startswith(target + ".")


def _upward(sources: dict[str, set[str]]) -> list[str]:
    """Imports of ``xrwatch.serve`` from modules outside it and below the commands."""
    return sorted(
        f"{module} imports {name}"
        for module, names in sources.items()
        if not _reaches(module, "xrwatch.serve") and not module.startswith(ABOVE_SERVE)
        for name in names
        if _reaches(name, "xrwatch.serve")
    )


def test_nothing_below_serve_imports_it() -> None:
    sources = _sources()
    assert "xrwatch.dicom.outbox" in sources and "xrwatch.leases" in sources
    assert _upward(sources) == []


def test_the_rooms_never_import_the_daemon() -> None:
    sources = _sources()
    rooms = [m for m in sources if m.startswith("xrwatch.serve.") and m != "xrwatch.serve.daemon"]
    assert {"xrwatch.serve.intake", "xrwatch.serve.pipeline", "xrwatch.serve.liveness"} <= set(
        rooms
    )
    wrong = [
        f"{m} imports {n}" for m in rooms for n in sources[m] if _reaches(n, "xrwatch.serve.daemon")
    ]
    assert wrong == []


def test_the_check_finds_relative_and_nested_imports(tmp_path: Path) -> None:
    """An upward import inside a function, relative or absolute, is found."""
    root = tmp_path / "xrwatch"
    (root / "dicom").mkdir(parents=True)
    (root / "dicom" / "bad.py").write_text(
        "def f():\n    from ..serve import daemon\n    import xrwatch.serve.ledger\n"
    )
    (root / "dicom" / "good.py").write_text("from .files import PART_SUFFIX\n")
    assert _upward(_sources(root)) == [
        "xrwatch.dicom.bad imports xrwatch.serve",
        "xrwatch.dicom.bad imports xrwatch.serve.daemon",
        "xrwatch.dicom.bad imports xrwatch.serve.ledger",
    ]
    assert _imports(root / "dicom" / "good.py", root) == {
        "xrwatch.dicom.files",
        "xrwatch.dicom.files.PART_SUFFIX",
    }
