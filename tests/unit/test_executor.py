"""AsyncQExecutor's bookkeeping against a fake Redis: events -> states, publish retries, revoke, adoption."""

from __future__ import annotations

import json
import time
import types
from typing import Any
from unittest import mock

import pytest

from airflow_asyncq_provider.errors import PublishError
from airflow_asyncq_provider.state import events
from tests.unit.conftest import workload_messages


@pytest.fixture
def states():
    from airflow.utils.state import TaskInstanceState

    return TaskInstanceState


@pytest.fixture
def ti_key():
    from airflow.models.taskinstancekey import TaskInstanceKey

    def make(task_id: str = "t", try_number: int = 1) -> Any:
        return TaskInstanceKey(dag_id="d", task_id=task_id, run_id="r", try_number=try_number, map_index=-1)

    return make


def _track(executor, key, task_id: str, hostname: str | None = None, started: bool = False) -> Any:
    from airflow_asyncq_provider.executors.asyncq_executor import Tracked

    tracked = Tracked(task_id, "q", 1.0, hostname=hostname)
    tracked.started = started
    executor.running.add(key)
    executor._track(key, tracked)
    return tracked


def _ti(key, external_executor_id: str | None, queue: str = "q") -> Any:
    return types.SimpleNamespace(key=key, external_executor_id=external_executor_id, queue=queue)


def _track_sent(executor, workload) -> Any:
    """What ``_process_workloads`` leaves for a workload it sent: tracked, with the workload to resend."""
    from airflow_asyncq_provider.executors.tracking import Tracked

    item = executor._outgoing(workload)
    executor.running.add(item.key)
    executor._track(item.key, Tracked(item.task_id, item.queue, 1.0, outgoing=item))
    return item


def _publish_now(executor, workloads) -> None:
    for w in workloads:
        executor.queued_tasks[w.ti.key] = w
    executor._process_workloads(workloads)


# -------------------------------------------------------------------------------------- _apply
def test_apply_ignores_ids_it_does_not_track(executor):
    executor._apply("someone-elses", events.SUCCESS, {"id": "someone-elses"})
    assert executor.event_buffer == {}


def test_received_marks_tracked_without_a_state(executor, ti_key):
    key = ti_key()
    tracked = _track(executor, key, "id-1")
    executor._apply("id-1", events.RECEIVED, {"hostname": "w1"})
    assert tracked.received and tracked.hostname == "w1"
    assert executor.event_buffer == {}


def test_started_reports_running_with_the_id_as_info(executor, ti_key, states):
    key = ti_key()
    _track(executor, key, "id-1")
    with mock.patch.object(executor, "running_state", wraps=executor.running_state) as running_state:
        executor._apply("id-1", events.STARTED, {"hostname": "w1", "pid": "12"})
    running_state.assert_called_once_with(key, "id-1")
    # info=None would clear external_executor_id and break adoption
    assert executor.event_buffer[key] == (states.RUNNING, "id-1")
    assert key in executor.running and key in executor._tracked
    assert executor._tracked[key].received


def test_success(executor, ti_key, states):
    key = ti_key()
    _track(executor, key, "id-1")
    executor._apply("id-1", events.SUCCESS, {"hostname": "w1"})
    assert executor.event_buffer[key] == (states.SUCCESS, "id-1")
    assert key not in executor.running
    assert key not in executor._tracked and "id-1" not in executor._keys_by_id


def test_failed_carries_the_reason(executor, ti_key, states):
    key = ti_key()
    _track(executor, key, "id-1")
    executor._apply("id-1", events.FAILED, {"reason": "task process exited with code 1"})
    assert executor.event_buffer[key] == (states.FAILED, "task process exited with code 1")
    assert key not in executor.running and key not in executor._tracked


def test_failed_without_reason(executor, ti_key, states):
    key = ti_key()
    _track(executor, key, "id-1")
    executor._apply("id-1", events.FAILED, {})
    assert executor.event_buffer[key] == (states.FAILED, "failed")


def test_duplicate_never_produces_a_terminal_state(executor, ti_key, states):
    key = ti_key()
    _track(executor, key, "id-1")
    with mock.patch.object(executor, "success") as success, mock.patch.object(executor, "fail") as fail, \
            mock.patch.object(executor, "change_state") as change_state:
        executor._apply("id-1", events.DUPLICATE, {"hostname": "w2", "reason": "already claimed by w1"})
    success.assert_not_called()
    fail.assert_not_called()
    change_state.assert_not_called()
    assert executor.event_buffer == {}
    assert key in executor.running and key in executor._tracked


def test_duplicate_after_started_keeps_running(executor, ti_key, states):
    key = ti_key()
    _track(executor, key, "id-1")
    executor._apply("id-1", events.STARTED, {"hostname": "w1"})
    executor._apply("id-1", events.DUPLICATE, {"hostname": "w1", "reason": "409"})
    assert executor.event_buffer[key] == (states.RUNNING, "id-1")
    assert key in executor.running


def test_duplicate_does_not_move_the_task_to_the_dropping_worker(executor, ti_key):
    key = ti_key()
    tracked = _track(executor, key, "id-1")
    executor._apply("id-1", events.STARTED, {"hostname": "w1"})
    executor._apply("id-1", events.DUPLICATE, {"hostname": "w2", "reason": "already claimed by w1"})
    assert tracked.hostname == "w1"


def test_revoked_event_fails_with_its_reason_and_releases_the_slot(executor, ti_key, states):
    # revoke_task untracks first, so a REVOKED event for a tracked key means someone else revoked it
    key = ti_key()
    _track(executor, key, "id-1")
    executor._apply("id-1", events.REVOKED, {"hostname": "w1", "reason": "revoked before start"})
    assert executor.event_buffer[key] == (states.FAILED, "revoked before start")
    assert key not in executor.running
    assert key not in executor._tracked


def test_unknown_kind_is_ignored(executor, ti_key):
    key = ti_key()
    _track(executor, key, "id-1")
    executor._apply("id-1", "weird", {})
    assert executor.event_buffer == {} and key in executor.running


# -------------------------------------------------------------------------------------- reading
def test_read_events_applies_in_order_and_advances(executor, fake_redis, ti_key, states):
    k1, k2 = ti_key("a"), ti_key("b")
    _track(executor, k1, "id-a")
    _track(executor, k2, "id-b")
    fake_redis.xadd("unit:events", {"id": "id-a", "kind": "started", "hostname": "w"})
    fake_redis.xadd("unit:events", {"id": "id-a", "kind": "success"})
    fake_redis.xadd("unit:events", {"id": "id-b", "kind": "failed", "reason": "boom"})
    assert executor._read_events() == 3
    assert executor.event_buffer == {k1: (states.SUCCESS, "id-a"), k2: (states.FAILED, "boom")}
    assert executor._last_event_id == "3-0"
    assert executor._read_events() == 0


def test_read_events_is_bounded_by_batch_size(executor, fake_redis, ti_key):
    import dataclasses

    executor.settings = dataclasses.replace(executor.settings, event_batch_size=2)
    for i in range(5):
        fake_redis.xadd("unit:events", {"id": f"x{i}", "kind": "received"})
    assert [executor._read_events() for _ in range(4)] == [2, 2, 1, 0]


def test_one_bad_event_does_not_stop_the_rest(executor, fake_redis, ti_key, states):
    key = ti_key()
    _track(executor, key, "id-1")
    fake_redis.xadd("unit:events", {"id": "id-1", "kind": "started"})
    fake_redis.xadd("unit:events", {"id": "id-1", "kind": "success"})
    calls = []
    real = executor.running_state

    def explode(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise RuntimeError("bad")

    executor.running_state = explode  # type: ignore[method-assign]
    assert executor._read_events() == 2
    executor.running_state = real  # type: ignore[method-assign]
    assert calls and executor.event_buffer[key] == (states.SUCCESS, "id-1")


def test_stream_errors_are_survived(executor, fake_redis):
    import redis

    fake_redis.fail_with = redis.ConnectionError("gone")
    assert executor._read_events() == 0
    executor.sync()  # no exception reaches the scheduler loop


def test_sync_before_start_is_a_no_op():
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    executor = AsyncQExecutor()
    with mock.patch.object(executor, "_read_events") as read, \
            mock.patch.object(executor, "_guarded") as guarded:
        executor.sync()
    read.assert_not_called()  # no Redis yet: nothing is read, checked or recovered
    guarded.assert_not_called()
    assert executor._redis is None and executor.settings is None
    assert executor.event_buffer == {} and not executor.running and not executor.queued_tasks


def test_sync_cost_does_not_grow_with_idle_tasks(executor, fake_redis, ti_key):
    def first_sync_round_trips(count: int) -> int:
        executor._tracked.clear()
        executor._keys_by_id.clear()
        executor._next_liveness = executor._next_queue_check = 0.0  # periodic checks are due
        for i in range(count):
            _track(executor, ti_key(f"t{i}"), f"id-{i}")
        fake_redis.commands.clear()
        fake_redis.pipelines_executed = 0
        executor.sync()
        return len(fake_redis.commands) + fake_redis.pipelines_executed

    assert first_sync_round_trips(500) == first_sync_round_trips(5)

    fake_redis.commands.clear()
    fake_redis.pipelines_executed = 0
    executor.sync()  # the periodic checks are not due again yet
    assert fake_redis.commands == ["XREAD"]
    assert fake_redis.pipelines_executed == 0


# ------------------------------------------------------------------------------ waiting for events
@pytest.fixture
def sole_executor(executor, ti_key):
    """The executor as the scheduler's only executor, with one task on the fleet."""
    executor._sole_executor = True
    executor._next_liveness = executor._next_queue_check = float("inf")  # only the reads are looked at
    _track(executor, ti_key(), "id-1", hostname="w1", started=True)
    return executor


def test_sync_waits_for_an_event_when_the_scheduler_would_sleep(sole_executor, fake_redis):
    sole_executor.sync()
    assert fake_redis.commands == ["XREAD", "XREAD BLOCK 500"]  # [asyncq] event_wait = 0.5 s


@pytest.mark.parametrize("why", ["handed work", "event pending", "another executor", "nothing tracked",
                                 "turned off", "an event was read"])
def test_sync_does_not_wait_when_the_scheduler_has_work(sole_executor, fake_redis, ti_key, states, why):
    import dataclasses

    if why == "handed work":
        sole_executor._handed_work = True  # what queue_workload() sets (tested below)
    elif why == "event pending":
        sole_executor.event_buffer[ti_key("other")] = (states.SUCCESS, None)
    elif why == "another executor":
        sole_executor._sole_executor = False
    elif why == "nothing tracked":
        sole_executor._tracked.clear()
    elif why == "turned off":
        sole_executor.settings = dataclasses.replace(sole_executor.settings, event_wait=0.0)
    else:
        fake_redis.stream.append(("5-0", {"id": "id-1", "kind": "heartbeat"}))
    sole_executor.sync()
    assert fake_redis.commands == ["XREAD"]


def test_the_wait_stays_within_the_read_timeout(sole_executor, fake_redis):
    import dataclasses

    sole_executor.settings = dataclasses.replace(sole_executor.settings, event_wait=3.0, publish_timeout=2.0)
    sole_executor.sync()
    assert fake_redis.commands == ["XREAD", "XREAD BLOCK 1000"]  # half of publish_timeout


def test_queue_workload_counts_as_work_for_one_sync(sole_executor, fake_redis, make_workload):
    sole_executor.queue_workload(make_workload(), session=None)
    sole_executor.sync()  # the scheduler queued a task this loop: it will not sleep, so neither do we
    sole_executor.sync()  # the next loop queued nothing
    assert fake_redis.commands == ["XREAD", "XREAD", "XREAD BLOCK 500"]


def test_is_sole_executor_counts_every_configured_executor():
    from airflow.executors.executor_loader import ExecutorName

    from airflow_asyncq_provider.executors import asyncq_executor

    ours = ExecutorName("airflow_asyncq_provider.executors.AsyncQExecutor")
    local = ExecutorName("airflow.executors.local_executor.LocalExecutor")
    for names, sole in (([ours], True), ([local], False), ([local, ours], False)):
        with mock.patch("airflow.executors.executor_loader.ExecutorLoader.get_executor_names",
                        return_value=names):
            assert asyncq_executor._is_sole_executor() is sole, names
    with mock.patch("airflow.executors.executor_loader.ExecutorLoader.get_executor_names",
                    side_effect=RuntimeError("no config")):
        assert not asyncq_executor._is_sole_executor()


# -------------------------------------------------------------------------------------- liveness
def test_lost_worker_fails_its_tasks_with_a_reason(executor, fake_redis, ti_key, states):
    live, lost = ti_key("live"), ti_key("lost")
    _track(executor, live, "id-live", hostname="w-live", started=True)
    _track(executor, lost, "id-lost", hostname="w-gone", started=True)
    fake_redis.hashes["unit:worker:w-live"] = {"hostname": "w-live"}
    fake_redis.strings["unit:lease:id-live"] = "w-live"
    executor._check_worker_liveness()
    state, reason = executor.event_buffer[lost]
    assert state == states.FAILED
    assert reason == "worker w-gone lost: no heartbeat for more than 30 s"
    assert live not in executor.event_buffer and live in executor.running


def test_lost_worker_task_that_finished_is_reported_from_its_record(executor, fake_redis, ti_key, states):
    key = ti_key()
    _track(executor, key, "id-1", hostname="w-gone", started=True)
    fake_redis.hashes["unit:task:id-1"] = {"state": "success", "hostname": "w-gone"}
    executor._check_worker_liveness()
    assert executor.event_buffer[key] == (states.SUCCESS, "id-1")


# -------------------------------------------------------------------------------------- publishing
def test_process_workloads_tracks_and_reports_queued(executor, make_workload, states):
    workloads = [make_workload(task_id="a", priority_weight=1000, queue="high"),
                 make_workload(task_id="b", queue="", external_executor_id=None)]
    for w in workloads:
        executor.queued_tasks[w.ti.key] = w
    published: list[Any] = []
    executor._publish = published.extend  # type: ignore[method-assign]
    executor._process_workloads(workloads)

    a, b = published
    assert (a.task_id, a.queue, a.priority) == (workloads[0].ti.external_executor_id, "high", 0)
    assert (b.task_id, b.queue, b.priority) == (str(workloads[1].ti.id), "fallback_q", 9)
    assert a.payload == workloads[0].model_dump_json()
    assert executor.queued_tasks == {}
    for item, w in zip(published, workloads, strict=True):
        assert w.ti.key in executor.running
        assert executor.event_buffer[w.ti.key] == (states.QUEUED, item.task_id)
        assert executor._keys_by_id[item.task_id] == w.ti.key


def test_bad_executor_config_fails_only_that_task(executor, make_workload, states):
    good = make_workload(task_id="good")
    bad = make_workload(task_id="bad", executor_config={"asyncq": {"memory_request": "lots"}})
    for w in (good, bad):
        executor.queued_tasks[w.ti.key] = w
    published: list[Any] = []
    executor._publish = published.extend  # type: ignore[method-assign]
    executor._process_workloads([good, bad])
    assert [item.key for item in published] == [good.ti.key]
    state, reason = executor.event_buffer[bad.ti.key]
    assert state == states.FAILED and "memory_request" in reason and "'lots'" in reason
    assert executor.queued_tasks == {}


def test_process_workloads_of_nothing_publishes_nothing(executor):
    executor._publish = mock.Mock()  # type: ignore[method-assign]
    executor._process_workloads([])
    executor._publish.assert_not_called()


def test_outgoing_for_a_callback(executor):
    from airflow.executors.workloads import BundleInfo, ExecuteCallback
    from airflow.executors.workloads.callback import CallbackDTO

    callback = ExecuteCallback(callback=CallbackDTO(id="cb-1", fetch_method="import_path",
                                                    data={"path": "m.f", "queue": "cbq"}),
                               dag_rel_path="d.py", token="tok", log_path=None,
                               bundle_info=BundleInfo(name="b"))
    item = executor._outgoing(callback)
    assert (item.key, item.task_id, item.queue, item.priority) == (callback.callback.key, "cb-1", "cbq", 0)


def test_outgoing_refuses_unknown_workloads(executor):
    with pytest.raises(ValueError, match="cannot run workloads of type object"):
        executor._outgoing(object())


def test_publish_failure_is_retried_then_fails_the_task(executor, make_workload, states):
    workload = make_workload()
    key = workload.ti.key
    executor.queued_tasks[key] = workload
    executor._publish = mock.Mock(side_effect=PublishError("broker said no"))  # type: ignore[method-assign]

    for attempt in (1, 2):  # publish_max_retries=2: two retries stay queued
        executor._process_workloads([workload])
        assert key in executor.queued_tasks, attempt
        assert executor._publish_failures[key] == attempt
        assert key not in executor.event_buffer

    executor._process_workloads([workload])
    assert key not in executor.queued_tasks
    assert key not in executor._publish_failures
    state, info = executor.event_buffer[key]
    assert state == states.FAILED
    assert info == "could not publish to the broker after 3 attempts: broker said no"


def test_a_fresh_token_changes_nothing_but_the_token(executor, make_workload):
    """What a token_expired event republishes: the kept JSON with a token minted for the same TI."""
    from airflow.executors.workloads import ExecutorWorkload
    from pydantic import TypeAdapter

    workload = make_workload()
    item = executor._outgoing(workload)
    generator = mock.Mock()
    generator.generate.return_value = "fresh.jwt.token"
    fresh = item.with_fresh_token(generator)
    assert generator.generate.call_args.kwargs["extras"] == {"sub": str(workload.ti.id), "scope": "workload"}
    assert TypeAdapter(ExecutorWorkload).validate_json(fresh.payload).token == "fresh.jwt.token"
    before, after = json.loads(item.payload), json.loads(fresh.payload)
    assert after.pop("token") == "fresh.jwt.token" and before.pop("token") == workload.token
    assert after == before
    assert (fresh.task_id, fresh.queue, fresh.meta, fresh.label) == (item.task_id, item.queue, item.meta,
                                                                    item.label)


def test_publish_failed_directly(executor, make_workload, states):
    item = executor._outgoing(make_workload())
    key = item.key
    executor._publish_failed(item, PublishError("e"))
    executor._publish_failed(item, PublishError("e"))
    assert executor.event_buffer == {}
    executor._publish_failed(item, PublishError("last"))
    assert executor.event_buffer[key] == (states.FAILED, "could not publish to the broker after 3 attempts: last")


def test_success_after_a_failed_publish_resets_the_count(executor, make_workload):
    workload = make_workload()
    key = workload.ti.key
    executor.queued_tasks[key] = workload
    executor._publish = mock.Mock(side_effect=[PublishError("x"), None])  # type: ignore[method-assign]
    executor._process_workloads([workload])
    executor._process_workloads([workload])
    assert key not in executor._publish_failures and key in executor.running


def test_publish_error_names_the_masked_broker(executor, fake_redis, make_workload):
    fake_redis.fail_with = TimeoutError("Timeout reading from socket")
    with pytest.raises(PublishError) as err:
        executor._publish([executor._outgoing(make_workload())])
    assert str(err.value) == ("publishing 1 workload(s) to redis://:***@fake-redis:6379/0 failed: "
                              "StateUnavailable: publish: Redis unreachable (TimeoutError: Timeout reading "
                              "from socket)")
    assert isinstance(err.value.__cause__.__cause__, TimeoutError)


def test_publish_error_masks_the_broker_password(executor, fake_redis, make_workload):
    fake_redis.fail_with = OSError("connect to redis://:hunter2@fake-redis:6379/0 failed")
    with pytest.raises(PublishError) as err:
        executor._publish([executor._outgoing(make_workload())])
    assert "hunter2" not in str(err.value)
    assert "redis://:***@fake-redis:6379/0" in str(err.value)


def test_publish_writes_the_record_and_the_message(executor, fake_redis, make_workload):
    workload = make_workload(priority_weight=600)
    item = executor._outgoing(workload)
    executor._publish([item])
    record = fake_redis.hashes[f"unit:task:{item.task_id}"]
    assert record["state"] == "published" and record["queue"] == "default"
    assert fake_redis.ttls[f"unit:task:{item.task_id}"] == executor.settings.state_ttl
    (message,) = workload_messages(fake_redis)
    assert message["list"] == "default\x06\x161"  # priority_weight 600 is priority step 1
    assert message["task_id"] == item.task_id and message["priority"] == 1
    assert message["args"][0] == workload.model_dump_json()
    assert "tok" not in message["argsrepr"]  # the token never reaches Celery's logs


# -------------------------------------------------------------------------------------- revoke
def test_revoke_tracked_task(executor, fake_redis, ti_key):
    key = ti_key()
    _track(executor, key, "id-1")
    executor.queued_tasks[key] = object()  # type: ignore[assignment]
    executor.revoke_task(ti=_ti(key, "ignored-because-tracked"))
    assert key not in executor.running and key not in executor._tracked
    assert key not in executor.queued_tasks
    assert "revoked" in fake_redis.hashes["unit:task:id-1"]
    assert fake_redis.ttls["unit:task:id-1"] == executor.settings.state_ttl
    assert executor.event_buffer == {}  # revoke_task must not report a state


def test_revoke_untracked_task_uses_external_executor_id(executor, fake_redis, ti_key):
    executor.revoke_task(ti=_ti(ti_key(), "ext-9"))
    assert "revoked" in fake_redis.hashes["unit:task:ext-9"]


def test_revoke_without_an_id_touches_nothing(executor, fake_redis, ti_key):
    executor.revoke_task(ti=_ti(ti_key(), None))
    assert fake_redis.commands == [] and fake_redis.pipelines_executed == 0


def test_revoke_never_raises(executor, fake_redis, ti_key):
    import redis

    key = ti_key()
    executor.running.add(key)
    executor.queued_tasks[key] = object()  # type: ignore[assignment]
    fake_redis.fail_with = redis.ConnectionError("down")
    executor._log = mock.Mock()  # LoggingMixin caches its logger here
    executor.revoke_task(ti=_ti(key, "ext-1"))  # returns although Redis is down
    assert fake_redis.pipelines_executed == 1  # it did try to write the revoke
    assert "unit:task:ext-1" not in fake_redis.hashes
    executor._log.exception.assert_called_once()  # the failure is logged, with its traceback
    assert "ext-1" in executor._log.exception.call_args.args
    # the scheduler's slot is released all the same
    assert key not in executor.running and key not in executor.queued_tasks
    assert executor.event_buffer == {}


# -------------------------------------------------------------------------------------- adoption
def test_adopt_without_redis_adopts_nothing(ti_key):
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    tis = [_ti(ti_key(), "x")]
    assert AsyncQExecutor().try_adopt_task_instances(tis) == tis


def test_adopt_mixed(executor, fake_redis, ti_key, states):
    no_id = _ti(ti_key("no_id"), None)
    no_record = _ti(ti_key("no_record"), "id-none")
    published = _ti(ti_key("published"), "id-pub")
    started = _ti(ti_key("started"), "id-run")
    succeeded = _ti(ti_key("succeeded"), "id-ok")
    failed = _ti(ti_key("failed"), "id-bad")
    fake_redis.hashes.update({
        "unit:task:id-pub": {"queue": "q1", "published_at": "100.5", "state": "published", "sent_at": "100.6"},
        "unit:task:id-run": {"queue": "q1", "state": "started", "claimed_by": "w1", "hostname": "w1"},
        "unit:task:id-ok": {"state": "success", "claimed_by": "w1"},
        "unit:task:id-bad": {"state": "failed", "reason": "task process exited with code 1"},
    })
    not_adopted = executor.try_adopt_task_instances([no_id, no_record, published, started, succeeded, failed])
    assert {t.key for t in not_adopted} == {no_id.key, no_record.key}

    tracked = executor._tracked[published.key]
    assert (tracked.task_id, tracked.queue, tracked.published_at) == ("id-pub", "q1", 100.5)
    assert not tracked.received and tracked.hostname is None
    assert published.key in executor.running and published.key not in executor.event_buffer

    assert executor.event_buffer[started.key] == (states.RUNNING, "id-run")
    assert executor._tracked[started.key].hostname == "w1" and executor._tracked[started.key].received

    assert executor.event_buffer[succeeded.key] == (states.SUCCESS, "id-ok")
    assert succeeded.key not in executor.running and succeeded.key not in executor._tracked
    assert executor.event_buffer[failed.key] == (states.FAILED, "task process exited with code 1")


def test_adopt_takes_the_hostname_from_the_claim(executor, fake_redis, ti_key):
    ti = _ti(ti_key(), "id-1", queue="ti_q")
    fake_redis.hashes["unit:task:id-1"] = {"state": "received", "claimed_by": "w9"}
    assert executor.try_adopt_task_instances([ti]) == []
    tracked = executor._tracked[ti.key]
    assert tracked.hostname == "w9" and tracked.received and tracked.queue == "ti_q"


def test_adopt_reads_every_record_in_one_round_trip(executor, fake_redis, ti_key):
    tis = [_ti(ti_key(f"t{i}"), f"id-{i}") for i in range(50)]
    executor.try_adopt_task_instances(tis)
    assert fake_redis.pipelines_executed == 1


def test_queued_callback_is_reported_with_the_callback_state_class(executor):
    # As BaseExecutor does: change_state(key, state_class_for_key(key).QUEUED, ...), never a TI state.
    from airflow.executors.workloads import BundleInfo, ExecuteCallback
    from airflow.executors.workloads.callback import CallbackDTO
    from airflow.executors.workloads.types import CallbackState

    callback = ExecuteCallback(callback=CallbackDTO(id="cb-2", fetch_method="import_path",
                                                    data={"path": "m.f", "queue": "cbq"}),
                               dag_rel_path="d.py", token="tok", log_path=None,
                               bundle_info=BundleInfo(name="b"))
    executor.queued_callbacks[callback.callback.key] = callback
    executor._publish = lambda items: None  # type: ignore[method-assign]
    executor._process_workloads([callback])
    state, info = executor.event_buffer[callback.callback.key]
    assert state is CallbackState.QUEUED and info == "cb-2"
    assert callback.callback.key in executor.running


def test_a_restart_rereads_the_stream_from_its_start(executor, fake_redis, make_workload):
    executor._check_redis_restart()  # learns the first run_id
    _track_sent(executor, make_workload())
    executor._last_event_id = "7-0"  # not in the (new, empty) stream
    fake_redis.run_id = "after-restart"
    executor._check_redis_restart()
    assert executor._last_event_id == "0-0" and executor._recovery_at is not None


def test_a_failover_to_a_replica_that_kept_the_stream_keeps_the_reading_position(executor, fake_redis,
                                                                                    make_workload):
    for n in range(3):
        fake_redis.xadd("unit:events", {"id": f"t{n}", "kind": "received"})
    executor._check_redis_restart()
    _track_sent(executor, make_workload())
    executor._last_event_id = "2-0"
    fake_redis.run_id = "the-promoted-replica"
    executor._check_redis_restart()
    # no replay of 200,000 events from the start, but the lost-message check still runs
    assert executor._last_event_id == "2-0" and executor._recovery_at is not None


class _Clock:
    """Stands in for the ``time`` module of executors/liveness.py: ``monotonic`` moves when a test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch):
    from airflow_asyncq_provider.executors import liveness

    fake = _Clock()
    monkeypatch.setattr(liveness, "time", fake)
    return fake


class PublishSpy:
    """Wraps the message encoder: every workload message the executor builds, the refused ones too."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.fail_with: Exception | None = None  # set: every publish fails with it

    def wrap(self, encode: Any) -> Any:
        def spied(**fields: Any) -> tuple[str, str]:
            self.ids.append(fields["task_id"])
            if self.fail_with is not None:
                raise self.fail_with
            return encode(**fields)

        return spied


@pytest.fixture
def sent(monkeypatch) -> PublishSpy:
    from airflow_asyncq_provider.broker import messages

    spy = PublishSpy()
    monkeypatch.setattr(messages, "encode_workload", spy.wrap(messages.encode_workload))
    return spy


def test_a_switch_seen_while_idle_does_not_republish_what_is_published_after_it(executor, fake_redis,
                                                                                make_workload, sent, clock):
    """The run_id changes while the executor tracks nothing; a workload published afterwards went to the
    new Redis, so it is never republished as "lost" (nor counted as a redis_restart republish)."""
    executor.sync()  # learns the run_id
    fake_redis.run_id = "after-restart"
    executor._next_liveness = 0.0
    executor.sync()  # sees the switch while idle
    workload = make_workload()
    _publish_now(executor, [workload])
    clock.now += 10 * executor.settings.worker_heartbeat_interval  # long past the workers' next heartbeat
    executor._next_liveness = 0.0
    executor.sync()
    assert sent.ids == [workload.ti.external_executor_id]
    assert executor._recovery_at is None


def test_a_switch_republishes_only_what_was_waiting_when_it_was_seen(executor, fake_redis, make_workload,
                                                                    sent, clock):
    before, after, started = (make_workload(task_id=n) for n in ("before", "after", "started"))
    _publish_now(executor, [before, started])
    executor._apply(started.ti.external_executor_id, events.STARTED, {"hostname": "w1"})
    executor._check_redis_restart()  # learns the run_id
    fake_redis.run_id = "after-restart"
    fake_redis.hashes.clear()  # the restarted Redis kept nothing
    executor._check_redis_restart()
    _publish_now(executor, [after])
    clock.now += 10 * executor.settings.worker_heartbeat_interval
    executor._recover_lost_messages()
    ids = [w.ti.external_executor_id for w in (before, started, after, before)]
    assert sent.ids == ids
    # the republished workload is marked sent again, in the Redis that forgot the first mark
    assert "sent_at" in fake_redis.hashes[f"unit:task:{before.ti.external_executor_id}"]
    assert executor._recovery_at is None and executor._recovery_ids == set()


def test_a_recovery_whose_republish_fails_is_tried_again(executor, fake_redis, make_workload, sent, clock):
    """Just after a switch the new master may still refuse the re-publish: the recovery stays armed for
    the same workloads and goes through on a later heartbeat, instead of leaving them to
    task_queued_timeout."""
    lost = make_workload(task_id="lost")
    _publish_now(executor, [lost])
    executor._check_redis_restart()
    fake_redis.run_id = "after-restart"
    fake_redis.hashes.clear()
    executor._check_redis_restart()
    sent.fail_with = OSError("still switching")
    clock.now += 10 * executor.settings.worker_heartbeat_interval
    executor._recover_lost_messages()
    assert executor._recovery_at is not None and executor._recovery_ids == {lost.ti.external_executor_id}
    tries = sent.ids.count(lost.ti.external_executor_id)  # the publish, the refused re-publish
    assert tries == 2
    sent.fail_with = None
    executor._recover_lost_messages()  # not yet: one heartbeat interval between tries
    assert sent.ids.count(lost.ti.external_executor_id) == tries
    clock.now += executor.settings.worker_heartbeat_interval
    executor._recover_lost_messages()
    assert sent.ids.count(lost.ti.external_executor_id) == tries + 1
    assert executor._recovery_at is None and executor._recovery_ids == set()


# -------------------------------------------------------------------------------------- sent marks
def test_publish_writes_records_messages_and_marks_in_one_round_trip(executor, fake_redis, make_workload):
    items = [executor._outgoing(make_workload(task_id=n)) for n in ("a", "b", "c")]
    executor._publish(items)
    assert fake_redis.pipelines_executed == 1  # one MULTI, never one per workload
    assert [m["task_id"] for m in workload_messages(fake_redis)] == [i.task_id for i in items]  # in order
    for item in items:
        assert float(fake_redis.hashes[f"unit:task:{item.task_id}"]["sent_at"]) > 0
        assert fake_redis.ttls[f"unit:task:{item.task_id}"] == executor.settings.state_ttl


def test_a_failed_publish_writes_nothing(executor, fake_redis, make_workload):
    fake_redis.fail_with = OSError("gone")
    with pytest.raises(PublishError):
        executor._publish([executor._outgoing(make_workload())])
    assert fake_redis.hashes == {} and fake_redis.lists == {}


def test_adopt_leaves_a_record_whose_message_was_never_sent_to_airflow(executor, fake_redis, ti_key):
    """The scheduler died between writing the record and sending: nobody can send it now, so Airflow
    resets it. A sent mark, a claim or a counted delivery (even one a hand-back undid) proves a message."""
    tis = {name: _ti(ti_key(name), f"id-{name}") for name in ("unsent", "sent", "claimed", "delivered")}
    published = {"key": "{}", "queue": "q", "published_at": "100.0", "state": "published"}
    fake_redis.hashes.update({
        "unit:task:id-unsent": dict(published),  # also what a record of an older version looks like
        "unit:task:id-sent": {**published, "sent_at": "100.1"},
        "unit:task:id-claimed": {**published, "claimed_by": "w1"},
        "unit:task:id-delivered": {**published, "deliveries": "0"},
    })
    executor._log = mock.Mock()
    not_adopted = executor.try_adopt_task_instances(list(tis.values()))
    assert not_adopted == [tis["unsent"]]
    assert tis["unsent"].key not in executor.running and tis["unsent"].key not in executor._tracked
    assert executor.running == {tis[n].key for n in ("sent", "claimed", "delivered")}
    (warning,) = executor._log.warning.call_args_list
    assert "Not adopting" in warning.args[0] and "id-unsent" in warning.args
    assert executor.event_buffer == {}


def test_oversized_requests_of_a_batch_read_the_registry_once(executor, make_workload, states):
    """Workloads that ask for more memory than any live worker on their queue has are failed at publish,
    and a batch of them costs one registry read, not one per workload."""
    big = [make_workload(task_id=f"big{i}", executor_config={"asyncq": {"memory_request": "64GiB"}})
           for i in range(3)]
    small = make_workload(task_id="small")
    for w in (*big, small):
        executor.queued_tasks[w.ti.key] = w
    published: list[Any] = []
    executor._publish = published.extend  # type: ignore[method-assign]
    workers = {"w@h": {"queues": [big[0].ti.queue], "memory_budget": 2**30}}
    with mock.patch("airflow_asyncq_provider.state.registry.live_workers", return_value=workers) as read:
        executor._process_workloads([*big, small])
    assert read.call_count == 1
    assert [item.key for item in published] == [small.ti.key]
    for w in big:
        state, reason = executor.event_buffer[w.ti.key]
        assert state == states.FAILED and "exceeds every worker's memory budget" in reason


def test_a_batch_within_the_default_request_reads_no_registry(executor, make_workload):
    items = [make_workload(task_id=f"t{i}") for i in range(3)]
    for w in items:
        executor.queued_tasks[w.ti.key] = w
    executor._publish = lambda outgoing: None  # type: ignore[method-assign]
    with mock.patch("airflow_asyncq_provider.state.registry.live_workers") as read:
        executor._process_workloads(items)
    read.assert_not_called()
