"""The executor's recovery duties, run every few heartbeats: a Redis that restarted and forgot queued
messages, workers that stopped heartbeating or lost a lease, queues nobody consumes, and memory
requests no worker could ever admit. Also the queue gauges (docs/METRICS.md), read on the same cadence.

A mixin of ``AsyncQExecutor``: these steps read and change the same tracking tables as publishing and
outcomes, and they run on the scheduler's thread between two ``sync`` calls.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider import metrics
from airflow_asyncq_provider.state import events, fleet_events, records, registry

if TYPE_CHECKING:
    from airflow_asyncq_provider.executors.outgoing import Outgoing
    from airflow_asyncq_provider.executors.tracking import Tracked
    from airflow_asyncq_provider.settings import AsyncQSettings
    from airflow_asyncq_provider.state.keys import Keys


class LivenessMixin:
    settings: AsyncQSettings | None
    keys: Keys
    _redis: Any
    _tracked: dict[Any, Tracked]
    _redis_run_id: str | None
    _recovery_at: float | None
    _recovery_ids: set[str]
    _grace_until: float
    _last_event_id: str
    _warned_stuck: set[str]
    _metric_queues: set[str]
    log: Any

    queued_tasks: dict[Any, Any]
    queued_callbacks: dict[Any, Any]

    if TYPE_CHECKING:  # provided by AsyncQExecutor and BaseExecutor; never defined here (MRO)
        def _apply(self, task_id: str, kind: str, info: dict[str, str]) -> None: ...
        def _untrack(self, key: Any) -> Tracked | None: ...
        def _republish(self, items: list[Outgoing], why: str, reason: str = "other") -> bool: ...
        def _revoke_record(self, task_id: str) -> None: ...
        def _fleet_event(self, kind: str, **fields: Any) -> None: ...
        def fail(self, key: Any, info: Any = None) -> None: ...

    def _check_redis_restart(self) -> None:
        """A Redis that keeps nothing on disk forgets queues, records and the stream when it restarts."""
        assert self.settings is not None
        run_id = self._redis.info("server").get("run_id")
        if self._redis_run_id is None:
            self._redis_run_id = run_id
        elif run_id != self._redis_run_id:
            self._redis_run_id = run_id
            failover = self._last_event_id != "0-0" and events.contains(self._redis, self.keys,
                                                                        self._last_event_id)
            if not failover:
                self._last_event_id = "0-0"  # the stream was recreated: read it from its start
            # Either way the last writes before the switch may be gone (a replica lags its master).
            # Workers re-assert claims and leases within one heartbeat; only then can "no record"
            # be trusted to mean "no worker has it". Only what was waiting when the switch was seen
            # can have been lost with it: a workload published later went to the new Redis. An
            # earlier switch's candidates still count. With none, nothing is armed.
            self._recovery_ids |= {t.task_id for t in self._tracked.values() if not t.started and t.outgoing}
            self._recovery_at = (time.monotonic() + 2 * self.settings.worker_heartbeat_interval
                                 if self._recovery_ids else None)
            self._grace_until = time.monotonic() + self.settings.worker_lost_timeout
            what = "failed over to a replica that kept the event stream" if failover else "restarted"
            if self._recovery_ids:
                self.log.warning("Redis %s (run_id changed); checking %d unstarted workload(s) for lost "
                                 "messages after the workers' next heartbeat", what, len(self._recovery_ids))
            else:
                self.log.warning("Redis %s (run_id changed); this executor tracked no unstarted workload, so "
                                 "it lost none", what)

    def _recover_lost_messages(self) -> None:
        if self._recovery_at is None or time.monotonic() < self._recovery_at:
            return
        assert self.settings is not None
        # Disarmed only once the check and the re-publish got through: just after a switch, Redis may
        # still refuse both. Until then it is tried again every heartbeat interval, for the same ids.
        self._recovery_at = time.monotonic() + self.settings.worker_heartbeat_interval
        waiting = self._recovery_ids
        candidates = [t for t in self._tracked.values() if not t.started and t.outgoing and t.task_id in waiting]
        if candidates:
            owners = records.claimants(self._redis, self.keys, [t.task_id for t in candidates])
            lost = [t.outgoing for t, owner in zip(candidates, owners, strict=True) if not owner and t.outgoing]
            if lost and not self._republish(lost, "Redis restarted and lost it before any worker claimed it",
                                            reason="redis_restart"):
                self._recovery_ids = {item.task_id for item in lost}
                return
        self._recovery_at = None
        self._recovery_ids = set()

    def _check_worker_liveness(self) -> None:
        """Fail the tasks of a worker that stopped heartbeating or restarted, or whose lease ran out."""
        assert self.settings is not None
        if time.monotonic() < self._grace_until:
            return  # just after a Redis restart, registry and leases are being rebuilt
        started = [(key, t) for key, t in self._tracked.items() if t.started or t.hostname]
        if not started:
            return
        hosts = sorted({t.hostname for _key, t in started if t.hostname})
        listed = registry.running_on(self._redis, self.keys, hosts)  # None: the host's heartbeat expired
        started = self._not_listed(started, listed)
        if not started:
            return
        replies = records.with_leases(self._redis, self.keys, [t.task_id for _key, t in started])
        now = time.monotonic()
        lost_workers: set[str] = set()
        for (key, tracked), (has_lease, record) in zip(started, replies, strict=True):
            state = record.get(records.STATE)
            if state in events.TERMINAL:  # it finished; the event may still be on its way
                self._apply(tracked.task_id, state, record)
                continue
            if not tracked.started:
                continue
            reason = self._lost_reason(tracked, listed.get(tracked.hostname or ""), has_lease, record, now)
            if reason is None:
                continue
            self.log.error("Task %s: %s", key, reason)
            self._untrack(key)
            self.fail(key, info=reason)
            kind = fleet_events.LEASE_EXPIRED if reason.startswith("lease") else fleet_events.WORKER_LOST
            self._fleet_event(kind, worker=tracked.hostname, task=tracked.task_id, reason=reason)
            metrics.incr("asyncq.executor.tasks_lost", {"reason": kind})
            if kind == fleet_events.WORKER_LOST:
                lost_workers.add(tracked.hostname or "")
        for worker in sorted(lost_workers):  # once per worker: its other tasks were failed just now
            metrics.incr("asyncq.executor.workers_lost", {"worker": worker})

    @staticmethod
    def _not_listed(started: list[tuple[Any, Tracked]],
                    listed: dict[str, registry.Listing | None]) -> list[tuple[Any, Tracked]]:
        """The started tasks whose live worker does not list them in its latest heartbeat.

        A worker lists exactly the tasks whose leases it renews right after that heartbeat, so a listed
        task has its lease, has not ended, and costs no read. Only the others (just started, just
        finished, forgotten, on a lost worker, or on a worker restarted under the same name) have their
        lease and record read, as before.
        """
        rest = []
        for key, tracked in started:
            listing = listed.get(tracked.hostname or "")
            if tracked.started and listing is not None and tracked.task_id in listing.task_ids:
                tracked.lease_missing_since = None
            else:
                rest.append((key, tracked))
        return rest

    def _lost_reason(self, tracked: Tracked, listing: registry.Listing | None, has_lease: bool,
                     record: dict[str, str], now: float) -> str | None:
        """Why a started task that its worker does not list is lost, or None while it may still run.
        ``listing`` is its worker's latest heartbeat (None: expired), ``record`` the task's record."""
        assert self.settings is not None
        if listing is None:
            return (f"worker {tracked.hostname} lost: no heartbeat for more than "
                    f"{self.settings.worker_lost_timeout:g} s")
        restarted = self._restart_reason(tracked, listing, record)
        if restarted is not None:
            return restarted
        if has_lease:
            tracked.lease_missing_since = None
            return None
        tracked.lease_missing_since = tracked.lease_missing_since or now
        if now - tracked.lease_missing_since < self.settings.worker_lost_timeout:
            return None
        return f"lease expired: worker {tracked.hostname} is alive but no longer runs this task"

    @staticmethod
    def _restart_reason(tracked: Tracked, listing: registry.Listing, record: dict[str, str]) -> str | None:
        """The node's live process started after this task did: a new process took over the name (a
        supervisor restarted a killed worker), and the one that ran the task is gone. Its lease runs on
        for up to ``worker_lost_timeout`` with nobody renewing it, so waiting for it proves nothing.

        Both times come from that node's own clock: ``started_at`` of the task's record is written by
        the process that started it (a restarted process takes over only a claim nobody reported
        received, worker/runner.py ``_claim``, and then writes its own start), ``started_at`` of the
        registry by the process that heartbeats now.
        A record some other node wrote, or one without a start time (rebuilt after a Redis restart),
        proves nothing either way: the lease decides, as before.
        """
        task_started = events.happened_at(record, events.STARTED)
        if task_started is None or records.owner_of(record) != tracked.hostname:
            return None
        if not listing.started_after(task_started):
            return None
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(listing.started_at))
        return (f"worker {tracked.hostname} lost: it restarted (pid {listing.pid or '?'}, started at {since}) "
                "after it took this task; the process that ran it is gone")

    def _check_waiting(self) -> None:
        """Workloads nobody has taken yet: warn about unconsumed queues, refuse impossible requests."""
        assert self.settings is not None
        cutoff = time.time() - self.settings.unconsumed_queue_warning
        waiting = [(key, t) for key, t in self._tracked.items() if not t.received]
        if not waiting:
            return
        live = registry.live_workers(self._redis, self.keys)  # read once for every waiting item
        consumed = registry.consumed_queues(live)
        self._warn_stuck_consumers(live)
        for key, tracked in waiting:
            if tracked.outgoing is not None and self._refuse_oversized(tracked.outgoing, tracked, live):
                continue
            if tracked.queue not in consumed and not tracked.warned_unconsumed and tracked.published_at < cutoff:
                tracked.warned_unconsumed = True
                self.log.warning(
                    "Workload %s (%s) has waited %.0f s on queue %r, which no live worker consumes; start "
                    "one with `airflow asyncq worker -q %s`",
                    tracked.task_id, key, time.time() - tracked.published_at, tracked.queue, tracked.queue)

    def _emit_queue_metrics(self) -> None:
        """Depth and oldest age of the queues this executor tracks work on or a live worker consumes,
        plus those that were non-empty last time (so a drained queue reports its 0). At most six round trips
        whatever the number of queues, every QUEUE_METRICS_EVERY, and only while metrics are on."""
        from airflow_asyncq_provider.state.queues import depths

        consumed = registry.consumed_queues(registry.live_workers(self._redis, self.keys))
        queues = sorted(consumed | self._metric_queues | {t.queue for t in self._tracked.values()})
        found = depths(self._redis, self.keys, queues)
        for depth in found:
            metrics.gauge("asyncq.queue.depth", depth.depth, {"queue": depth.queue})
            metrics.gauge("asyncq.queue.oldest_age", depth.oldest_age or 0.0, {"queue": depth.queue})
        self._metric_queues = {depth.queue for depth in found if depth.depth}

    def _warn_stuck_consumers(self, live: dict[str, dict[str, Any]]) -> None:
        for name, info in live.items():
            verdict = registry.health(info, time.time())
            if registry.is_stuck(verdict) and name not in self._warned_stuck:
                self._warned_stuck.add(name)
                self.log.warning("Worker %s heartbeats but its consumer is %s: it takes no new work; "
                                 "restart it (`airflow asyncq status` shows it)", name, verdict)
            elif not registry.is_stuck(verdict):
                self._warned_stuck.discard(name)

    def _workers_for_requests(self, items: list[Outgoing]) -> dict[str, dict[str, Any]]:
        """The live workers, read once for a batch and only when one of its items asks for more memory
        than the default; {} when the registry is unreachable (publish, and let the workers decide)."""
        assert self.settings is not None
        if all(item.meta["memory_request"] <= self.settings.default_memory_request for item in items):
            return {}
        try:
            return registry.live_workers(self._redis, self.keys)
        except Exception:
            return {}

    def _refuse_oversized(self, item: Outgoing, tracked: Tracked | None,
                          workers: dict[str, dict[str, Any]]) -> bool:
        """Fail a task whose memory request no live worker on its queue could ever admit."""
        from airflow_asyncq_provider.sizes import format_size

        assert self.settings is not None
        request = item.meta["memory_request"]
        if request <= self.settings.default_memory_request:
            return False
        largest = registry.largest_budget(workers, item.queue)
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
