"""Cluster policy registered through the ``airflow.policy`` entry point: a bad memory request or limit
in ``executor_config`` becomes a DAG import error that names the task and the value, at parse time."""

from __future__ import annotations

import functools
from typing import Any

from airflow.policies import hookimpl

from airflow_asyncq_provider.errors import ConfigError


@functools.lru_cache(maxsize=1)
def _defaults() -> tuple[int, int | None]:
    from airflow_asyncq_provider.settings import AsyncQSettings, load_settings

    try:
        settings = load_settings()
    except ConfigError:
        settings = AsyncQSettings(broker_url="redis://localhost")  # the executor reports bad config
    return settings.default_memory_request, settings.default_memory_limit


@hookimpl
def task_policy(task: Any) -> None:
    config = getattr(task, "executor_config", None)
    if not config or (isinstance(config, dict) and "asyncq" not in config):
        return
    from airflow.exceptions import AirflowClusterPolicyViolation

    from airflow_asyncq_provider.memory.requests import memory_spec

    request, limit = _defaults()
    try:
        memory_spec(config, f"{task.dag_id}.{task.task_id}", request, limit)
    except ConfigError as exc:
        raise AirflowClusterPolicyViolation(str(exc)) from None
