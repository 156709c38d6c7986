"""Native queue tasks: plain Celery tasks (``async def`` or ``def``) run by the fleet's native lane
and called from DAGs with ``QueueTaskOperator`` (docs/NATIVE_TASKS.md).

    from airflow_asyncq_provider.native import fleet

    @fleet.task(bind=True, max_retries=3)
    async def fetch(self, url: str) -> dict: ...

Lazy (PEP 562, as Celery's own package is): reading ``NATIVE_QUEUE`` imports no Celery.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NATIVE_QUEUE", "fleet"]


def __getattr__(name: str) -> Any:
    if name == "fleet":
        from airflow_asyncq_provider.native.app import fleet

        return fleet
    if name == "NATIVE_QUEUE":
        from airflow_asyncq_provider.state.keys import NATIVE_QUEUE

        return NATIVE_QUEUE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
