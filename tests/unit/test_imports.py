"""Hot-path imports stay cheap: what the scheduler, the api-server and the CLI load at import time.

Checked statically (module-level imports, followed through our own package), so the test costs no
interpreter start and no Airflow import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import airflow_asyncq_provider

ROOT = Path(airflow_asyncq_provider.__file__).parent
PACKAGE = "airflow_asyncq_provider"


def _source(module: str) -> Path | None:
    path = ROOT.parent.joinpath(*module.split("."))
    if path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return None


def _module_level_imports(path: Path) -> set[str]:
    """Absolute names imported when the module is imported (not inside functions or TYPE_CHECKING)."""
    names: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" in ast.unparse(node.test):
                    visit(node.orelse)
                else:
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(path.read_text()).body)
    return names


def imported_at_import_time(module: str) -> set[str]:
    """Every top-level third-party package ``import module`` pulls in through our own modules."""
    seen: set[str] = set()
    third_party: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # importing a.b.c imports a and a.b first
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in seen or _source(prefix) is None:
                continue
            seen.add(prefix)
            for imported in _module_level_imports(_source(prefix)):  # type: ignore[arg-type]
                if imported.split(".")[0] == PACKAGE:
                    todo.append(imported)
                else:
                    third_party.add(imported.split(".")[0])
    return third_party


def test_the_walker_sees_real_imports():
    # celery_tasks names Celery only under TYPE_CHECKING and inside functions
    assert "celery" not in imported_at_import_time(f"{PACKAGE}.worker.celery_tasks")
    assert "redis" in imported_at_import_time(f"{PACKAGE}.state.client")
    assert "airflow" in imported_at_import_time(f"{PACKAGE}.executors.asyncq_executor")


@pytest.mark.parametrize("module", [
    f"{PACKAGE}.executors.asyncq_executor",
    f"{PACKAGE}.executors",
    f"{PACKAGE}.get_provider_info",
    f"{PACKAGE}.cli.definition",
    f"{PACKAGE}.settings",
    f"{PACKAGE}.celery_app",
])
def test_no_celery_or_kombu_on_hot_paths(module):
    assert not imported_at_import_time(module) & {"celery", "kombu"}


@pytest.mark.parametrize("module", [f"{PACKAGE}.get_provider_info", f"{PACKAGE}.settings",
                                    f"{PACKAGE}.cli.definition"])
def test_provider_metadata_and_settings_import_no_broker_client(module):
    assert not imported_at_import_time(module) & {"celery", "kombu", "redis", "pandas", "pyarrow"}


def test_executor_module_imports_no_redis():
    assert "redis" not in imported_at_import_time(f"{PACKAGE}.executors.asyncq_executor")


# ------------------------------------------------------------------------------------ layers
# Lower layers never import higher ones, at module level or inside a function. Within one layer a
# package imports another only along the edges listed in SAME_LAYER (and never in a cycle).
LAYERS: dict[str, float] = {
    # The package's own __init__ holds only the version: everything may read it.
    "__init__": -1,
    # 0: the bottom, single modules in their own order: errors and exit codes, secret masking, sizes,
    # the option table, and settings (which parses the table with the others' help).
    "errors": 0, "exitcodes": 0, "redaction": 0.1, "sizes": 0.2, "get_provider_info": 0.3, "settings": 0.4,
    "metrics": 0.45,
    # 1: the protocols. Redis state, the broker's message contract and Celery config, memory.
    "state": 1, "broker": 1, "memory": 1,
    # 2: the components built on them.
    "executors": 2, "worker": 2, "native": 2, "operators": 2, "triggers": 2, "policy": 2,
    # 3: the top. Command lines, UI plugins and the shipped example DAGs.
    "cli": 3, "plugins": 3, "example_dags": 3,
}
SAME_LAYER = {("broker", "state"), ("operators", "native"), ("operators", "triggers")}


def _part(module: str) -> str:
    """``airflow_asyncq_provider.state.records`` -> ``state``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _all_imports(path: Path) -> set[str]:
    """Every absolute import of our package anywhere in the file (functions and TYPE_CHECKING too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            submodules = {f"{node.module}.{a.name}" for a in node.names if _source(f"{node.module}.{a.name}")}
            names.update(submodules or {node.module})
    return names


def layer_violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join((PACKAGE, *path.relative_to(root).with_suffix("").parts))
        mine = _part(module)
        assert mine in LAYERS, f"{module}: add its package {mine!r} to the LAYERS table"
        for imported in _all_imports(path):
            theirs = _part(imported)
            if theirs == mine:
                continue
            if LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine] and (mine, theirs) not in SAME_LAYER):
                found.append(f"{module} (layer {LAYERS[mine]}) imports {imported} (layer {LAYERS[theirs]})")
    return found


def test_layers_point_one_way():
    assert layer_violations() == []


def test_same_layer_edges_have_no_cycle():
    assert not {(b, a) for a, b in SAME_LAYER} & SAME_LAYER


def test_the_layer_check_fails_on_an_upward_import(tmp_path):
    # A copy of one real module with one upward import added: the check must name it.
    package = tmp_path / PACKAGE
    (package / "state").mkdir(parents=True)
    (package / "state" / "records.py").write_text(
        (ROOT / "state" / "records.py").read_text() + "\n\ndef _up():\n    from airflow_asyncq_provider.cli import status\n")
    assert layer_violations(package) == [
        f"{PACKAGE}.state.records (layer 1) imports {PACKAGE}.cli.status (layer 3)"]
