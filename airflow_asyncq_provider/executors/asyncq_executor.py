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

from airflow_asyncq_provider.errors import BrokerUnavailable, ConfigError, PublishError
from airflow_asyncq_provider.state import events
from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.state.urls import mask_secrets, mask_url

if TYPE_CHECKING:
    from airflow.executors.workloads import ExecutorWorkload
    from airflow.models.taskinstance import TaskInstance

    from airflow_asyncq_provider.settings import AsyncQSettings

# How often the executor checks liveness of the workers its tasks run on, and unconsumed queues.
LIVENESS_EVERY = 5.0
QUEUE_CHECK_EVERY = 30.0


@dataclasses.dataclass(frozen=True)
class Outgoing:
    key: Any
    task_id: str
    queue: str
    priority: int
    workload: Any
    meta: dict[str, Any]
    key_json: str


@dataclasses.dataclass
class Tracked:
    """What the executor remembers of one workload it published (or adopted)."""

    task_id: str
    queue: str
    published_at: float
    hostname: str | None = None
    received: bool = False
    started: bool = False
    warned_unconsumed: bool = False
    # Kept until a worker starts it, so the executor can publish it again (Redis lost it, or its
    # token expired in the queue). ``None`` for adopted work, which this scheduler never published.
    outgoing: Outgoing | None = None
    lease_missing_since: float | None = None


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
        self._redis_run_id: str | None = None
        self._recovery_at: float | None = None
        self._grace_until = 0.0
        self._warned_stuck: set[str] = set()

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
            # max_retries=0: a dead broker fails this publish at once instead of sleeping in kombu's
            # reconnect back-off inside the scheduler loop; the next heartbeat tries again.
            connection = self._app.connection_for_write(transport_options={"max_retries": 0})
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
        outgoing = []
        for workload in workload_items:
            try:
                outgoing.append(self._outgoing(workload))
            except ConfigError as exc:  # a bad executor_config fails this task, visibly, and only it
                key = workload.key
                self.queued_tasks.pop(key, None)
                self.queued_callbacks.pop(key, None)
                self.log.error("Not queueing %s: %s", key, exc)
                self.fail(key, info=str(exc))
        outgoing = [item for item in outgoing if not self._refuse_oversized(item)]
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
            self._track(item.key, Tracked(item.task_id, item.queue, now, outgoing=item))
            self.event_buffer[item.key] = (TaskInstanceState.QUEUED, item.task_id)

    def _largest_budget(self, queue: str) -> int | None:
        """The largest memory budget of the live workers consuming ``queue``; None if there are none."""
        from airflow_asyncq_provider.state import registry

        budgets = [int(w.get("memory_budget") or 0) for w in registry.live_workers(self._redis, self.keys).values()
                   if queue in (w.get("queues") or [])]
        return max(budgets) if budgets else None

    def _refuse_oversized(self, item: Outgoing, tracked: Tracked | None = None) -> bool:
        """Fail a task whose memory request no live worker on its queue could ever admit."""
        from airflow_asyncq_provider.memory.sizes import format_size

        assert self.settings is not None
        request = item.meta["memory_request"]
        if request <= self.settings.default_memory_request:
            return False
        try:
            largest = self._largest_budget(item.queue)
        except Exception:
            return False  # the registry is unreachable: publish, and let the workers decide
        if largest is None or request <= largest:
            return False
        reason = (f"memory request {format_size(request)} exceeds every worker's memory budget on queue "
                  f"{item.queue!r} (largest: {format_size(largest)}); lower executor_config['asyncq']"
                  "['memory_request'] or start a worker with a larger --memory-budget")
        self.log.error("Task %s: %s", item.key, reason)
        self.queued_tasks.pop(item.key, None)
        self.queued_callbacks.pop(item.key, None)
        if tracked is not None:
            self._untrack(item.key)
            self._revoke_record(item.task_id)
        self.fail(item.key, info=reason)
        return True

    def _outgoing(self, workload: Any) -> Outgoing:
        from airflow.executors.workloads import ExecuteCallback, ExecuteTask

        from airflow_asyncq_provider.celery_app import priority_step
        from airflow_asyncq_provider.memory.requests import memory_spec

        assert self.settings is not None, "start() was not called"
        if isinstance(workload, ExecuteTask):
            ti = workload.ti
            task_id = ti.external_executor_id or str(ti.id)
            key_json = json.dumps({"dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id,
                                   "try_number": ti.try_number, "map_index": ti.map_index})
            spec = memory_spec(ti.executor_config, f"{ti.dag_id}.{ti.task_id}",
                               self.settings.default_memory_request, self.settings.default_memory_limit)
            return Outgoing(ti.key, task_id, ti.queue or self.settings.default_queue,
                            priority_step(ti.priority_weight), workload, spec.as_meta(), key_json)
        if isinstance(workload, ExecuteCallback):
            data = workload.callback.data if isinstance(workload.callback.data, dict) else {}
            queue = data.get("queue") or self.settings.default_queue
            meta = {"memory_request": self.settings.default_memory_request,
                    "memory_limit": self.settings.default_memory_limit}
            return Outgoing(workload.callback.key, str(workload.callback.id), queue, 0, workload, meta,
                            json.dumps({"callback_id": str(workload.callback.id)}))
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
                        EXECUTE_WORKLOAD, args=(item.workload.model_dump_json(), item.meta),
                        task_id=item.task_id, queue=item.queue, priority=item.priority,
                        producer=producer, retry=False,
                        # what Celery logs and Flower shows instead of the payload, which holds a token
                        argsrepr=f"(<workload {item.key_json}>)", kwargsrepr="{}",
                    )
        except Exception as exc:
            raise PublishError(
                f"publishing {len(outgoing)} workload(s) to {mask_url(self.settings.broker_url)} failed: "
                f"{type(exc).__name__}: {mask_secrets(str(exc))}"
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
        previous = self._tracked.get(key)
        if previous is not None:  # a deferred task resumed: its old workload's events are not news
            self._keys_by_id.pop(previous.task_id, None)
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
        assert self.settings is not None
        now = time.monotonic()
        periodic = now >= self._next_liveness
        if periodic:
            self._next_liveness = now + LIVENESS_EVERY
            self._guarded(self._check_redis_restart)
        self._read_events()
        if periodic and self._tracked:
            self._guarded(self._recover_lost_messages)
            self._guarded(self._check_worker_liveness)
        if self._tracked and now >= self._next_queue_check:
            self._next_queue_check = now + min(QUEUE_CHECK_EVERY, self.settings.unconsumed_queue_warning / 2)
            self._guarded(self._check_waiting)

    def _guarded(self, step: Any) -> None:
        try:
            step()
        except Exception as exc:
            self.log.warning("AsyncQExecutor %s failed (%s: %s); will retry", step.__name__,
                             type(exc).__name__, mask_secrets(str(exc)))

    def _read_events(self) -> int:
        """Read at most ``event_batch_size`` new events. Cost follows changes, not running tasks."""
        assert self.settings is not None
        try:
            batch = events.read_since(self._redis, self.keys, self._last_event_id,
                                      self.settings.event_batch_size)
        except Exception as exc:
            self.log.warning("Reading the event stream failed (%s: %s); retrying next heartbeat",
                             type(exc).__name__, mask_secrets(str(exc)))
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
        tracked = self._tracked.get(key)
        if tracked is None or tracked.task_id != task_id:
            return  # an earlier workload of the same key (e.g. before it deferred)
        if info.get("hostname") and kind != events.DUPLICATE:  # the dropping worker is not the runner
            tracked.hostname = info["hostname"]
        if kind == events.RECEIVED:
            tracked.received = True
        elif kind == events.STARTED:
            tracked.received = tracked.started = True
            tracked.outgoing = None  # started: never published again
            self.running_state(key, task_id)
        elif kind == events.SUCCESS:
            self._untrack(key)
            self.success(key, task_id)
        elif kind in (events.FAILED, events.REVOKED):
            self._untrack(key)
            reason = info.get("reason") or kind
            self.log.warning("Task %s failed on %s: %s", key, tracked.hostname, reason)
            self.fail(key, info=reason)
        elif kind == events.TOKEN_EXPIRED:
            self._republish_with_fresh_token(key, tracked)
        elif kind == events.DUPLICATE:
            self.log.info("Duplicate delivery of %s dropped on %s: %s", key, info.get("hostname"),
                          info.get("reason"))

    # ---------------------------------------------------------------- recovery
    def _republish(self, items: list[Outgoing], why: str) -> None:
        try:
            self._publish(items)
        except PublishError as exc:
            self._reset_producer()
            self.log.warning("Re-publishing %d workload(s) (%s) failed, will retry: %s", len(items), why, exc)
            return
        for item in items:
            self._tracked[item.key].published_at = time.time()
            self.log.warning("Re-published %s as %s: %s", item.key, item.task_id, why)

    def _republish_with_fresh_token(self, key: Any, tracked: Tracked) -> None:
        """A worker found the workload's token expired before starting it; mint a new one and resend.

        The worker dropped the message without claiming it, so the same id is still unclaimed and
        exactly one worker will run the new message.
        """
        item = tracked.outgoing
        if item is None or tracked.started:
            self.log.error("Task %s waited past its token's validity and was not published by this "
                           "scheduler, so it cannot be refreshed", key)
            self._untrack(key)
            self.fail(key, info="token expired while the workload waited in the queue "
                                "([scheduler] task_queued_timeout); Airflow retries it")
            return
        subject = str(item.workload.ti.id) if hasattr(item.workload, "ti") else str(item.workload.callback.id)
        token = type(item.workload).generate_token(subject, self.jwt_generator)
        fresh = dataclasses.replace(item, workload=item.workload.model_copy(update={"token": token}))
        tracked.outgoing = fresh
        self._republish([fresh], "its token expired while it waited in the queue; sent with a fresh token")

    def _check_redis_restart(self) -> None:
        """A Redis that keeps nothing on disk forgets queues, records and the stream when it restarts."""
        run_id = self._redis.info("server").get("run_id")
        if self._redis_run_id is None:
            self._redis_run_id = run_id
        elif run_id != self._redis_run_id:
            self._redis_run_id = run_id
            self._last_event_id = "0-0"  # the stream was recreated: read it from its start
            assert self.settings is not None
            # Workers re-assert claims and leases within one heartbeat; only then can "no record"
            # be trusted to mean "no worker has it".
            self._recovery_at = time.monotonic() + 2 * self.settings.worker_heartbeat_interval
            self._grace_until = time.monotonic() + self.settings.worker_lost_timeout
            self.log.warning("Redis restarted (run_id changed); checking %d tracked workload(s) for lost "
                             "messages after the workers' next heartbeat", len(self._tracked))

    def _recover_lost_messages(self) -> None:
        if self._recovery_at is None or time.monotonic() < self._recovery_at:
            return
        self._recovery_at = None
        candidates = [(key, t) for key, t in self._tracked.items() if not t.started and t.outgoing]
        if not candidates:
            return
        pipe = self._redis.pipeline(transaction=False)
        for _key, tracked in candidates:
            pipe.hget(self.keys.task(tracked.task_id), "claimed_by")
        lost = [t.outgoing for (_k, t), owner in zip(candidates, pipe.execute(), strict=True) if not owner]
        if lost:
            self._republish([item for item in lost if item is not None],
                            "Redis restarted and lost it before any worker claimed it")

    def _check_worker_liveness(self) -> None:
        """Fail the tasks of a worker that stopped heartbeating, or whose lease ran out."""
        from airflow_asyncq_provider.state import registry

        assert self.settings is not None
        if time.monotonic() < self._grace_until:
            return  # just after a Redis restart, registry and leases are being rebuilt
        started = [(key, t) for key, t in self._tracked.items() if t.started or t.hostname]
        if not started:
            return
        hosts = sorted({t.hostname for _key, t in started if t.hostname})
        alive = registry.alive(self._redis, self.keys, hosts)
        pipe = self._redis.pipeline(transaction=False)
        for _key, tracked in started:
            pipe.exists(self.keys.lease(tracked.task_id))
            pipe.hgetall(self.keys.task(tracked.task_id))
        replies = pipe.execute()
        now = time.monotonic()
        for (key, tracked), has_lease, record in zip(started, replies[0::2], replies[1::2], strict=True):
            state = record.get("state")
            if state in events.TERMINAL:  # it finished; the event may still be on its way
                self._apply(tracked.task_id, state, record)
                continue
            if not tracked.started:
                continue
            if not alive.get(tracked.hostname or "", False):
                reason = (f"worker {tracked.hostname} lost: no heartbeat for more than "
                          f"{self.settings.worker_lost_timeout:g} s")
            elif has_lease:
                tracked.lease_missing_since = None
                continue
            else:
                tracked.lease_missing_since = tracked.lease_missing_since or now
                if now - tracked.lease_missing_since < self.settings.worker_lost_timeout:
                    continue
                reason = f"lease expired: worker {tracked.hostname} is alive but no longer runs this task"
            self.log.error("Task %s: %s", key, reason)
            self._untrack(key)
            self.fail(key, info=reason)

    def _check_waiting(self) -> None:
        """Workloads nobody has taken yet: warn about unconsumed queues, refuse impossible requests."""
        from airflow_asyncq_provider.state import registry

        assert self.settings is not None
        cutoff = time.time() - self.settings.unconsumed_queue_warning
        waiting = [(key, t) for key, t in self._tracked.items() if not t.received]
        if not waiting:
            return
        live = registry.live_workers(self._redis, self.keys)
        consumed = {q for w in live.values() for q in (w.get("queues") or [])}
        self._warn_stuck_consumers(live)
        for key, tracked in waiting:
            if tracked.outgoing is not None and self._refuse_oversized(tracked.outgoing, tracked):
                continue
            if tracked.queue not in consumed and not tracked.warned_unconsumed and tracked.published_at < cutoff:
                tracked.warned_unconsumed = True
                self.log.warning(
                    "Workload %s (%s) has waited %.0f s on queue %r, which no live worker consumes; start "
                    "one with `airflow asyncq worker -q %s`",
                    tracked.task_id, key, time.time() - tracked.published_at, tracked.queue, tracked.queue)

    def _warn_stuck_consumers(self, live: dict[str, dict[str, Any]]) -> None:
        from airflow_asyncq_provider.cli.status import health

        for name, info in live.items():
            verdict = health(info, time.time())
            if verdict.startswith("stuck") and name not in self._warned_stuck:
                self._warned_stuck.add(name)
                self.log.warning("Worker %s heartbeats but its consumer is %s: it takes no new work; "
                                 "restart it (`airflow asyncq status` shows it)", name, verdict)
            elif not verdict.startswith("stuck"):
                self._warned_stuck.discard(name)

    # ---------------------------------------------------------------- adoption and revoke
    def try_adopt_task_instances(self, tis: Sequence[TaskInstance]) -> Sequence[TaskInstance]:
        # A scheduler whose own heartbeat ran late can be asked to adopt work it already tracks;
        # keep what it knows (it holds the workload, for republishing) and just say yes.
        mine = [ti for ti in tis if ti.key in self._tracked]
        candidates = [ti for ti in tis if ti.external_executor_id and ti.key not in self._tracked]
        not_adopted = [ti for ti in tis if not ti.external_executor_id and ti.key not in self._tracked]
        if mine:
            self.log.info("Kept %d task instance(s) this executor already tracks", len(mine))
        if self._redis is None:
            return [ti for ti in tis if ti not in mine]
        if not candidates:
            return not_adopted
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
        """Drop a workload that has not started and stop one that runs; never raises."""
        key = ti.key
        tracked = self._untrack(key)
        task_id = tracked.task_id if tracked else ti.external_executor_id
        self.running.discard(key)
        self.queued_tasks.pop(key, None)
        if task_id:
            self._revoke_record(task_id)

    def _revoke_record(self, task_id: str) -> None:
        """Workers drop a revoked message before claiming it, and stop it within a heartbeat if running."""
        if self._redis is None or self.settings is None:
            return
        try:
            record = self.keys.task(task_id)
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(record, "revoked", f"{time.time():.3f}")
            pipe.expire(record, self.settings.state_ttl)
            pipe.execute()
        except Exception:
            self.log.exception("Could not revoke %s", task_id)
