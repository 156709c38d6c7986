"""metrics: the one table, the docs that list it, the call sites that use it, and what reaches Stats."""

from __future__ import annotations

import ast
import datetime
import logging
import re
import sys
import types
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from airflow_asyncq_provider import metrics
from airflow_asyncq_provider.metrics import COUNTER, GAUGE, METRICS, TIMER, UnknownMetric

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "airflow_asyncq_provider"
DOC = REPO / "docs" / "METRICS.md"
FUNCTIONS = {"incr": COUNTER, "gauge": GAUGE, "timing": TIMER, "timed": TIMER}


class FakeStats:
    """Records what Airflow's Stats would be asked; ``fail`` makes every call raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, dict[str, str] | None]] = []
        self.fail: Exception | None = None

    def _record(self, kind: str, name: str, value: Any, tags: dict[str, str] | None) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append((kind, name, value, tags))

    def incr(self, name: str, count: int = 1, *, tags: dict[str, str] | None = None) -> None:
        self._record("incr", name, count, tags)

    def gauge(self, name: str, value: float, *, tags: dict[str, str] | None = None) -> None:
        self._record("gauge", name, value, tags)

    def timing(self, name: str, dt: datetime.timedelta, *, tags: dict[str, str] | None = None) -> None:
        self._record("timing", name, dt, tags)

    def names(self) -> list[str]:
        return [name for _kind, name, _value, _tags in self.calls]


@pytest.fixture
def stats():
    """Metrics on, legacy (per-tag) names on, and a fake Stats behind them."""
    fake = FakeStats()
    metrics.reset()
    metrics._cache.update({"stats": fake, "enabled": True, "metrics.legacy_names_on": True})
    yield fake
    metrics.reset()


# ------------------------------------------------------------------------------------ the table
def _doc_rows() -> dict[str, tuple[str, tuple[str, ...], str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `asyncq."):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        name, kind, tags, per_tag = cells[0].strip("`"), cells[1], cells[2], cells[3]
        rows[name] = (kind, tuple(re.findall(r"`([a-z_]+)`", tags)), per_tag.strip("`"))
    return rows


def test_docs_list_exactly_the_declared_metrics():
    expected = {m.name: (m.type, m.tags, (m.name + "".join(f".<{t}>" for t in m.tags)) if m.tags else "—")
                for m in METRICS.values()}
    assert _doc_rows() == expected


def test_the_table_is_well_formed():
    for metric in METRICS.values():
        assert re.fullmatch(r"asyncq(\.[a-z_]+)+", metric.name), metric.name
        assert metric.type in (COUNTER, GAUGE, TIMER)
        assert len(set(metric.tags)) == len(metric.tags) and metric.description


def test_no_name_is_in_airflows_registry():
    # A registry name needs its name_variables as tags (DESIGN.md, "Metrics"); ours never are one.
    from airflow.sdk._shared.observability.metrics.metrics_registry import MetricsRegistry

    registry = MetricsRegistry()
    assert [name for name in METRICS if registry.get(name=name)] == []


# ------------------------------------------------------------------------------------ call sites
def _call_sites() -> list[tuple[str, int, str, str, ast.expr | None]]:
    """(file, line, function, name, tags expression) of every ``metrics.<fn>(...)`` in the package."""
    sites = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "metrics.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "metrics"
                    and node.func.attr in FUNCTIONS):
                continue
            first = node.args[0] if node.args else None
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), \
                f"{path}:{node.lineno}: name the metric with a string literal, so this test can check it"
            position = 1 if node.func.attr in ("incr", "timed") else 2
            tags = node.args[position] if len(node.args) > position else None
            tags = next((k.value for k in node.keywords if k.arg == "tags"), tags)
            sites.append((str(path.relative_to(REPO)), node.lineno, node.func.attr, first.value, tags))
    return sites


def test_every_call_site_emits_a_declared_metric_with_its_tags():
    problems = []
    for where, line, function, name, tags in _call_sites():
        metric = METRICS.get(name)
        if metric is None:
            problems.append(f"{where}:{line}: {name} is not declared")
            continue
        if metric.type != FUNCTIONS[function]:
            problems.append(f"{where}:{line}: {name} is a {metric.type}, emitted with {function}")
        if isinstance(tags, ast.Dict):
            keys = {k.value for k in tags.keys if isinstance(k, ast.Constant)}
            if keys != set(metric.tags):
                problems.append(f"{where}:{line}: {name} with tags {sorted(keys)}, declared {list(metric.tags)}")
        elif tags is None and metric.tags:
            problems.append(f"{where}:{line}: {name} without its tags {list(metric.tags)}")
    assert problems == []


def test_every_declared_metric_is_emitted_somewhere():
    assert set(METRICS) - {name for *_rest, name, _tags in _call_sites()} == set()


def test_metrics_imports_stats_only_when_used():
    from tests.unit.test_imports import imported_at_import_time

    # the standard library only: Stats (and Airflow) are imported on first use
    assert imported_at_import_time("airflow_asyncq_provider.metrics") <= sys.stdlib_module_names


# ------------------------------------------------------------------------------------ emitting
def test_a_tagged_metric_is_sent_tagged_and_under_its_per_tag_name(stats):
    metrics.incr("asyncq.executor.published", {"queue": "default"}, 3)
    assert stats.calls == [("incr", "asyncq.executor.published", 3, {"queue": "default"}),
                           ("incr", "asyncq.executor.published.default", 3, None)]


def test_per_tag_names_follow_the_declared_order_and_legacy_names_on(stats):
    metrics.timing("asyncq.worker.task_duration", 1.5,
                   {"outcome": "success", "queue": "q", "worker": "w1@host.example"})
    (_, _, dt, tags), (_, per_tag, _, _) = stats.calls
    assert dt == datetime.timedelta(seconds=1.5)  # every backend turns a timedelta into ms itself
    # '@' is not allowed in a stat name (and StatsD-InfluxDB puts tags in the name); '.' splits a name
    assert tags == {"outcome": "success", "queue": "q", "worker": "w1_host.example"}
    assert per_tag == "asyncq.worker.task_duration.w1_host__example.q.success"

    stats.calls.clear()
    metrics._cache["metrics.legacy_names_on"] = False
    metrics.gauge("asyncq.worker.slots_busy", 2, {"worker": "w1"})
    assert stats.calls == [("gauge", "asyncq.worker.slots_busy", 2, {"worker": "w1"})]


def test_an_untagged_metric_is_sent_once(stats):
    with metrics.timed("asyncq.executor.sync_duration"):
        pass
    ((kind, name, dt, tags),) = stats.calls
    assert (kind, name, tags) == ("timing", "asyncq.executor.sync_duration", None)
    assert datetime.timedelta(0) <= dt < datetime.timedelta(seconds=1)


def test_a_missing_tag_value_is_unknown(stats):
    metrics.incr("asyncq.worker.dead_letters", {"worker": "w1", "queue": None})
    assert stats.names()[1] == "asyncq.worker.dead_letters.w1.unknown"


def test_nothing_is_sent_or_imported_while_metrics_are_off(stats):
    metrics._cache["enabled"] = False
    metrics.incr("asyncq.executor.published", {"queue": "q"})
    metrics.prepare()
    assert stats.calls == []


@pytest.mark.parametrize(("name", "kind", "tags"), [
    ("asyncq.executor.nope", "incr", {}),
    ("asyncq.executor.published", "gauge", {"queue": "q"}),  # declared as a counter
    ("asyncq.executor.published", "incr", {}),  # without its tag
    ("asyncq.executor.published", "incr", {"queue": "q", "dag_id": "d"}),  # with one it does not declare
])
def test_an_undeclared_metric_raises_under_pytest(stats, name, kind, tags):
    call = {"incr": metrics.incr, "gauge": lambda n, t: metrics.gauge(n, 1, t)}[kind]
    with pytest.raises(UnknownMetric, match="declare it in airflow_asyncq_provider/metrics.py"):
        call(name, tags)
    assert stats.calls == []


def test_an_undeclared_metric_is_logged_once_in_production(stats, monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "pytest")
    with caplog.at_level(logging.WARNING, logger="airflow_asyncq_provider.metrics"):
        metrics.incr("asyncq.executor.nope")
        metrics.incr("asyncq.executor.nope")
    assert stats.calls == []
    assert [r.getMessage() for r in caplog.records] == [
        "Not emitting: metric 'asyncq.executor.nope' emitted as counter with tags [] is not declared; "
        "declare it in airflow_asyncq_provider/metrics.py METRICS and docs/METRICS.md"]


def test_a_failing_backend_never_reaches_the_caller(stats, caplog):
    stats.fail = OSError("statsd host unreachable")
    with caplog.at_level(logging.DEBUG, logger="airflow_asyncq_provider.metrics"):
        metrics.incr("asyncq.executor.published", {"queue": "q"})
        metrics.gauge("asyncq.worker.slots_busy", 1, {"worker": "w"})
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]


def test_stats_that_cannot_be_imported_turn_metrics_into_no_ops(monkeypatch):
    metrics.reset()
    metrics._cache["enabled"] = True
    monkeypatch.setitem(sys.modules, "airflow.providers.common.compat.sdk", None)  # ImportError
    try:
        metrics.incr("asyncq.executor.published", {"queue": "q"})
        assert metrics._cache["stats"] is None
    finally:
        metrics.reset()


def test_enabled_follows_airflows_stats_factory(monkeypatch):
    from airflow.configuration import conf

    for flag in ("statsd_on", "statsd_datadog_enabled", "otel_on"):
        metrics.reset()
        monkeypatch.setattr(conf, "getboolean", lambda section, key, fallback=None, f=flag: key == f)
        assert metrics.enabled(), flag
    metrics.reset()
    monkeypatch.setattr(conf, "getboolean", lambda section, key, fallback=None: False)
    assert not metrics.enabled()
    metrics.reset()


def test_the_real_stats_is_the_one_the_providers_use():
    from airflow.providers.common.compat.sdk import Stats

    metrics.reset()
    assert metrics._stats() is Stats
    metrics.reset()


# ------------------------------------------------------------------------------------ the executor
def test_publishing_counts_per_queue(stats, executor, make_workload):
    items = [executor._outgoing(make_workload(task_id=t, queue=q)) for t, q in [("a", "q1"), ("b", "q1"),
                                                                                   ("c", "q2")]]
    executor._publish(items)
    assert ("incr", "asyncq.executor.published.q1", 2, None) in stats.calls
    assert ("incr", "asyncq.executor.published.q2", 1, None) in stats.calls

    executor._redis.fail_with = OSError("gone")
    with pytest.raises(Exception, match="gone"):
        executor._publish(items[:1])
    assert ("incr", "asyncq.executor.publish_failures.q1", 1, None) in stats.calls


def test_events_applied_only_for_tracked_work(stats, executor, ti_key_factory):
    from airflow_asyncq_provider.executors.tracking import Tracked
    from airflow_asyncq_provider.state import events

    key = ti_key_factory()
    executor.running.add(key)
    executor._track(key, Tracked("id-1", "q", 1.0))
    executor._apply("someone-elses", events.SUCCESS, {})
    executor._apply("id-1", events.STARTED, {"hostname": "w1"})
    executor._apply("id-1", events.SUCCESS, {"hostname": "w1"})
    assert [n for n in stats.names() if n.startswith("asyncq.executor.events_applied.")] == [
        "asyncq.executor.events_applied.started", "asyncq.executor.events_applied.success"]


def test_sync_times_itself_and_reads_queue_gauges_when_due(stats, executor, fake_redis):
    from airflow_asyncq_provider.state.queues import QueueDepth

    depths = [QueueDepth("default", {0: 3, 1: 2}, 12.5), QueueDepth("idle", {0: 0}, None)]
    with mock.patch("airflow_asyncq_provider.state.registry.live_workers",
                    return_value={"w1": {"queues": ["default", "idle"]}}), \
            mock.patch("airflow_asyncq_provider.state.queues.depths", return_value=depths) as read:
        executor.sync()
        executor.sync()  # not due again
    read.assert_called_once()
    assert read.call_args.args[2] == ["default", "idle"]
    gauges = {name: value for kind, name, value, tags in stats.calls if kind == "gauge" and tags is None}
    assert gauges == {"asyncq.queue.depth.default": 5, "asyncq.queue.oldest_age.default": 12.5,
                      "asyncq.queue.depth.idle": 0, "asyncq.queue.oldest_age.idle": 0.0}
    assert stats.names().count("asyncq.executor.sync_duration") == 2
    assert executor._metric_queues == {"default"}  # reported again next time, until it reads 0


def test_queue_gauges_are_not_read_while_metrics_are_off(executor, fake_redis):
    metrics.reset()
    metrics._cache["enabled"] = False
    with mock.patch("airflow_asyncq_provider.state.queues.depths") as read:
        executor.sync()
    read.assert_not_called()
    metrics.reset()


def test_a_lost_worker_is_counted_once_and_each_task_once(stats, executor, fake_redis, ti_key_factory):
    from airflow_asyncq_provider.executors.tracking import Tracked

    for name in ("a", "b"):
        key = ti_key_factory(name)
        tracked = Tracked(f"id-{name}", "q", 1.0, hostname="w-gone")
        tracked.started = True
        executor.running.add(key)
        executor._track(key, tracked)
    executor._check_worker_liveness()
    names = stats.names()
    assert names.count("asyncq.executor.workers_lost.w-gone") == 1
    assert names.count("asyncq.executor.tasks_lost.worker_lost") == 2


def test_republishing_counts_its_reason(stats, executor, make_workload):
    from airflow_asyncq_provider.executors.tracking import Tracked

    item = executor._outgoing(make_workload())
    executor._track(item.key, Tracked(item.task_id, item.queue, 1.0))
    executor._publish = mock.Mock()  # type: ignore[method-assign]
    executor._republish([item], "Redis restarted", reason="redis_restart")
    assert ("incr", "asyncq.executor.republished.redis_restart", 1, None) in stats.calls


# ------------------------------------------------------------------------------------ the worker
def _info(**overrides: Any) -> Any:
    from airflow_asyncq_provider.state.registry import WorkerInfo

    fields = dict(queues=["default"], slots=4, running=3, version="0", pid=1, forkserver_pid=2, started_at=0.0,
                  last_claim_at=0.0, consumer_tick_at=0.0, draining=False, memory_budget=8 << 30,
                  memory_reserved=3 << 28, memory_in_use=1 << 28, tasks={})
    return WorkerInfo(**{**fields, **overrides})


def test_each_heartbeat_sends_slot_and_memory_gauges_even_when_redis_fails(stats):
    from airflow_asyncq_provider.settings import AsyncQSettings
    from airflow_asyncq_provider.state.keys import Keys
    from airflow_asyncq_provider.worker.heartbeat import Heartbeat

    client = mock.MagicMock()
    client.pipeline.return_value.execute.side_effect = ConnectionError("redis restarting")
    beat = Heartbeat(AsyncQSettings(broker_url="redis://fake/0"), client, Keys("u"), "w1@host", _info)
    with pytest.raises(Exception, match="redis restarting"):
        beat.beat()
    gauges = {name: value for kind, name, value, tags in stats.calls if tags is None}
    assert gauges == {"asyncq.worker.slots_busy.w1_host": 3, "asyncq.worker.slots_free.w1_host": 1,
                      "asyncq.worker.memory_budget.w1_host": 8 << 30,
                      "asyncq.worker.memory_budget_used.w1_host": 3 << 28,
                      "asyncq.worker.memory_in_use.w1_host": 1 << 28}


def _runner(fake_redis, status: dict[str, Any] | None = None, budget: int = 8 << 30) -> Any:
    from airflow_asyncq_provider.memory.admission import Admission
    from airflow_asyncq_provider.settings import AsyncQSettings
    from airflow_asyncq_provider.worker.runner import WorkloadRunner

    child = types.SimpleNamespace(pid=7, wait=lambda: status or {"code": 0, "signal": None, "result": None},
                                  release=lambda: None)
    forks = types.SimpleNamespace(spawn=lambda task_id, payload: child)
    config = AsyncQSettings(broker_url="redis://fake/0", key_prefix="mt")
    return WorkloadRunner(config, "w1@host", forks, fake_redis, Admission(budget, config.default_memory_request),
                          requeue=lambda *args: None)


def _payload() -> str:
    import json

    return json.dumps({"type": "ExecuteTask", "token": "tok",
                       "ti": {"dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1, "map_index": -1}})


@pytest.mark.parametrize(("status", "outcome"), [
    ({"code": 0, "signal": None, "result": None}, "success"),
    ({"code": 1, "signal": None, "result": None}, "failed"),
])
def test_a_finished_workload_times_its_run_and_its_fork(stats, fake_redis, status, outcome):
    _runner(fake_redis, status).run("T", _payload(), queue="default")
    names = stats.names()
    assert f"asyncq.worker.task_duration.w1_host.default.{outcome}" in names
    assert "asyncq.worker.fork_time.w1_host" in names


def test_a_deferred_admission_and_a_dead_letter_are_counted(stats, fake_redis, monkeypatch):
    monkeypatch.setattr("airflow_asyncq_provider.worker.runner.time.sleep", lambda s: None)
    runner = _runner(fake_redis, budget=1)
    assert runner.run("T", _payload(), meta={"memory_request": 2, "memory_limit": None}, queue="q") == "deferred"
    runner.run("M", "not json", queue="q")
    names = stats.names()
    assert "asyncq.worker.admissions_deferred.w1_host.q" in names
    assert "asyncq.worker.dead_letters.w1_host.q" in names


def test_a_memory_kill_is_counted_once(stats, fake_redis, monkeypatch):
    from airflow_asyncq_provider.worker.running import Running

    monkeypatch.setattr("airflow_asyncq_provider.worker.running._signal_task_processes", lambda pid, sig: None)
    monkeypatch.setattr("airflow_asyncq_provider.worker.runner.threading.Timer", mock.MagicMock())
    runner = _runner(fake_redis)
    runner.running["T"] = Running(7, 100, None, queue="high_mem")
    runner.over_limit("T", 200, 100)
    runner.over_limit("T", 300, 100)  # the watchdog sees it again before it dies
    assert stats.names().count("asyncq.worker.memory_kills.w1_host.high_mem") == 1


@pytest.fixture
def ti_key_factory():
    from airflow.models.taskinstancekey import TaskInstanceKey

    def make(task_id: str = "t") -> Any:
        return TaskInstanceKey(dag_id="d", task_id=task_id, run_id="r", try_number=1, map_index=-1)

    return make
