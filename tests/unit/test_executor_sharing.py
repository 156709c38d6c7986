"""Two schedulers, one fleet: each AsyncQExecutor acts only on the workloads it published or adopted.

Both read the one event stream (every worker writes there), so each sees the other's events too. An
event of a workload it does not track costs one dict lookup and nothing else: no Redis call, no state
change, no metric. The liveness and recovery checks read only what the executor itself tracks.
"""

from __future__ import annotations

import types
from typing import Any

import pytest

from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import events, records
from airflow_asyncq_provider.state.keys import Keys


@pytest.fixture
def states():
    from airflow.utils.state import TaskInstanceState

    return TaskInstanceState


def _executor(fake_redis: Any) -> Any:
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    ex = AsyncQExecutor()
    ex.settings = AsyncQSettings(broker_url="redis://fake:6379/0", key_prefix="unit")
    ex.keys = Keys("unit")
    ex._redis = fake_redis
    return ex


def _key(task_id: str) -> Any:
    from airflow.models.taskinstancekey import TaskInstanceKey

    return TaskInstanceKey(dag_id="d", task_id=task_id, run_id="r", try_number=1, map_index=-1)


def _publish(executor: Any, key: Any, task_id: str) -> None:
    """What ``_process_workloads`` leaves behind for one published workload (the tracking only)."""
    from airflow_asyncq_provider.executors.tracking import Tracked

    executor.running.add(key)
    executor._track(key, Tracked(task_id, "default", 1.0))


def _emit(fake_redis: Any, task_id: str, kind: str, **fields: str) -> None:
    fake_redis.xadd("unit:events", {"id": task_id, "kind": kind, **fields})


@pytest.fixture
def pair(fake_redis):
    a, b = _executor(fake_redis), _executor(fake_redis)
    for i in range(3):
        _publish(a, _key(f"a{i}"), f"id-a{i}")
        _publish(b, _key(f"b{i}"), f"id-b{i}")
    return a, b


def test_each_executor_applies_only_its_own_events(pair, fake_redis, states):
    a, b = pair
    for i in range(3):
        for side in "ab":
            _emit(fake_redis, f"id-{side}{i}", events.STARTED, hostname="w1")
            _emit(fake_redis, f"id-{side}{i}", events.SUCCESS if i else events.FAILED, reason="exit 1")
    assert a._read_events() == b._read_events() == 12  # both read every event
    assert a.event_buffer == {_key("a0"): (states.FAILED, "exit 1"), _key("a1"): (states.SUCCESS, "id-a1"),
                              _key("a2"): (states.SUCCESS, "id-a2")}
    assert b.event_buffer == {_key("b0"): (states.FAILED, "exit 1"), _key("b1"): (states.SUCCESS, "id-b1"),
                              _key("b2"): (states.SUCCESS, "id-b2")}
    assert a.running == set() and b.running == set()


def test_another_schedulers_events_cost_one_read_for_the_whole_batch(pair, fake_redis, monkeypatch):
    """A thousand foreign events: one XREAD, then a dict lookup each; no metric, no state, no call."""
    from airflow_asyncq_provider import metrics

    a, _b = pair
    emitted: list[str] = []
    monkeypatch.setattr(metrics, "incr", lambda name, *args, **kwargs: emitted.append(name))
    for i in range(1000):
        _emit(fake_redis, f"id-b{i % 3}", (events.RECEIVED, events.STARTED, events.SUCCESS)[i % 3],
              hostname="w2")
    before = len(fake_redis.commands)
    tracked = {key: (t.task_id, t.hostname, t.received, t.started) for key, t in a._tracked.items()}
    assert a._read_events() == 1000
    assert fake_redis.commands[before:] == ["XREAD"]
    assert emitted == [] and a.event_buffer == {}
    assert {key: (t.task_id, t.hostname, t.received, t.started) for key, t in a._tracked.items()} == tracked


def test_apply_of_an_untracked_id_is_a_lookup_and_nothing_else(pair, fake_redis, monkeypatch):
    a, _b = pair
    touched: list[str] = []
    monkeypatch.setattr(a, "running_state", lambda *args: touched.append("running_state"))
    monkeypatch.setattr(a, "success", lambda *args: touched.append("success"))
    monkeypatch.setattr(a, "fail", lambda *args, **kwargs: touched.append("fail"))
    monkeypatch.setattr(a, "_republish_with_fresh_token", lambda *args: touched.append("republish"))
    before = len(fake_redis.commands)
    for kind in (events.RECEIVED, events.STARTED, events.SUCCESS, events.FAILED, events.REVOKED,
                 events.TOKEN_EXPIRED, events.DUPLICATE):
        a._apply("id-b0", kind, {"hostname": "w2", "reason": "x"})
    assert touched == [] and fake_redis.commands[before:] == []


def test_liveness_and_recovery_read_only_the_executors_own_workloads(pair, fake_redis, monkeypatch, states):
    """A worker that runs the other scheduler's tasks and dies is that scheduler's to report."""
    a, b = pair
    for i in range(3):
        _emit(fake_redis, f"id-a{i}", events.STARTED, hostname="w-a")
        _emit(fake_redis, f"id-b{i}", events.STARTED, hostname="w-b")
    a._read_events()
    b._read_events()
    asked: list[list[str]] = []
    real_with_leases = records.with_leases

    def with_leases(client: Any, keys: Any, task_ids: Any) -> Any:
        asked.append(list(task_ids))
        return real_with_leases(client, keys, task_ids)

    monkeypatch.setattr(records, "with_leases", with_leases)
    a._check_worker_liveness()  # no worker registered: w-a counts as lost, w-b is not a's to judge
    assert asked == [["id-a0", "id-a1", "id-a2"]]
    assert {key for key, (state, _) in a.event_buffer.items() if state == states.FAILED} == \
        {_key(f"a{i}") for i in range(3)}
    assert all(key in b._tracked for key in (_key(f"b{i}") for i in range(3)))


def test_the_survivor_adopts_the_dead_schedulers_workloads_and_then_applies_their_events(
        fake_redis, states):
    a, b = _executor(fake_redis), _executor(fake_redis)
    _publish(a, _key("a0"), "id-a0")
    _publish(a, _key("a1"), "id-a1")
    fake_redis.hashes.update({
        "unit:task:id-a0": {"queue": "default", "state": "started", "claimed_by": "w1", "hostname": "w1"},
        "unit:task:id-a1": {"queue": "default", "state": "published", "sent_at": "1.5"},
    })
    _emit(fake_redis, "id-a0", events.STARTED, hostname="w1")
    assert b._read_events() == 1 and b.event_buffer == {}  # not b's yet: ignored
    # a is SIGKILLed; the scheduler hands its QUEUED/RUNNING TIs to b
    tis = [types.SimpleNamespace(key=_key(f"a{i}"), external_executor_id=f"id-a{i}", queue="default")
           for i in range(2)]
    assert b.try_adopt_task_instances(tis) == []
    assert b.event_buffer == {_key("a0"): (states.RUNNING, "id-a0")}  # from the record, not the stream
    _emit(fake_redis, "id-a0", events.SUCCESS, hostname="w1")
    _emit(fake_redis, "id-a1", events.STARTED, hostname="w2")
    _emit(fake_redis, "id-a1", events.FAILED, reason="task process exited with code 1")
    b._read_events()
    assert b.event_buffer[_key("a0")] == (states.SUCCESS, "id-a0")
    assert b.event_buffer[_key("a1")] == (states.FAILED, "task process exited with code 1")
    assert b.running == set() and b._tracked == {}
