"""A chunk task's memory: its budget in bytes, what it holds before it reads data, and the
``executor_config`` that asks the fleet for it.

The budget is checked when the DAG is parsed wherever it is not templated, so a unit mistake fails
there and not in the first task.
"""

from __future__ import annotations

import math
from typing import Any

from airflow_asyncq_provider.operators.chunking import MIN_OVERHEAD
from airflow_asyncq_provider.operators.errors import ChunkPlanningError
from airflow_asyncq_provider.operators.progress import current_rss
from airflow_asyncq_provider.sizes import MIB, parse_size


def memory_budget_bytes(value: Any, what: str) -> int:
    """``memory_budget`` in bytes; a plain number under 1 MiB is almost surely a unit mistake."""
    size = parse_size(value, what)
    if size < MIB:
        raise ChunkPlanningError(
            f"{what}: {value!r} is {size} bytes, too small for any chunk task; sizes without a unit are "
            f"bytes, so write e.g. '{value}MiB' or '{value}GiB'"
        )
    return size


def resolve_overhead(value: Any, what: str) -> int:
    """``"auto"``: this process' resident memory with pandas and pyarrow imported, i.e. what a task
    holds before it reads any data. Otherwise a human size."""
    if value == "auto":
        import pandas  # noqa: F401  (counted in the overhead, as in every chunk task)
        import pyarrow  # noqa: F401

        return max(current_rss(), MIN_OVERHEAD)
    return parse_size(value, what)


def size_str(size: int) -> str:
    """A byte count as the ``NNNMiB`` string executor_config expects (rounded up)."""
    return f"{math.ceil(size / MIB)}MiB"


def memory_executor_config(request: int, limit: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``executor_config`` asking the fleet for ``request`` bytes with a hard ``limit``; the caller's
    own ``asyncq`` keys win."""
    config = dict(base or {})
    asyncq = {"memory_request": size_str(request), "memory_limit": size_str(limit)}
    asyncq.update(config.get("asyncq") or {})
    config["asyncq"] = asyncq
    return config
