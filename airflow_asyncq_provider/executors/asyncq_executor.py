"""AsyncQExecutor: publishes workloads to the fleet and learns outcomes from the worker event stream.

This module is imported by the scheduler and the api-server (for ``get_task_log``), so it imports
neither Celery nor Redis at module level, and ``__init__`` opens no connection: ``start()`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.executors.base_executor import BaseExecutor
from airflow.utils.state import TaskInstanceState

from airflow_asyncq_provider.errors import BrokerUnavailable, PublishError
from airflow_asyncq_provider.state import events
from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.state.urls import mask_url

if TYPE_CHECKING:
    from airflow.executors.workloads import ExecutorWorkload
    from airflow.models.taskinstance import TaskInstance

    from airflow_asyncq_provider.settings import AsyncQSettings

# How often the executor checks liveness of the workers its tasks run on, and unconsumed queues.
LIVENESS_EVERY = 5.0
QUEUE_CHECK_EVERY = 30.0


@dataclasses.dataclass
class Tracked:
    """What the executor remembers of one workload it published (or adopted)."""

    task_id: str
    queue: str
    published_at: float
    hostname: str | None = None
    received: bool = False
    warned_unconsumed: bool = False


@dataclasses.dataclass(frozen=True)
class Outgoing:
    key: Any
    task_id: str
    queue: str
    priority: int
    payload: str
    key_json: str


class AsyncQExecutor(BaseExecutor):
    """Runs task instances on ``airflow asyncq worker`` processes over Redis."""

    pre_assigns_external_executor_id: ClassVar[bool] = True
    supports_callbacks: bool = True
    is_local: bool = False
    serve_logs: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: AsyncQSettings | None = None
        self.keys = Keys()
        self._redis: Any = None
        self._app: Any = None
        self._producer: Any = None
        self._tracked: dict[Any, Tracked] = {}
        self._keys_by_id: dict[str, Any] = {}
        self._last_event_id = "0-0"
        self._publish_failures: Counter[Any] = Counter()
        self._next_liveness = 0.0
        self._next_queue_check = 0.0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        from airflow_asyncq_provider.celery_app import make_celery_app
        from airflow_asyncq_provider.settings import load_settings
        from airflow_asyncq_provider.state.client import make_redis, ping_or_raise

        self.settings = load_settings(self.conf)
        self.keys = Keys(self.settings.key_prefix)
        self._redis = make_redis(self.settings)
        try:
            ping_or_raise(self._redis, self.settings, "AsyncQExecutor")
        except BrokerUnavailable as exc:
            self.log.error("%s", exc)
            raise
        # Read only what happens from now on; earlier outcomes are found in the task records at
        # adoption time.
        self._last_event_id = events.latest_id(self._redis, self.keys)
        self._app = make_celery_app(self.settings)
        self.log.info("AsyncQExecutor started: broker %s, events after %s",
                      mask_url(self.settings.broker_url), self._last_event_id)

    def _get_producer(self) -> Any:
        if self._producer is None:
            connection = self._app.connection_for_write()
            self._producer = self._app.amqp.Producer(connection, auto_declare=True)
        return self._producer

    def _reset_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.connection.release()
            except Exception:
                self.log.debug("Closing the broker connection failed", exc_info=True)

    def end(self) -> None:
        """Drain the outcomes already written to the stream, then close the connections."""
        if self._redis is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._read_events() > 0:
                pass
        self.terminate()

    def terminate(self) -> None:
        self._reset_producer()
        if self._redis is not None:
            self._redis.close()

    # ---------------------------------------------------------------- publishing
    def _process_workloads(self, workload_items: Sequence[ExecutorWorkload]) -> None:
        outgoing = [self._outgoing(w) for w in workload_items]
        if not outgoing:
            return
        try:
            self._publish(outgoing)
        except PublishError as exc:
            self._reset_producer()
            for item in outgoing:
                self._publish_failed(item, exc)
            return
        now = time.time()
        for item in outgoing:
            self.queued_tasks.pop(item.key, None)
            self.queued_callbacks.pop(item.key, None)
            self._publish_failures.pop(item.key, None)
            self.running.add(item.key)
            self._track(item.key, Tracked(item.task_id, item.queue, now))
            self.event_buffer[item.key] = (TaskInstanceState.QUEUED, item.task_id)

    def _outgoing(self, workload: Any) -> Outgoing:
        from airflow.executors.workloads import ExecuteCallback, ExecuteTask

        from airflow_asyncq_provider.celery_app import priority_step

        assert self.settings is not None, "start() was not called"
        if isinstance(workload, ExecuteTask):
            ti = workload.ti
            task_id = ti.external_executor_id or str(ti.id)
            key_json = json.dumps({"dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id,
                                   "try_number": ti.try_number, "map_index": ti.map_index})
            return Outgoing(ti.key, task_id, ti.queue or self.settings.default_queue,
                            priority_step(ti.priority_weight), workload.model_dump_json(), key_json)
        if isinstance(workload, ExecuteCallback):
            data = workload.callback.data if isinstance(workload.callback.data, dict) else {}
            queue = data.get("queue") or self.settings.default_queue
            return Outgoing(workload.callback.key, str(workload.callback.id), queue, 0,
                            workload.model_dump_json(), json.dumps({"callback_id": str(workload.callback.id)}))
        raise ValueError(f"AsyncQExecutor cannot run workloads of type {type(workload).__name__}")

    def _publish(self, outgoing: list[Outgoing]) -> None:
        """Record, then publish, every workload in one batch over the persistent connection.

        The record comes first: if the scheduler dies between the two, adoption finds a record
        without a message, and the message id equals the pre-assigned ``external_executor_id``,
        so a second publish of the same workload is claimed once and dropped as a duplicate.
        """
        from airflow_asyncq_provider.celery_app import EXECUTE_WORKLOAD

        assert self.settings is not None
        try:
            pipe = self._redis.pipeline(transaction=False)
            now = f"{time.time():.3f}"
            for item in outgoing:
                record = self.keys.task(item.task_id)
                pipe.hset(record, mapping={"key": item.key_json, "queue": item.queue, "published_at": now})
                pipe.hsetnx(record, "state", "published")
                pipe.expire(record, self.settings.state_ttl)
            pipe.execute()
            producer = self._get_producer()
            batch = producer.batch() if hasattr(producer, "batch") else contextlib.nullcontext()
            with batch:
                for item in outgoing:
                    self._app.send_task(
                        EXECUTE_WORKLOAD, args=(item.payload,), task_id=item.task_id, queue=item.queue,
                        priority=item.priority, producer=producer, retry=False,
                    )
        except Exception as exc:
            raise PublishError(
                f"publishing {len(outgoing)} workload(s) to {mask_url(self.settings.broker_url)} failed: "
                f"{type(exc).__name__}: {mask_url(str(exc))}"
            ) from exc

    def _publish_failed(self, item: Outgoing, exc: PublishError) -> None:
        assert self.settings is not None
        self._publish_failures[item.key] += 1
        tries = self._publish_failures[item.key]
        if tries <= self.settings.publish_max_retries:
            self.log.warning("Publish of %s failed (try %d of %d), retrying next heartbeat: %s",
                             item.key, tries, self.settings.publish_max_retries + 1, exc)
            return
        self.log.error("Giving up on %s after %d publish attempts: %s", item.key, tries, exc)
        self.queued_tasks.pop(item.key, None)
        self.queued_callbacks.pop(item.key, None)
        self._publish_failures.pop(item.key, None)
        self.fail(item.key, info=f"could not publish to the broker after {tries} attempts: {exc}")

    # ---------------------------------------------------------------- outcomes
    def _track(self, key: Any, tracked: Tracked) -> None:
        self._tracked[key] = tracked
        self._keys_by_id[tracked.task_id] = key

    def _untrack(self, key: Any) -> Tracked | None:
        tracked = self._tracked.pop(key, None)
        if tracked is not None:
            self._keys_by_id.pop(tracked.task_id, None)
        return tracked

    def sync(self) -> None:
        if self._redis is None:
            return
        self._read_events()
        now = time.monotonic()
        if self._tracked and now >= self._next_liveness:
            self._next_liveness = now + LIVENESS_EVERY
            self._guarded(self._check_worker_liveness)
        assert self.settings is not None
        if self._tracked and now >= self._next_queue_check:
            self._next_queue_check = now + min(QUEUE_CHECK_EVERY, self.settings.unconsumed_queue_warning / 2)
            self._guarded(self._warn_unconsumed_queues)

    def _guarded(self, step: Any) -> None:
        try:
            step()
        except Exception:
            self.log.warning("AsyncQExecutor %s failed; will retry", step.__name__, exc_info=True)

    def _read_events(self) -> int:
        """Read at most ``event_batch_size`` new events. Cost follows changes, not running tasks."""
        assert self.settings is not None
        try:
            batch = events.read_since(self._redis, self.keys, self._last_event_id,
                                      self.settings.event_batch_size)
        except Exception as exc:
            self.log.warning("Reading the event stream failed (%s: %s); retrying next heartbeat",
                             type(exc).__name__, mask_url(str(exc)))
            return 0
        for stream_id, event in batch:
            self._last_event_id = stream_id
            try:
                self._apply(event.get("id", ""), event.get("kind", ""), event)
            except Exception:
                self.log.exception("Could not apply event %s %s; skipping it", stream_id, event)
        return len(batch)

    def _apply(self, task_id: str, kind: str, info: dict[str, str]) -> None:
        key = self._keys_by_id.get(task_id)
        if key is None:
            return  # not ours (another scheduler's, or already finished)
        tracked = self._tracked[key]
        if info.get("hostname"):
            tracked.hostname = info["hostname"]
        if kind == events.RECEIVED:
            tracked.received = True
        elif kind == events.STARTED:
            tracked.received = True
            self.running_state(key, task_id)
        elif kind == events.SUCCESS:
            self._untrack(key)
            self.success(key, task_id)
        elif kind == events.FAILED:
            self._untrack(key)
            reason = info.get("reason") or "failed"
            self.log.warning("Task %s failed on %s: %s", key, tracked.hostname, reason)
            self.fail(key, info=reason)
        elif kind == events.DUPLICATE:
            self.log.info("Duplicate delivery of %s dropped on %s: %s", key, info.get("hostname"),
                          info.get("reason"))

    def _check_worker_liveness(self) -> None:
        from airflow_asyncq_provider.state import registry

        assert self.settings is not None
        hosts = sorted({t.hostname for t in self._tracked.values() if t.hostname})
        if not hosts:
            return
        dead = {host for host, ok in registry.alive(self._redis, self.keys, hosts).items() if not ok}
        if not dead:
            return
        victims = [(key, t) for key, t in self._tracked.items() if t.hostname in dead]
        pipe = self._redis.pipeline(transaction=False)
        for _key, tracked in victims:
            pipe.hgetall(self.keys.task(tracked.task_id))
        for (key, tracked), record in zip(victims, pipe.execute(), strict=True):
            state = record.get("state")
            if state in events.TERMINAL:  # it finished before the worker went away
                self._apply(tracked.task_id, state, record)
                continue
            reason = (f"worker {tracked.hostname} lost: no heartbeat for more than "
                      f"{self.settings.worker_lost_timeout:g} s")
            self.log.error("Task %s: %s", key, reason)
            self._untrack(key)
            self.fail(key, info=reason)

    def _warn_unconsumed_queues(self) -> None:
        from airflow_asyncq_provider.state import registry

        assert self.settings is not None
        cutoff = time.time() - self.settings.unconsumed_queue_warning
        waiting = [t for t in self._tracked.values()
                   if not t.received and not t.warned_unconsumed and t.published_at < cutoff]
        if not waiting:
            return
        consumed = {q for w in registry.live_workers(self._redis, self.keys).values()
                    for q in (w.get("queues") or [])}
        for tracked in waiting:
            if tracked.queue not in consumed:
                tracked.warned_unconsumed = True
                self.log.warning(
                    "Workload %s has waited %.0f s on queue %r, which no live worker consumes; start "
                    "one with `airflow asyncq worker -q %s`",
                    tracked.task_id, time.time() - tracked.published_at, tracked.queue, tracked.queue)

    # ---------------------------------------------------------------- adoption and revoke
    def try_adopt_task_instances(self, tis: Sequence[TaskInstance]) -> Sequence[TaskInstance]:
        candidates = [ti for ti in tis if ti.external_executor_id]
        not_adopted = [ti for ti in tis if not ti.external_executor_id]
        if not candidates or self._redis is None:
            return list(tis)
        pipe = self._redis.pipeline(transaction=False)
        for ti in candidates:
            pipe.hgetall(self.keys.task(ti.external_executor_id))
        adopted = []
        for ti, record in zip(candidates, pipe.execute(), strict=True):
            if not record:
                not_adopted.append(ti)
                continue
            task_id = ti.external_executor_id
            tracked = Tracked(task_id, record.get("queue", ti.queue),
                              float(record.get("published_at") or time.time()),
                              hostname=record.get("hostname") or record.get("claimed_by"),
                              received="claimed_by" in record)
            self.running.add(ti.key)
            self._track(ti.key, tracked)
            state = record.get("state", "published")
            if state in events.TERMINAL or state == events.STARTED:
                self._apply(task_id, state, record)
            adopted.append(f"{ti} ({state})")
        if adopted:
            self.log.info("Adopted %d task instance(s):\n\t%s", len(adopted), "\n\t".join(adopted))
        return not_adopted

    def revoke_task(self, *, ti: TaskInstance) -> None:
        key = ti.key
        tracked = self._untrack(key)
        task_id = tracked.task_id if tracked else ti.external_executor_id
        self.running.discard(key)
        self.queued_tasks.pop(key, None)
        if not task_id or self._redis is None or self.settings is None:
            return
        try:
            record = self.keys.task(task_id)
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(record, "revoked", f"{time.time():.3f}")
            pipe.expire(record, self.settings.state_ttl)
            pipe.execute()
        except Exception:
            self.log.exception("Could not revoke %s (%s)", key, task_id)
