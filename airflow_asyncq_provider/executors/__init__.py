"""``[core] executor = airflow_asyncq_provider.executors.AsyncQExecutor``.

Lazy (PEP 562): Airflow imports this package by name, and the class loads only when asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncQExecutor"]


def __getattr__(name: str) -> Any:
    if name == "AsyncQExecutor":
        from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

        return AsyncQExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
