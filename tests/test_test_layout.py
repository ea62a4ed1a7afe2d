"""tests/ is a package tree: helpers are imported by package path, never found via sys.path.

pytest runs with ``--import-mode=importlib``, which puts no test directory on
``sys.path``. A test that inserts its directory there, or imports a sibling by bare name
(``from conftest import ...``, ``from ota_helpers import ...``), works alone but breaks
when two directories' modules of the same name meet in one run (``pytest tests/client/
update tests/server/ota``). So every directory holding test code is a package, fixtures
stay in ``conftest.py``, and whatever a test imports lives in a helper module imported as
``tests.<path>.<module>``.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SOURCES = sorted(TESTS.rglob("*.py"))
# Modules of the test tree that a bare-name import could only find through sys.path.
TEST_MODULES = {p.stem for p in SOURCES if p.stem != "__init__"} - (
    {p.name for p in REPO.iterdir() if p.is_dir()} | {p.stem for p in REPO.glob("*.py")}
)


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def _imports(tree: ast.Module) -> list[tuple[int, list[str]]]:
    """Per ``import``/``from`` statement: its line and the dotted modules it may name."""
    out: list[tuple[int, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.append((node.lineno, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            # the names imported may be modules too: ``from . import conftest``
            out.append((node.lineno, [module, *(f"{module}.{a.name}" for a in node.names)]))
    return out


def _bare_or_conftest(name: str) -> str | None:
    """Why importing ``name`` breaks the layout, or None."""
    parts = name.lstrip(".").split(".")
    if "conftest" in parts:
        return "a conftest: move what it shares to a helper module"
    if not name.startswith(".") and parts[0] in TEST_MODULES:
        return f"a bare name: import it as tests.<path>.{parts[0]}"
    return None


def _touches_sys_path(tree: ast.Module) -> list[int]:
    """Lines that read or change ``sys.path`` (``sys.path.insert``, ``from sys import path``)."""
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "path"
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        ):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            lines += [node.lineno for alias in node.names if alias.name == "path"]
    return lines


def test_no_test_module_uses_sys_path() -> None:
    bad = [
        f"{_id(path)}: lines {lines}"
        for path in SOURCES
        if (lines := _touches_sys_path(ast.parse(path.read_text(), str(path))))
    ]
    assert not bad, "sys.path used (import tests.<path>.<module> instead):\n" + "\n".join(bad)


def test_no_module_imports_a_conftest_or_a_test_module_by_bare_name() -> None:
    bad = []
    for path in SOURCES:
        for line, names in _imports(ast.parse(path.read_text(), str(path))):
            why = next((f"{n}, {w}" for n in names if (w := _bare_or_conftest(n))), None)
            if why:
                bad.append(f"{_id(path)}:{line}: imports {why}")
    assert not bad, "\n".join(bad)


def test_every_test_directory_is_a_package() -> None:
    dirs = {p.parent for p in SOURCES}
    missing = sorted(_id(d) for d in dirs if not (d / "__init__.py").is_file())
    assert not missing, f"directories without __init__.py: {missing}"


def test_the_scan_sees_the_whole_tree() -> None:
    # the checks above are only as good as the files they read
    assert TESTS / "conftest.py" in SOURCES
    assert TESTS / "client" / "update" / "conftest.py" in SOURCES
    assert {"ota_helpers", "update_fakes", "packager_helpers", "conftest"} <= TEST_MODULES
