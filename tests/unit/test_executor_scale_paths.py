"""The executor's paths whose cost bench/executor_scale.py measures, against a fake Redis.

The periodic liveness check reads each worker's registry record once and trusts it for the tasks it
lists; only the tasks a live worker does not list (just started, just ended, forgotten, or on a lost
worker) have their lease and record read. These tests pin that the verdicts stay what they were.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_asyncq_provider.state import registry
from airflow_asyncq_provider.state.keys import Keys

from .conftest import FakeRedis


@pytest.fixture
def states():
    from airflow.utils.state import TaskInstanceState

    return TaskInstanceState


def _key(name: str) -> Any:
    from airflow.models.taskinstancekey import TaskInstanceKey

    return TaskInstanceKey(dag_id="d", task_id=name, run_id="r", try_number=1, map_index=-1)


def _started(executor, name: str, hostname: str | None) -> Any:
    from airflow_asyncq_provider.executors.tracking import Tracked

    key = _key(name)
    tracked = Tracked(f"id-{name}", "q", 1.0, hostname=hostname, received=True, started=True)
    executor.running.add(key)
    executor._track(key, tracked)
    return key


def _worker(fake_redis: FakeRedis, hostname: str, task_ids: list[str] | None, started_at: float | None = None,
            pid: int = 4242) -> None:
    """A heartbeat record as registry.heartbeat writes it (``tasks`` is JSON keyed by task id)."""
    record = {"hostname": hostname, "queues": json.dumps(["q"])}
    if started_at is not None:
        record.update(started_at=f"{started_at:.3f}", pid=json.dumps(pid))
    if task_ids is not None:
        record["tasks"] = json.dumps({t: {"pid": 1, "pss": 0, "limit": None} for t in task_ids})
    fake_redis.hashes[f"unit:worker:{hostname}"] = record


# ------------------------------------------------------------------------------ registry.running_on
class HeartbeatRedis(FakeRedis):
    """The fake plus the two commands registry.heartbeat adds to its pipeline."""

    def pexpire(self, key: str, ms: int) -> bool:
        self._cmd("PEXPIRE")
        self.ttls[key] = ms
        return key in self.hashes

    def sadd(self, key: str, *values: str) -> int:
        self._cmd("SADD")
        self.sets.setdefault(key, set()).update(values)
        return len(values)


def test_running_on_reads_what_a_real_heartbeat_wrote():
    client, keys = HeartbeatRedis(), Keys("unit")
    info = registry.WorkerInfo(
        queues=["q"], slots=4, running=2, version="x", pid=1, forkserver_pid=2, started_at=1.0,
        last_claim_at=1.0, consumer_tick_at=1.0, draining=False, memory_budget=1, memory_reserved=0,
        memory_in_use=0, tasks={"a": registry.RunningTask(10, 0, None), "b": registry.RunningTask(11, 0, None)})
    registry.heartbeat(client, keys, "w1@h", info, ttl=30)
    registry.heartbeat(client, keys, "idle@h", {"queues": ["q"]}, ttl=30)  # a record without tasks
    client.commands.clear()
    client.pipelines_executed = 0

    found = registry.running_on(client, keys, ["w1@h", "idle@h", "gone@h"])

    assert found == {"w1@h": registry.Listing({"a", "b"}, started_at=1.0, pid=1), "idle@h": registry.Listing(set()),
                     "gone@h": None}
    assert client.pipelines_executed == 1, "one round trip for any number of hosts"


def test_running_on_a_garbled_tasks_field_lists_nothing(fake_redis):
    fake_redis.hashes["unit:worker:w1"] = {"hostname": "w1", "tasks": "not json"}
    fake_redis.hashes["unit:worker:w2"] = {"hostname": "w2", "tasks": json.dumps(["a", "b"])}
    assert registry.running_on(fake_redis, Keys("unit"), ["w1", "w2"]) == {"w1": registry.Listing(set()),
                                                                            "w2": registry.Listing(set())}


def test_running_on_a_garbled_start_or_pid_is_unknown(fake_redis):
    fake_redis.hashes["unit:worker:w1"] = {"hostname": "w1", "started_at": "soon", "pid": "-"}
    assert registry.running_on(fake_redis, Keys("unit"), ["w1"]) == {"w1": registry.Listing(set())}


def test_running_on_no_hosts_is_no_command(fake_redis):
    assert registry.running_on(fake_redis, Keys("unit"), []) == {}
    assert fake_redis.commands == []


# ------------------------------------------------------------------------------ the liveness check
def test_tasks_a_live_worker_lists_cost_no_read(executor, fake_redis):
    keys = [_started(executor, f"t{i}", "w1") for i in range(50)]
    _worker(fake_redis, "w1", [f"id-t{i}" for i in range(50)])  # no lease keys at all: not needed

    executor._check_worker_liveness()

    assert executor.event_buffer == {}
    assert all(k in executor.running for k in keys)
    assert fake_redis.commands == ["EXISTS", "HMGET"], "the worker's record, once; no lease or task record"
    assert fake_redis.pipelines_executed == 1


def test_periodic_cost_follows_workers_not_tasks(executor, fake_redis):
    def commands_for(tasks: int, workers: int) -> tuple[int, int]:
        executor._tracked.clear()
        executor._keys_by_id.clear()
        fake_redis.hashes.clear()
        for w in range(workers):
            names = [f"w{w}t{i}" for i in range(tasks // workers)]
            for name in names:
                _started(executor, name, f"w{w}")
            _worker(fake_redis, f"w{w}", [f"id-{n}" for n in names])
        fake_redis.commands.clear()
        fake_redis.pipelines_executed = 0
        executor._check_worker_liveness()
        return len(fake_redis.commands), fake_redis.pipelines_executed

    assert commands_for(500, 5) == commands_for(5, 5) == (10, 1)


def test_a_listed_task_forgets_an_earlier_missing_lease(executor, fake_redis):
    key = _started(executor, "t", "w1")
    executor._tracked[key].lease_missing_since = 1.0
    _worker(fake_redis, "w1", ["id-t"])
    executor._check_worker_liveness()
    assert executor._tracked[key].lease_missing_since is None


def test_a_task_its_live_worker_no_longer_lists_is_checked_by_its_lease(executor, fake_redis, states,
                                                                        monkeypatch):
    import airflow_asyncq_provider.executors.liveness as liveness

    listed, forgotten, just_started = _started(executor, "listed", "w1"), _started(executor, "forgotten", "w1"), \
        _started(executor, "new", "w1")
    _worker(fake_redis, "w1", ["id-listed"])
    fake_redis.strings["unit:lease:id-new"] = "w1"  # started after the worker's last heartbeat

    clock = [1000.0]
    monkeypatch.setattr(liveness.time, "monotonic", lambda: clock[0])
    executor._check_worker_liveness()
    assert executor.event_buffer == {}
    assert fake_redis.commands.count("HGETALL") == 2, "only the two unlisted tasks are read"
    assert executor._tracked[forgotten].lease_missing_since == 1000.0
    assert executor._tracked[just_started].lease_missing_since is None

    clock[0] += executor.settings.worker_lost_timeout
    executor._check_worker_liveness()
    state, reason = executor.event_buffer[forgotten]
    assert state == states.FAILED
    assert reason == "lease expired: worker w1 is alive but no longer runs this task"
    assert listed not in executor.event_buffer and just_started not in executor.event_buffer


def test_a_task_that_ended_after_its_workers_heartbeat_is_reported_from_its_record(executor, fake_redis,
                                                                                   states):
    key = _started(executor, "t", "w1")
    _worker(fake_redis, "w1", [])  # the worker's newest heartbeat no longer lists it
    fake_redis.hashes["unit:task:id-t"] = {"state": "success", "hostname": "w1"}
    executor._check_worker_liveness()
    assert executor.event_buffer[key] == (states.SUCCESS, "id-t")


def test_tasks_of_a_lost_worker_fail_even_if_its_last_record_listed_them(executor, fake_redis, states):
    lost = _started(executor, "t", "w-gone")  # its registry hash expired: no record at all
    executor._check_worker_liveness()
    state, reason = executor.event_buffer[lost]
    assert state == states.FAILED
    assert reason == "worker w-gone lost: no heartbeat for more than 30 s"


def test_a_task_listed_by_another_worker_is_not_vouched_for(executor, fake_redis, states):
    key = _started(executor, "t", "w-gone")
    _worker(fake_redis, "w-other", ["id-t"])
    executor._check_worker_liveness()
    assert executor.event_buffer[key][0] == states.FAILED


def test_a_worker_record_without_tasks_falls_back_to_leases(executor, fake_redis):
    key = _started(executor, "t", "w1")
    _worker(fake_redis, "w1", None)
    fake_redis.strings["unit:lease:id-t"] = "w1"
    executor._check_worker_liveness()
    assert executor.event_buffer == {} and key in executor.running
    assert fake_redis.commands.count("HGETALL") == 1 and executor._tracked[key].lease_missing_since is None


def test_received_but_not_started_tasks_are_still_read_for_an_outcome(executor, fake_redis, states):
    from airflow_asyncq_provider.executors.tracking import Tracked

    key = _key("t")
    executor.running.add(key)
    executor._track(key, Tracked("id-t", "q", 1.0, hostname="w1", received=True))
    _worker(fake_redis, "w1", ["id-t"])  # listed, but this executor has not seen it start
    fake_redis.hashes["unit:task:id-t"] = {"state": "failed", "reason": "fork failed"}
    executor._check_worker_liveness()
    assert executor.event_buffer[key] == (states.FAILED, "fork failed")


# ------------------------------------------------------------------ a worker restarted under its name
def _ran_on(fake_redis: FakeRedis, name: str, hostname: str, started_at: float | None, lease: bool = True) -> None:
    """The record a worker's ``started`` event wrote (``started_at`` on that worker's clock), and its lease."""
    record = {"state": "started", "claimed_by": hostname, "hostname": hostname}
    if started_at is not None:
        record["started_at"] = f"{started_at:.3f}"
    fake_redis.hashes[f"unit:task:id-{name}"] = record
    if lease:
        fake_redis.strings[f"unit:lease:id-{name}"] = hostname


def test_a_task_whose_worker_restarted_under_the_same_name_is_lost_at_the_next_check(executor, fake_redis,
                                                                                     states):
    key = _started(executor, "t", "w1")
    _ran_on(fake_redis, "t", "w1", started_at=1000.0)  # its lease still runs out: nobody renews it
    _worker(fake_redis, "w1", [], started_at=1005.0, pid=77)  # a new process, already heartbeating

    executor._check_worker_liveness()

    state, reason = executor.event_buffer[key]
    assert state == states.FAILED
    assert reason == ("worker w1 lost: it restarted (pid 77, started at 1970-01-01T00:16:45Z) after it took "
                      "this task; the process that ran it is gone")
    assert key not in executor._tracked
    (_id, event), = fake_redis.other_streams["unit:fleet-events"]
    assert (event["kind"], event["worker"], event["task"]) == ("worker_lost", "w1", "id-t")
    assert fake_redis.pipelines_executed == 2, "the registry, then the unlisted task: no extra round trip"


@pytest.mark.parametrize(("case", "worker_started", "task_host", "task_started"), [
    ("the same process, the task started after its last heartbeat", 900.0, "w1", 1000.0),
    ("a record another node wrote", 1005.0, "w2", 1000.0),
    ("a record without a start time (rebuilt after a Redis restart)", 1005.0, "w1", None),
    ("a heartbeat without a start time (an older worker)", None, "w1", 1000.0),
])
def test_a_task_on_a_worker_not_known_to_have_restarted_is_judged_by_its_lease(
        executor, fake_redis, case, worker_started, task_host, task_started):
    key = _started(executor, "t", "w1")
    _ran_on(fake_redis, "t", task_host, started_at=task_started)
    _worker(fake_redis, "w1", [], started_at=worker_started)

    executor._check_worker_liveness()

    assert executor.event_buffer == {}, case
    assert key in executor.running and executor._tracked[key].lease_missing_since is None


def test_a_task_the_restarted_worker_lists_is_not_read(executor, fake_redis):
    """Only its own runs are listed (a restarted process re-runs only a claim nobody reported received)."""
    key = _started(executor, "t", "w1")
    _ran_on(fake_redis, "t", "w1", started_at=1000.0)
    _worker(fake_redis, "w1", ["id-t"], started_at=1005.0)

    executor._check_worker_liveness()

    assert executor.event_buffer == {} and key in executor.running
    assert "HGETALL" not in fake_redis.commands
