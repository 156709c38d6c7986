"""Every metric the provider emits, declared once in ``METRICS``, and the only way to emit one.

Metrics go through Airflow's ``Stats``, so they reach whatever ``[metrics]`` configures: StatsD,
DogStatsD or OpenTelemetry. The names are our own (``asyncq.*``), never one of Airflow's registry, whose
names must carry their ``name_variables`` as tags (DESIGN.md, "Metrics").

Tags: a backend that carries tags (DogStatsD, OpenTelemetry, StatsD with ``statsd_influxdb_enabled``)
gets them as tags. Plain StatsD drops tags, so while Airflow's own ``[metrics] legacy_names_on`` is on
(its default) every tagged metric is also sent under a name with its tag values appended in the declared
order, the way Airflow sends its legacy names: ``asyncq.worker.task_duration.<worker>.<queue>.<outcome>``.
docs/METRICS.md lists both forms.

A metric that is not declared here, or is emitted with other tags than declared, is refused: it raises
``UnknownMetric`` under pytest and is logged once otherwise. A failing metrics backend never reaches
the caller (the executor loop or a task): its error is logged at debug.

``Stats`` is imported on first use, never at import time: the scheduler imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

from airflow_asyncq_provider.errors import AsyncQError

log = logging.getLogger(__name__)

COUNTER, GAUGE, TIMER = "counter", "gauge", "timer"

#: Airflow's rule for stat names is ``[a-zA-Z0-9_.-]``, and with ``statsd_influxdb_enabled`` tags are
#: part of the name, so anything else in a tag value (the ``@`` of ``w1@host``) becomes ``_``.
_NOT_ALLOWED = re.compile(r"[^a-zA-Z0-9_.-]")


class UnknownMetric(AsyncQError):
    """A metric emitted that ``METRICS`` does not declare (or with other tags than declared)."""


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    type: str
    tags: tuple[str, ...]
    description: str

    def per_tag_name(self, tags: Mapping[str, str]) -> str:
        """The name plain StatsD gets: tag values appended in declared order (``.`` becomes ``__``)."""
        return ".".join([self.name, *(tags[t].replace(".", "__") for t in self.tags)])


_DECLARED = (
    # ------------------------------------------------------------------ the executor (scheduler)
    Metric("asyncq.executor.published", COUNTER, ("queue",),
           "Workload messages sent to the broker: first publishes and re-publishes."),
    Metric("asyncq.executor.publish_failures", COUNTER, ("queue",),
           "Workloads whose publish failed (each is retried next heartbeat, up to publish_max_retries)."),
    Metric("asyncq.executor.events_applied", COUNTER, ("kind",),
           "Worker events this executor applied to work it tracks (received, started, success, ...)."),
    Metric("asyncq.executor.sync_duration", TIMER, (),
           "Time one executor sync took (reading events and the periodic checks)."),
    Metric("asyncq.executor.workers_lost", COUNTER, ("worker",),
           "Workers found without a heartbeat while running this executor's tasks."),
    Metric("asyncq.executor.tasks_lost", COUNTER, ("reason",),
           "Tasks failed as lost; reason is worker_lost or lease_expired."),
    Metric("asyncq.executor.republished", COUNTER, ("reason",),
           "Workloads published again; reason is redis_restart or token_expired."),
    Metric("asyncq.executor.token_refreshes", COUNTER, ("queue",),
           "Workloads whose token expired in the queue and were sent again with a fresh one."),
    Metric("asyncq.queue.depth", GAUGE, ("queue",),
           "Messages waiting in the broker queue, all priority steps (every 10 s)."),
    Metric("asyncq.queue.oldest_age", GAUGE, ("queue",),
           "Seconds the oldest waiting workload has waited; 0 when the queue is empty (every 10 s)."),
    # ------------------------------------------------------------------ the worker
    Metric("asyncq.worker.slots_busy", GAUGE, ("worker",), "Slots running a workload (each heartbeat)."),
    Metric("asyncq.worker.slots_free", GAUGE, ("worker",), "Slots not running a workload (each heartbeat)."),
    Metric("asyncq.worker.memory_budget", GAUGE, ("worker",), "The worker's memory budget, bytes."),
    Metric("asyncq.worker.memory_budget_used", GAUGE, ("worker",),
           "Bytes of the budget reserved by admitted workloads' memory requests (each heartbeat)."),
    Metric("asyncq.worker.memory_in_use", GAUGE, ("worker",),
           "Bytes the watchdog last measured in the running workloads' processes (each heartbeat)."),
    Metric("asyncq.worker.admissions_deferred", COUNTER, ("worker", "queue"),
           "Workloads handed back to the queue because their memory request did not fit the free budget."),
    Metric("asyncq.worker.memory_kills", COUNTER, ("worker", "queue"),
           "Workloads killed for exceeding their memory limit."),
    Metric("asyncq.worker.task_duration", TIMER, ("worker", "queue", "outcome"),
           "From fork to exit of one workload; outcome is success, failed, revoked or duplicate."),
    Metric("asyncq.worker.fork_time", TIMER, ("worker",), "Time the fork server took to start one workload."),
    Metric("asyncq.worker.dead_letters", COUNTER, ("worker", "queue"),
           "Messages rejected into the dead-letter list."),
)
METRICS: dict[str, Metric] = {m.name: m for m in _DECLARED}

# Filled on first use: the Stats shim and two [metrics] switches. reset() empties them (tests).
_cache: dict[str, Any] = {}
_refused: set[str] = set()


def incr(name: str, tags: Mapping[str, Any] | None = None, count: int = 1) -> None:
    _emit(name, COUNTER, tags, count)


def gauge(name: str, value: float, tags: Mapping[str, Any] | None = None) -> None:
    _emit(name, GAUGE, tags, value)


def timing(name: str, seconds: float, tags: Mapping[str, Any] | None = None) -> None:
    _emit(name, TIMER, tags, seconds)


@contextlib.contextmanager
def timed(name: str, tags: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Time the block; the timing is sent even when the block raises."""
    started = time.monotonic()
    try:
        yield
    finally:
        timing(name, time.monotonic() - started, tags)


def enabled() -> bool:
    """Whether ``[metrics]`` turns on a backend, as Airflow's stats factory decides it."""
    if "enabled" not in _cache:
        _cache["enabled"] = any(_metrics_flag(key, False)
                                for key in ("statsd_on", "statsd_datadog_enabled", "otel_on"))
    return bool(_cache["enabled"])


def prepare() -> None:
    """Import ``Stats`` now (a worker does it at start, not in its first heartbeat); never raises."""
    if enabled():
        _stats()


def reset() -> None:
    """Forget what was read from config and which refusals were logged (tests)."""
    _cache.clear()
    _refused.clear()


# ------------------------------------------------------------------ internals
def _emit(name: str, kind: str, tags: Mapping[str, Any] | None, value: float) -> None:
    metric = METRICS.get(name)
    tags = tags or {}
    if metric is None or metric.type != kind or set(tags) != set(metric.tags):
        _refuse(name, kind, tags, metric)
        return
    if not enabled():
        return
    try:
        stats = _stats()
        if stats is None:
            return
        values = {k: _NOT_ALLOWED.sub("_", "unknown" if v is None else str(v)) for k, v in tags.items()}
        _send(stats, kind, name, value, values or None)
        if metric.tags and _metrics_flag("legacy_names_on", True):
            _send(stats, kind, metric.per_tag_name(values), value, None)
    except Exception:
        log.debug("Could not emit metric %s", name, exc_info=True)


def _send(stats: Any, kind: str, name: str, value: float, tags: dict[str, str] | None) -> None:
    if kind == COUNTER:
        stats.incr(name, count=int(value), tags=tags)
    elif kind == GAUGE:
        stats.gauge(name, value, tags=tags)
    else:  # a timedelta: every backend turns it into milliseconds itself
        stats.timing(name, datetime.timedelta(seconds=value), tags=tags)


def _refuse(name: str, kind: str, tags: Mapping[str, Any], metric: Metric | None) -> None:
    declared = f"declared as {metric.type} with tags {list(metric.tags)}" if metric else "not declared"
    message = (f"metric {name!r} emitted as {kind} with tags {sorted(tags)} is {declared}; "
               "declare it in airflow_asyncq_provider/metrics.py METRICS and docs/METRICS.md")
    if "pytest" in sys.modules:
        raise UnknownMetric(message)
    if name not in _refused:
        _refused.add(name)
        log.warning("Not emitting: %s", message)


def _stats() -> Any:
    """Airflow's Stats, the way the in-tree providers import it on 3.3; None when it cannot be imported."""
    if "stats" not in _cache:
        try:
            from airflow.providers.common.compat.sdk import Stats

            _cache["stats"] = Stats
        except Exception:
            log.debug("Airflow's Stats could not be imported; no metrics are sent", exc_info=True)
            _cache["stats"] = None
    return _cache["stats"]


def _metrics_flag(key: str, default: bool) -> bool:
    cache_key = f"metrics.{key}"
    if cache_key not in _cache:
        try:
            from airflow.configuration import conf

            _cache[cache_key] = conf.getboolean("metrics", key, fallback=default)
        except Exception:
            log.debug("Could not read [metrics] %s", key, exc_info=True)
            _cache[cache_key] = default
    return bool(_cache[cache_key])
