"""Each package's ``__init__`` is the public API its callers actually use (issue 23).

For every package with an ``__init__.py`` listed in ``PACKAGES``, the names that modules
outside it (other packages, tests, benchmarks) import from the package itself are
exactly its ``__all__``: nothing is exported that no caller imports, and no caller
imports from the package a name it does not export. Code outside a package (tests
aside: they may test a submodule's internals) imports its submodules only where
``DIRECT_SUBMODULES`` says why. The imports are read with ``ast`` from the source, so
imports inside functions and under ``if TYPE_CHECKING:`` count as much as module-level
ones; attribute access after ``import package`` is not followed.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("client", "server", "delta_packager", "simulation", "protocol", "fedota")
ROOTS = (*SOURCES, "tests", "benchmarks")
PACKAGES = (
    "client",
    "client.runtime",
    "client.train",
    "client.update",
    "server",
    "server.ota",
    "server.federation",
    "delta_packager",
    "simulation",
    "simulation.fleet",
    "simulation.data",
    "protocol",
    "fedota",
)

# Submodules that code outside their package imports directly, and why it may. Keep this
# short: a public name belongs in the package's __all__, imported from the package.
DIRECT_SUBMODULES = {
    # The Flower ClientApp needs flwr, which the device install lacks, and every module
    # of `client` runs client/__init__.py on import: it cannot be re-exported there.
    "client.client_app": "needs flwr (not in a device install); imported lazily",
    # Flower record codecs: need flwr, and `protocol` is imported on devices.
    "protocol.records": "needs flwr (not in a device install)",
    # TUF signing and checking: tuf, securesystemslib and cryptography (~100 modules)
    # that the bundle format, the runtime and `fedota --help` do not need.
    "delta_packager.trust": "loads tuf; imported where metadata is signed",
    "delta_packager.verify": "loads tuf; imported where metadata is checked",
    # The fleet scenario loads the embedded OTA server (FastAPI, SQLAlchemy) at import,
    # and `simulation` must stay cheap: `fedota --help` imports it (simulation.cli).
    "simulation.ota_rollout": "loads FastAPI and SQLAlchemy (the embedded OTA server)",
    # The OTA server's device API is used as a namespace (`api.enroll(...)`), so that
    # one patch of it reaches the device and the fleet alike.
    "client.update.api": "a namespace of the server's device API calls",
    # Module and function share the name `download`: re-exporting the function from
    # `client.update` would hide the submodule (`import client.update.download`).
    "client.update.download": "the function would shadow its module in client.update",
    # benchmarks/explore_record_dp.py replicates DP-SGD's per-example loss to try
    # record-DP variants: an experiment on the internal training loop, not an API.
    "client.train._loops": "an experiment script reuses the internal per-example loss",
}

# Names docs/sdk.md ("Reference") promises to apps outside this repository: callers of
# the SDK too, though no module here imports some of them.
DOCUMENTED = {
    "client": {"ClientError", "ClientInputError", "Device"},
    "client.update": {
        "DeviceConfig",
        "DeviceState",
        "DeviceStateError",
        "HealthReport",
        "UpdateBusyError",
        "UpdateError",
        "UpdateOutcome",
        "UpdateRejectedError",
        "UpdateRetryError",
        "UpdateTransientError",
    },
    "client.runtime": {
        "BudgetTooSmallError",
        "DeviceRuntime",
        "EvalStats",
        "Generation",
        "LlamaCppError",
        "MemoryPlan",
        "RequestTooLargeError",
        "runtime_kind_of",
    },
}
SDK_DOC = REPO / "docs" / "sdk.md"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _owner(module: str) -> str | None:
    """The innermost package of ``PACKAGES`` holding ``module``."""
    holding = [p for p in PACKAGES if _inside(module, p)]
    return max(holding, key=len) if holding else None


def _python_files() -> Iterator[Path]:
    for root in ROOTS:
        yield from sorted((REPO / root).rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[str, str | None, int]]:
    """``(module, name, line)`` for each import in ``path``; ``name`` is ``None`` for a
    module import (``import a.b``, or ``from a import b`` where ``a.b`` is a module)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            for alias in node.names:
                if _is_module(f"{module}.{alias.name}"):
                    yield f"{module}.{alias.name}", None, node.lineno
                else:
                    yield module, alias.name, node.lineno


Where = list[str]


def _scan() -> tuple[dict[str, dict[str, Where]], dict[str, dict[str, Where]]]:
    """Per package: names imported from it, and its submodules imported by non-test
    code, each with where (``module:line``), by modules outside the package."""
    from_package: dict[str, dict[str, Where]] = defaultdict(lambda: defaultdict(list))
    submodules: dict[str, dict[str, Where]] = defaultdict(lambda: defaultdict(list))
    for path in _python_files():
        me = _module_name(path)
        for module, name, line in _imports(path):
            owner = _owner(module)
            if owner is None or _inside(me, owner):
                continue
            where = f"{path.relative_to(REPO)}:{line}"
            if module == owner:
                if name is not None:
                    from_package[owner][name].append(where)
            elif not me.startswith("tests"):
                submodules[owner][module].append(where)
    return from_package, submodules


@pytest.fixture(scope="module")
def scanned() -> tuple[dict[str, dict[str, Where]], dict[str, dict[str, Where]]]:
    return _scan()


def _init(package: str) -> ast.Module:
    path = REPO.joinpath(*package.split("."), "__init__.py")
    return ast.parse(path.read_text(), filename=str(path))


def _dunder_all(package: str) -> set[str]:
    for node in _init(package).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "__all__":
            assert node.value is not None
            return set(ast.literal_eval(node.value))
    raise AssertionError(f"{package}/__init__.py defines no __all__")


def _bound_by_imports(package: str) -> set[str]:
    """Names the package's ``__init__`` binds by importing them (``if`` blocks included:
    ``if TYPE_CHECKING:``), other than modules."""
    bound = set()
    body = list(_init(package).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.If):
            body.extend([*node.body, *node.orelse])
        elif isinstance(node, ast.ImportFrom) and node.module not in (None, "__future__"):
            for alias in node.names:
                if not _is_module(f"{node.module}.{alias.name}"):
                    bound.add(alias.asname or alias.name)
    return bound


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_exactly_what_callers_import(
    package: str, scanned: tuple[dict[str, dict[str, Where]], dict[str, dict[str, Where]]]
) -> None:
    from_package, _ = scanned
    exported = _dunder_all(package)
    imported = from_package[package]
    used = set(imported) | DOCUMENTED.get(package, set())
    unused = sorted(exported - used)
    assert not unused, f"{package}.__all__ exports names no caller imports: {unused}"
    missing = {name: imported[name] for name in sorted(used - exported)}
    assert not missing, f"callers import from {package} names its __all__ lacks: {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_exactly_what_it_exports(package: str) -> None:
    # Logging helpers and the like are fine; a public name imported but not exported
    # would be importable from the package without being its API.
    bound = {n for n in _bound_by_imports(package) if not n.startswith("_")} - {"TYPE_CHECKING"}
    assert sorted(bound - _dunder_all(package)) == []


def test_code_outside_a_package_imports_only_allowed_submodules(
    scanned: tuple[dict[str, dict[str, Where]], dict[str, dict[str, Where]]],
) -> None:
    _, submodules = scanned
    problems = {
        module: where
        for package in PACKAGES
        for module, where in sorted(submodules[package].items())
        if module not in DIRECT_SUBMODULES
    }
    assert not problems, (
        "import these names from their package (add them to its __all__), or add the "
        f"submodule to DIRECT_SUBMODULES with the reason: {problems}"
    )


def test_every_allowed_submodule_exists_and_is_imported_directly(
    scanned: tuple[dict[str, dict[str, Where]], dict[str, dict[str, Where]]],
) -> None:
    _, submodules = scanned
    for module in DIRECT_SUBMODULES:
        assert _is_module(module), f"{module} is not a module"
        package = _owner(module)
        assert package is not None and package != module, f"{module} is not a submodule"
        assert submodules[package][module], f"no code outside {package} imports {module}"


def test_documented_names_are_in_the_sdk_reference() -> None:
    text = SDK_DOC.read_text()
    for package, names in DOCUMENTED.items():
        for name in sorted(names):
            assert f"`{package}.{name}`" in text or f"`{name}" in text, (
                f"{package}.{name} is not in {SDK_DOC.name}: drop it from DOCUMENTED"
            )


def test_the_scanner_sees_lazy_and_type_checking_imports(
    scanned: tuple[dict[str, dict[str, Where]], dict[str, dict[str, Where]]],
) -> None:
    from_package, submodules = scanned

    def seen(where: Where, path: str) -> bool:
        return any(w.startswith(f"{path}:") for w in where)

    # client/device.py: a module-level import, one inside a method, one submodule import.
    assert seen(from_package["client.update"]["SLOTS"], "client/device.py")
    assert seen(from_package["client.update"]["Retrier"], "client/device.py")
    assert seen(submodules["client.update"]["client.update.api"], "client/device.py")
    # simulation/federated.py imports RoundCallback under `if TYPE_CHECKING:`.
    assert seen(from_package["server.federation"]["RoundCallback"], "simulation/federated.py")
