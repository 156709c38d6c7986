"""The task-name registry: lanes publish the names they can run, the operator refuses unknown ones."""

from __future__ import annotations

import json
import time
from typing import Any

from airflow_asyncq_provider.native.keys import NativeKeys
from airflow_asyncq_provider.native.task import is_coroutine_task


def user_tasks(app: Any) -> dict[str, Any]:
    """The app's tasks without Celery's built-ins (``celery.*``)."""
    return {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}


def publish(client: Any, keys: NativeKeys, app: Any, queues: list[str], hostname: str) -> int:
    tasks = user_tasks(app)
    if tasks:
        now = round(time.time(), 3)
        client.hset(keys.tasks, mapping={
            name: json.dumps({"kind": "async" if is_coroutine_task(task) else "sync", "queues": queues,
                              "hostname": hostname, "at": now})
            for name, task in tasks.items()
        })
    return len(tasks)


def lookup(client: Any, keys: NativeKeys, name: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(record of ``name`` or None, the names that are registered when it is not)."""
    raw = client.hget(keys.tasks, name)
    if raw:
        return json.loads(raw), []
    return None, sorted(client.hkeys(keys.tasks))
