"""AsyncQExecutor: publishes workloads to the fleet and learns outcomes from the worker event stream.

This module is imported by the scheduler and the api-server (for ``get_task_log``), so it imports
neither Celery nor Redis at module level, and ``__init__`` opens no connection: ``start()`` does.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.executors.base_executor import BaseExecutor
from airflow.executors.workloads.types import state_class_for_key

from airflow_asyncq_provider import metrics
from airflow_asyncq_provider.errors import BrokerUnavailable, ConfigError, PublishError
from airflow_asyncq_provider.executors.liveness import LivenessMixin
from airflow_asyncq_provider.executors.outgoing import Outgoing, outgoing_for
from airflow_asyncq_provider.executors.tracking import Tracked
from airflow_asyncq_provider.redaction import mask_secrets, mask_url
from airflow_asyncq_provider.state import events, fleet_events, records
from airflow_asyncq_provider.state.keys import Keys

if TYPE_CHECKING:
    from airflow.executors.workloads import ExecutorWorkload
    from airflow.models.taskinstance import TaskInstance

    from airflow_asyncq_provider.settings import AsyncQSettings

# How often the executor checks liveness of the workers its tasks run on, and unconsumed queues.
LIVENESS_EVERY = 5.0
QUEUE_CHECK_EVERY = 30.0
# How often queue depth and age gauges are read (docs/METRICS.md), only while [metrics] is on.
QUEUE_METRICS_EVERY = 10.0


class AsyncQExecutor(LivenessMixin, BaseExecutor):
    """Runs task instances on ``airflow asyncq worker`` processes over Redis."""

    pre_assigns_external_executor_id: ClassVar[bool] = True
    supports_callbacks: bool = True
    # A team's executor reads its own [asyncq]: self.conf looks up AIRFLOW__<TEAM>___ASYNCQ__* and the
    # [<team>=asyncq] section, then the defaults; never the global [asyncq] (docs/OPERATIONS.md).
    supports_multi_team: bool = True
    is_local: bool = False
    serve_logs: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: AsyncQSettings | None = None
        self.keys = Keys()
        self._redis: Any = None
        self._tracked: dict[Any, Tracked] = {}
        self._keys_by_id: dict[str, Any] = {}
        self._last_event_id = "0-0"
        self._publish_failures: Counter[Any] = Counter()
        self._next_liveness = 0.0
        self._next_queue_check = 0.0
        self._next_queue_metrics = 0.0
        self._metric_queues: set[str] = set()  # queues reported non-empty last time
        self._redis_run_id: str | None = None
        self._recovery_at: float | None = None
        self._recovery_ids: set[str] = set()  # the workloads a Redis switch may have lost (liveness.py)
        self._grace_until = 0.0
        self._warned_stuck: set[str] = set()
        self._sole_executor = False  # set by start(): may sync() wait for events (_should_wait)?
        self._handed_work = False  # queue_workload() was called since the last sync()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
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
        self._sole_executor = _is_sole_executor()
        self.log.info("AsyncQExecutor started: broker %s, events after %s",
                      mask_url(self.settings.broker_url), self._last_event_id)

    def end(self) -> None:
        """Drain the outcomes already written to the stream, then close the connections."""
        if self._redis is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._read_events() > 0:
                pass
        self.terminate()

    def terminate(self) -> None:
        if self._redis is not None:
            self._redis.close()

    # ---------------------------------------------------------------- publishing
    def queue_workload(self, workload: Any, session: Any) -> None:
        self._handed_work = True
        super().queue_workload(workload, session)

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
        workers = self._workers_for_requests(outgoing)
        outgoing = [item for item in outgoing if not self._refuse_oversized(item, None, workers)]
        if not outgoing:
            return
        try:
            self._publish(outgoing)
        except PublishError as exc:
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
            # As BaseExecutor reports it, with the state class of the key (callbacks have their own).
            self.change_state(item.key, state_class_for_key(item.key).QUEUED, item.task_id,
                              remove_running=False)

    def _outgoing(self, workload: Any) -> Outgoing:
        assert self.settings is not None, "start() was not called"
        return outgoing_for(workload, self.settings)

    def _publish(self, outgoing: list[Outgoing]) -> None:
        """Record and publish every workload of the batch in one MULTI over the executor's Redis client.

        The record, the message and its ``sent_at`` mark land together or not at all, so an adopting
        scheduler never finds a message without its record, nor a record marked sent whose message is
        not queued (``try_adopt_task_instances``). The message id equals the pre-assigned
        ``external_executor_id``, so a second publish of the same workload (a retry, a republish) is
        claimed once and dropped as a duplicate.
        """
        from airflow_asyncq_provider.broker.messages import encode_workload

        assert self.settings is not None
        try:
            batch = [records.NewRecord(item.task_id, item.key_json, item.queue, encode_workload(
                task_id=item.task_id, payload=item.payload, meta=item.meta,
                queue=item.queue, key=item.label, priority=item.priority)) for item in outgoing]
            records.publish(self._redis, self.keys, batch, self.settings.state_ttl)
        except Exception as exc:
            for queue, count in Counter(item.queue for item in outgoing).items():
                metrics.incr("asyncq.executor.publish_failures", {"queue": queue}, count)
            raise PublishError(
                f"publishing {len(outgoing)} workload(s) to {mask_url(self.settings.broker_url)} failed: "
                f"{type(exc).__name__}: {mask_secrets(str(exc))}"
            ) from exc
        for queue, count in Counter(item.queue for item in outgoing).items():
            metrics.incr("asyncq.executor.published", {"queue": queue}, count)

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
        if self._read_events() == 0 and self._should_wait():
            wait = min(self.settings.event_wait, self.settings.publish_timeout / 2)  # within the read timeout
            self._read_events(block_ms=int(wait * 1000))
        self._handed_work = False
        if periodic and self._tracked:
            self._guarded(self._recover_lost_messages)
            self._guarded(self._check_worker_liveness)
        if self._tracked and now >= self._next_queue_check:
            self._next_queue_check = now + min(QUEUE_CHECK_EVERY, self.settings.unconsumed_queue_warning / 2)
            self._guarded(self._check_waiting)
        if now >= self._next_queue_metrics and metrics.enabled():
            self._next_queue_metrics = now + QUEUE_METRICS_EVERY
            self._guarded(self._emit_queue_metrics)
        metrics.timing("asyncq.executor.sync_duration", time.monotonic() - now)

    def _should_wait(self) -> bool:
        """Whether the scheduler is about to sleep ``scheduler_idle_sleep_time``, so that waiting here for
        an outcome costs it nothing it would not sleep anyway. It sleeps when its loop queued no task
        instance and processed no event (``SchedulerJobRunner._run_scheduler_loop``): this heartbeat was
        handed no work, no event is pending, and no other executor could have been handed any."""
        assert self.settings is not None
        return (self.settings.event_wait > 0 and self._sole_executor and bool(self._tracked)
                and not self._handed_work and not self.event_buffer)

    def _guarded(self, step: Any) -> None:
        try:
            step()
        except Exception as exc:
            self.log.warning("AsyncQExecutor %s failed (%s: %s); will retry", step.__name__,
                             type(exc).__name__, mask_secrets(str(exc)))

    def _read_events(self, block_ms: int | None = None) -> int:
        """Read at most ``event_batch_size`` new events. Cost follows changes, not running tasks."""
        assert self.settings is not None
        try:
            batch = events.read_since(self._redis, self.keys, self._last_event_id,
                                      self.settings.event_batch_size, block_ms)
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
        metrics.incr("asyncq.executor.events_applied", {"kind": kind})
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
    def _republish(self, items: list[Outgoing], why: str, reason: str = "other") -> bool:
        """``reason``: a short kind for the metric (redis_restart, token_expired); ``why``: for people.
        False when the publish failed: the caller keeps what it needs to try again."""
        try:
            self._publish(items)
        except PublishError as exc:
            self.log.warning("Re-publishing %d workload(s) (%s) failed, will retry: %s", len(items), why, exc)
            return False
        metrics.incr("asyncq.executor.republished", {"reason": reason}, len(items))
        for item in items:
            self._tracked[item.key].published_at = time.time()
            self.log.warning("Re-published %s as %s: %s", item.key, item.task_id, why)
            self._fleet_event(fleet_events.REPUBLISHED, task=item.task_id, key=item.label, reason=why)
        return True

    def _fleet_event(self, kind: str, **fields: Any) -> None:
        """For the fleet page; losing one of these must never disturb the scheduler loop."""
        try:
            fleet_events.record(self._redis, self.keys, kind, **fields)
        except Exception:
            self.log.debug("Could not record fleet event %s", kind, exc_info=True)

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
        fresh = item.with_fresh_token(self.jwt_generator)
        tracked.outgoing = fresh
        metrics.incr("asyncq.executor.token_refreshes", {"queue": item.queue})
        self._republish([fresh], "its token expired while it waited in the queue; sent with a fresh token",
                        reason="token_expired")

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
        adopted = []
        found = records.read(self._redis, self.keys, [ti.external_executor_id for ti in candidates])
        for ti, record in zip(candidates, found, strict=True):
            if not record:
                not_adopted.append(ti)
                continue
            task_id = ti.external_executor_id
            if records.never_sent(record):
                # Its scheduler wrote the record and died before the message was sent (or before it
                # marked it sent). Holding no workload, this executor cannot send it, so adopting it would
                # leave it queued until [scheduler] task_queued_timeout. Not adopted, Airflow resets it
                # (jobs/scheduler_job_runner.py, adopt_or_reset_orphaned_tasks: every TI returned here
                # gets prepare_db_for_next_try, which gives it a new id, then state None and no
                # external_executor_id) and schedules it again, as its next try number. Nothing ran, so
                # nothing runs twice. Records of older versions have no sent mark and read the same: a
                # message that was in fact sent reaches a worker whose Execution API call is refused,
                # since the reset TI has a new id.
                self.log.warning("Not adopting %s: record %s shows no sign that its message was ever sent "
                                 "(its scheduler died between recording and sending it); Airflow resets "
                                 "it and queues it again", ti, task_id)
                self._revoke_record(task_id)  # a message that did go out is dropped before it is claimed
                not_adopted.append(ti)
                continue
            tracked = Tracked(task_id, record.get(records.QUEUE, ti.queue),
                              float(record.get(records.PUBLISHED_AT) or time.time()),
                              hostname=records.owner_of(record), received=records.is_claimed(record))
            self.running.add(ti.key)
            self._track(ti.key, tracked)
            state = record.get(records.STATE, records.PUBLISHED)
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
            records.revoke(self._redis, self.keys, task_id, self.settings.state_ttl)
        except Exception:
            self.log.exception("Could not revoke %s", task_id)


def _is_sole_executor() -> bool:
    """True when the scheduler runs no executor but an AsyncQExecutor (any team's counts as another)."""
    try:
        from airflow.executors.executor_loader import ExecutorLoader

        names = ExecutorLoader.get_executor_names(validate_teams=False)
        return len(names) == 1 and issubclass(ExecutorLoader.import_executor_cls(names[0])[0], AsyncQExecutor)
    except Exception:
        return False  # unknown: never make another executor's work wait
