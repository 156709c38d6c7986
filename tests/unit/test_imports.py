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
