"""Which native tasks a lane can run: the app's tasks without Celery's built-ins, by kind."""

from __future__ import annotations

from typing import Any

from airflow_asyncq_provider.native.task import is_coroutine_task


def user_tasks(app: Any) -> dict[str, Any]:
    """The app's tasks without Celery's built-ins (``celery.*``)."""
    return {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}


def task_kinds(app: Any) -> dict[str, str]:
    """name -> "async" or "sync", as ``state.native.publish_tasks`` records them."""
    return {name: "async" if is_coroutine_task(task) else "sync" for name, task in user_tasks(app).items()}
