"""A task's memory request and limit, from ``executor_config={"asyncq": {...}}`` and ``[asyncq]`` defaults.

The same function validates at DAG parse time (the ``task_policy`` hook), in the executor before a
task is queued, and nowhere later: a bad value can never fail silently on a worker.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.sizes import format_size, parse_size

FIELDS = ("memory_request", "memory_limit")


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    request: int
    limit: int | None  # None: no per-task limit (the worker budget still bounds admission)

    def as_meta(self) -> dict[str, int | None]:
        return {"memory_request": self.request, "memory_limit": self.limit}


def memory_spec(executor_config: Any, task: str, default_request: int,
                default_limit: int | None) -> MemorySpec:
    """``task`` names the task in every error, e.g. ``"my_dag.my_task"``."""
    if executor_config is None:
        executor_config = {}
    if not isinstance(executor_config, dict):
        raise ConfigError(f"task {task}: executor_config must be a dict, got {type(executor_config).__name__}")
    section = executor_config.get("asyncq", {})
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(
            f"task {task}: executor_config['asyncq'] must be a dict like "
            f"{{'memory_request': '2GiB', 'memory_limit': '3GiB'}}, got {type(section).__name__}"
        )
    unknown = sorted(set(section) - set(FIELDS))
    if unknown:
        raise ConfigError(f"task {task}: unknown executor_config['asyncq'] field(s) {unknown}; "
                          f"known fields: {list(FIELDS)}")
    request = (parse_size(section["memory_request"], f"task {task}: executor_config['asyncq']['memory_request']")
               if "memory_request" in section else default_request)
    limit = (parse_size(section["memory_limit"], f"task {task}: executor_config['asyncq']['memory_limit']")
             if "memory_limit" in section else default_limit)
    if limit is not None and limit < request:
        raise ConfigError(
            f"task {task}: memory_limit {format_size(limit)} is below memory_request {format_size(request)}; "
            "the limit must be at least the request"
        )
    return MemorySpec(request, limit)
