"""Everything the worker plugs into Celery: the task the executor publishes, two consumer bootsteps
(a loop tick that proves the consumer turns, and the memory admission gate), and the hooks that
dead-letter what Celery refuses before any task code runs."""

from __future__ import annotations

import logging
import time
from types import MethodType
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.broker.messages import EXECUTE_WORKLOAD, send_workload

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from airflow_asyncq_provider.worker.runner import WorkloadRunner

log = logging.getLogger(__name__)


def requeue_to(client: redis.Redis) -> Any:
    """The runner's way to hand a message back to the broker: the same contract as every publisher."""

    def requeue(task_id: str, payload: str, meta: Any, queue: str, priority: int | None,
                key: dict[str, Any] | None) -> None:
        send_workload(client, task_id=task_id, payload=payload, meta=meta, queue=queue, priority=priority,
                      key=key)

    return requeue


def register_tasks(app: Celery, runner: WorkloadRunner) -> None:
    from celery import bootsteps, signals

    # Reconnect on a short backoff (worker/consumer.py), and never give up: a worker rejoins after an
    # outage of any length, and `airflow asyncq probe` tells a supervisor when it does not consume.
    app.conf.worker_consumer = "airflow_asyncq_provider.worker.consumer:AsyncQConsumer"
    app.conf.broker_connection_max_retries = None

    @app.task(name=EXECUTE_WORKLOAD, bind=True, ignore_result=True, acks_late=False)
    def execute_workload(self: Any, *args: Any, **kwargs: Any) -> str:
        task_id = self.request.id
        delivery = self.request.delivery_info or {}
        queue = delivery.get("routing_key")
        if not 1 <= len(args) <= 2 or kwargs:
            runner.dead_letter(task_id, f"expected (payload[, meta]) arguments, got {len(args)} args "
                               f"and {sorted(kwargs)} kwargs", repr((args, kwargs)), queue)
            return "rejected"
        meta = args[1] if len(args) == 2 else None
        return runner.run(task_id, args[0], meta, queue=queue, priority=delivery.get("priority"))

    class ConsumerTick(bootsteps.StartStopStep):
        """Ticks from inside the consumer's event loop: a stuck consumer stops ticking, and the
        registry then shows the worker as unhealthy although its heartbeat thread still runs."""

        requires = {"celery.worker.consumer.tasks:Tasks"}

        def start(self, c: Any) -> None:
            runner.consumer_tick_at = time.time()
            c.timer.call_repeatedly(1.0, _tick)

    def _tick() -> None:
        runner.consumer_tick_at = time.time()

    class AdmissionGate(bootsteps.StartStopStep):
        """Wraps the channel's ``can_consume`` (as ``worker_disable_prefetch`` does) so the worker
        fetches a message only when memory for one more task is free and it is neither draining, nor
        in maintenance, nor fenced (worker/fencing.py).

        A BRPOP already sent when the gate closes may still pop a message. kombu 5.7 then leaves that
        reply unread until the gate opens again ("paused BRPOP", kombu/transport/redis.py
        ``_update_brpop_polling``): a message held for as long as maintenance lasts, lost if the
        worker exits. So while a BRPOP is in flight the gate stays open for its reply; the runner
        hands a message that arrives so back to the queue at once, and no new BRPOP is sent."""

        requires = {"celery.worker.consumer.tasks:Tasks"}

        def start(self, c: Any) -> None:
            channel = c.task_consumer.channel
            qos = channel.qos
            original = qos.can_consume

            def can_consume(_self: Any) -> bool:
                if not original():
                    return False
                if (runner.draining or runner.maintenance is not None or runner.fenced is not None
                        or not runner.admission.can_consume()):
                    return bool(getattr(channel, "_in_poll", False))  # kombu's BRPOP in flight
                return True

            qos.can_consume = MethodType(can_consume, qos)

    app.steps["consumer"].add(ConsumerTick)
    app.steps["consumer"].add(AdmissionGate)

    def _message_id(message: Any) -> str:
        headers = getattr(message, "headers", None) or {}
        return str(headers.get("id") or getattr(message, "delivery_tag", "") or "unknown")

    @signals.task_rejected.connect(weak=False)
    def _on_rejected(message: Any = None, exc: Any = None, **_: Any) -> None:
        # A Python-serialized body, an unknown content type, or a body Celery cannot decode.
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
