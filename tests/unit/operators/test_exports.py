"""The package's exported surface is a contract: every public name resolves lazily to the module that
defines it, and importing the package itself loads nothing (DAG parsing and the scheduler import it)."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import airflow_asyncq_provider.operators as operators

PACKAGE = operators.__name__
OPERATORS_MD = Path(__file__).resolve().parents[3] / "docs" / "OPERATORS.md"


def run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_every_public_name_resolves_to_its_module():
    assert sorted(operators.__all__) == sorted(operators._EXPORTS)
    for name in operators.__all__:
        value = getattr(operators, name)
        assert value.__module__ == f"{PACKAGE}.{operators._EXPORTS[name]}", name
        assert value is getattr(importlib.import_module(value.__module__), name)


def test_dir_lists_the_public_names_and_unknown_names_raise():
    assert set(operators.__all__) <= set(dir(operators))
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchOperator'"):
        operators.NoSuchOperator  # noqa: B018


def test_importing_the_package_loads_no_submodule_and_no_airflow():
    code = (
        "import sys\n"
        f"import {PACKAGE}\n"
        f"print(sorted(m for m in sys.modules if m.startswith('{PACKAGE}.') or m.split('.')[0] in "
        "('airflow', 'pandas', 'pyarrow', 'psutil')))\n"
    )
    assert run(code) == "[]"


def test_no_operators_module_imports_pandas_or_pyarrow():
    """pandas and pyarrow (the data extra) load only inside execute(), whichever module DAG code uses."""
    modules = sorted(f"{PACKAGE}.{m.name}" for m in pkgutil.iter_modules(operators.__path__))
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in ('pandas', 'pyarrow') if m in sys.modules))\n"
    )
    assert run(code) == "[]"


def test_the_docs_name_every_module_and_only_real_ones():
    section = OPERATORS_MD.read_text().split("## Where the code lives", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)\.py` \|", section, flags=re.MULTILINE))
    modules = {m.name for m in pkgutil.iter_modules(operators.__path__)}
    assert documented == modules
