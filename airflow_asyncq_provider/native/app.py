"""The fleet app users define native tasks on: ``from airflow_asyncq_provider.native import fleet``.

Creating it reads no configuration. Celery asks for its configuration on first use (sending a task, or
the lane starting), and only then ``native_config(load_settings())`` runs, so task modules import cheaply
and tests can use ``fleet.conf.update(task_always_eager=True)`` without any Airflow config.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from airflow_asyncq_provider.celery_app import PRIORITY_STEPS
from airflow_asyncq_provider.native.keys import NATIVE_QUEUE, NativeKeys
from airflow_asyncq_provider.settings import AsyncQSettings


def native_config(settings: AsyncQSettings) -> dict[str, Any]:
    """Celery settings of the fleet app: JSON only, results in Redis under the fleet's key prefix."""
    from airflow_asyncq_provider.state.client import ssl_options

    tls = ssl_options(settings)
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "result_expires": settings.result_expires,
        "result_backend_transport_options": {"global_keyprefix": NativeKeys(settings.key_prefix).result_prefix},
        "broker_transport_options": {
            "priority_steps": PRIORITY_STEPS,
            # kombu's default: a stable order inside a priority step (FIFO), step 0 served first.
            "queue_order_strategy": "priority",
            "visibility_timeout": settings.visibility_timeout,
            "socket_timeout": settings.publish_timeout,
            "socket_connect_timeout": settings.publish_timeout,
        },
        "broker_use_ssl": tls,
        "redis_backend_use_ssl": tls,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": settings.publish_timeout,
        "task_default_queue": NATIVE_QUEUE,
        "task_create_missing_queues": True,
        # Acknowledge when the lane starts a task (see native/pool.py): a message waiting for a free
        # coroutine or thread slot stays unacknowledged, so prefetch bounds what a lane holds.
        "task_acks_late": False,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }


def _settings_defaults() -> dict[str, Any]:
    from airflow_asyncq_provider.settings import load_settings

    return native_config(load_settings())


fleet = Celery("asyncq-native", task_cls="airflow_asyncq_provider.native.task:NativeTask",
               set_as_current=False)
fleet.add_defaults(_settings_defaults)
