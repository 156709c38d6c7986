"""Native queue tasks: plain Celery tasks (``async def`` or ``def``) run by the fleet's native lane
and called from DAGs with ``QueueTaskOperator`` (docs/NATIVE_TASKS.md).

    from airflow_asyncq_provider.native import fleet

    @fleet.task(bind=True, max_retries=3)
    async def fetch(self, url: str) -> dict: ...
"""

from airflow_asyncq_provider.native.app import fleet
from airflow_asyncq_provider.native.keys import NATIVE_QUEUE

__all__ = ["NATIVE_QUEUE", "fleet"]
