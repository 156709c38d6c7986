"""The fleet's Celery app, shared by the executor (publishing) and the workers (consuming).

JSON is the only accepted content type, so a Python-serialized message is refused before any code runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state.client import ssl_options

if TYPE_CHECKING:
    from celery import Celery

EXECUTE_WORKLOAD = "asyncq.execute_workload"

# kombu's Redis transport keeps one list per priority step and pops the lowest step first
# (kombu/transport/redis.py: `_q_for_pri`, BRPOP key order), so step 0 is the most urgent.
PRIORITY_STEPS = list(range(10))
# priority_weight thresholds, most urgent first: weight >= 1000 -> step 0, >= 500 -> 1, ... else 9.
_WEIGHT_THRESHOLDS = (1000, 500, 100, 50, 20, 10, 5, 3, 2)


def priority_step(priority_weight: int) -> int:
    """Map Airflow's unbounded priority_weight onto Redis' ten priority lists (0 = served first)."""
    for step, threshold in enumerate(_WEIGHT_THRESHOLDS):
        if priority_weight >= threshold:
            return step
    return len(_WEIGHT_THRESHOLDS)


def make_celery_app(settings: AsyncQSettings) -> Celery:
    from celery import Celery

    app = Celery("asyncq", broker=settings.broker_url, set_as_current=False)
    transport = {
        "priority_steps": PRIORITY_STEPS,
        "visibility_timeout": settings.visibility_timeout,
        "socket_timeout": settings.publish_timeout,
        "socket_connect_timeout": settings.publish_timeout,
        "global_keyprefix": "",
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        result_accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        # Acknowledge when a slot starts the message. From then on the task's record and the worker's
        # heartbeat say what happened to it, so a long task is never redelivered by the visibility
        # timeout; a message reserved but never started stays unacknowledged and comes back.
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        # Fetch only when a slot is free (Redis only), so a backlog stays in Redis where priority
        # ordering and other workers can still see it.
        worker_disable_prefetch=True,
        task_default_queue=settings.default_queue,
        task_create_missing_queues=True,
        broker_transport_options=transport,
        broker_use_ssl=ssl_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.publish_timeout,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    return app
