"""One base Celery configuration for the fleet app (Airflow workloads) and the native app.

JSON is the only accepted content type, so a Python-serialized message is refused before any code runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.settings import is_sentinel_url
from airflow_asyncq_provider.state.client import sentinel_kwargs, ssl_options
from airflow_asyncq_provider.state.keys import NATIVE_QUEUE, Keys
from airflow_asyncq_provider.state.queues import PRIORITY_STEPS

if TYPE_CHECKING:
    from celery import Celery

    from airflow_asyncq_provider.settings import AsyncQSettings

# priority_weight thresholds, most urgent first: weight >= 1000 -> step 0, >= 500 -> 1, ... else 9.
_WEIGHT_THRESHOLDS = (1000, 500, 100, 50, 20, 10, 5, 3, 2)
#: Seconds between kombu's checks of the consumer's long-lived BRPOP and pub/sub connections (its
#: ``health_check_interval`` transport option, also redis-py's PING-before-use interval).
BROKER_HEALTH_CHECK_INTERVAL = 10


def priority_step(priority_weight: int) -> int:
    """Map Airflow's unbounded priority_weight onto Redis' ten priority lists (0 = served first)."""
    for step, threshold in enumerate(_WEIGHT_THRESHOLDS):
        if priority_weight >= threshold:
            return step
    return len(_WEIGHT_THRESHOLDS)


def sentinel_options(settings: AsyncQSettings) -> dict[str, Any]:
    """Transport options of a sentinel:// URL, the same for the broker (kombu's SentinelChannel reads
    ``master_name``, ``sentinel_kwargs`` and ``min_other_sentinels`` from its transport options) and
    for the native result backend (Celery's SentinelBackend reads the same keys from
    ``result_backend_transport_options``); empty for any other URL."""
    if not is_sentinel_url(settings.broker_url):
        return {}
    return {"master_name": settings.sentinel_master, "sentinel_kwargs": sentinel_kwargs(settings)}


def base_config(settings: AsyncQSettings) -> dict[str, Any]:
    """What both apps need: JSON only, the Redis transport's timeouts, priorities and TLS, and
    acknowledgement when a slot starts a message (prefetch then bounds what a worker holds)."""
    return {
        "broker_url": settings.broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "broker_transport_options": {
            "priority_steps": PRIORITY_STEPS,
            "visibility_timeout": settings.visibility_timeout,
            "socket_timeout": settings.publish_timeout,
            "socket_connect_timeout": settings.publish_timeout,
            # kombu >= 5.7 drops a BRPOP connection whose reply is overdue by brpop_timeout (1 s) +
            # this, checking every this many seconds: a consumer on a half-open connection (a healed
            # partition) fetches again within 1 + 2 * 10 = 21 s, not kombu's default 51 s.
            "health_check_interval": BROKER_HEALTH_CHECK_INTERVAL,
            **sentinel_options(settings),
        },
        "broker_use_ssl": ssl_options(settings),
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": settings.publish_timeout,
        "task_create_missing_queues": True,
        # Acknowledge when a slot starts the message. From then on the task's record and the worker's
        # heartbeat say what happened to it, so a long task is never redelivered by the visibility
        # timeout; a message reserved but never started stays unacknowledged and comes back.
        "task_acks_late": False,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }


def fleet_config(settings: AsyncQSettings) -> dict[str, Any]:
    """The fleet app: Airflow workloads, no result backend (outcomes go to the event stream)."""
    config = base_config(settings)
    config["broker_transport_options"]["global_keyprefix"] = ""
    config.update(
        result_backend=None,
        task_ignore_result=True,
        # Fetch only when a slot is free (Redis only), so a backlog stays in Redis where priority
        # ordering and other workers can still see it.
        worker_disable_prefetch=True,
        task_default_queue=settings.default_queue,
        worker_send_task_events=True,
    )
    return config


def native_config(settings: AsyncQSettings) -> dict[str, Any]:
    """The native app: results in Redis under the fleet's key prefix, FIFO inside a priority step."""
    config = base_config(settings)
    # kombu's default: a stable order inside a priority step (FIFO), step 0 served first.
    config["broker_transport_options"]["queue_order_strategy"] = "priority"
    config.update(
        result_backend=settings.broker_url,
        result_expires=settings.result_expires,
        # a sentinel:// result_backend is Celery's SentinelBackend, which finds the master as kombu does
        result_backend_transport_options={"global_keyprefix": Keys(settings.key_prefix).native_result_prefix,
                                          **sentinel_options(settings)},
        redis_backend_use_ssl=config["broker_use_ssl"],
        task_default_queue=NATIVE_QUEUE,
    )
    return config


def make_celery_app(settings: AsyncQSettings) -> Celery:
    from celery import Celery

    app = Celery("asyncq", broker=settings.broker_url, set_as_current=False)
    app.conf.update(fleet_config(settings))
    return app
