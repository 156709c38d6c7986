"""The Celery task the executor publishes, and the hooks that dead-letter what Celery refuses."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.celery_app import EXECUTE_WORKLOAD

if TYPE_CHECKING:
    from celery import Celery

    from airflow_asyncq_provider.worker.runner import WorkloadRunner

log = logging.getLogger(__name__)


def register_tasks(app: Celery, runner: WorkloadRunner) -> None:
    from celery import signals

    @app.task(name=EXECUTE_WORKLOAD, bind=True, ignore_result=True, acks_late=False)
    def execute_workload(self: Any, *args: Any, **kwargs: Any) -> str:
        task_id = self.request.id
        if len(args) != 1 or kwargs:
            runner.dead_letter(task_id, f"expected one JSON payload argument, got {len(args)} args "
                               f"and {sorted(kwargs)} kwargs", repr((args, kwargs)))
            return "rejected"
        return runner.run(task_id, args[0])

    def _message_id(message: Any) -> str:
        headers = getattr(message, "headers", None) or {}
        return str(headers.get("id") or getattr(message, "delivery_tag", "") or "unknown")

    @signals.task_rejected.connect(weak=False)
    def _on_rejected(message: Any = None, exc: Any = None, **_: Any) -> None:
        # Celery refused the message before any task code ran: a pickle body, an unknown
        # content type, or a body it cannot decode.
        runner.dead_letter(_message_id(message), f"message refused by Celery: {exc!r}",
                           _raw_body(message))

    @signals.task_unknown.connect(weak=False)
    def _on_unknown(message: Any = None, exc: Any = None, name: Any = None, id: Any = None,
                    **_: Any) -> None:
        runner.dead_letter(str(id or _message_id(message)), f"unknown task name {name!r}", _raw_body(message))


def _raw_body(message: Any) -> str:
    body = getattr(message, "body", b"")
    if isinstance(body, bytes):
        return body[:100_000].decode("utf-8", "replace")
    return repr(body)[:100_000]
