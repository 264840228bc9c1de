"""The code's layout (docs/README.md): which folders may import which, and only public names
crossing modules."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("service", "storage", "models", "loadtests", "client", "deploy", "tests")
MAY_IMPORT = {
    "service": ("storage", "models"),
    "storage": (),
    "models": (),
    "loadtests": ("service.config", "storage", "models", "tests.support"),
}


def _imports(folder: str) -> Iterator[tuple[Path, str, list[str]]]:
    """(file, module imported, names taken from it) for each absolute import of the project."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [a.name for a in node.names]
                if node.module.split(".")[0] in PROJECT:
                    yield path, node.module, names
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PROJECT:
                        yield path, alias.name, []


def _allowed(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def test_each_folder_imports_only_what_the_layout_allows() -> None:
    wrong = [
        f"{path.relative_to(ROOT)} imports {module}"
        for folder, allowed in MAY_IMPORT.items()
        for path, module, _ in _imports(folder)
        if module.split(".")[0] != folder and not _allowed(module, allowed)
    ]
    assert wrong == []


def test_only_public_names_cross_modules() -> None:
    private = [
        f"{path.relative_to(ROOT)}: from {module} import {name}"
        for folder in MAY_IMPORT
        for path, module, names in _imports(folder)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_the_checks_see_imports() -> None:
    """The walk finds the imports the service is known to make (a check that saw none would pass)."""
    found = {module for _, module, _ in _imports("service")}
    assert {"storage.jobs", "models.runtime"} <= found
