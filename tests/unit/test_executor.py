"""AsyncQExecutor's bookkeeping against a fake Redis: events -> states, publish retries, revoke, adoption."""

from __future__ import annotations

import types
from typing import Any
from unittest import mock

import pytest

from airflow_asyncq_provider.errors import PublishError
from airflow_asyncq_provider.state import events


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

    AsyncQExecutor().sync()


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
    assert a.workload is workloads[0]
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
    executor._producer = mock.Mock()
    executor._publish = mock.Mock(side_effect=PublishError("broker said no"))  # type: ignore[method-assign]

    for attempt in (1, 2):  # publish_max_retries=2: two retries stay queued
        executor._process_workloads([workload])
        assert key in executor.queued_tasks, attempt
        assert executor._publish_failures[key] == attempt
        assert key not in executor.event_buffer
    assert executor._producer is None  # the connection is reset after a failure

    executor._process_workloads([workload])
    assert key not in executor.queued_tasks
    assert key not in executor._publish_failures
    state, info = executor.event_buffer[key]
    assert state == states.FAILED
    assert info == "could not publish to the broker after 3 attempts: broker said no"


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


def test_publish_error_names_the_masked_broker(executor, make_workload):
    executor._app = mock.Mock()
    executor._app.send_task.side_effect = TimeoutError("Timeout reading from socket")
    executor._producer = mock.Mock(spec=["connection"])
    with pytest.raises(PublishError) as err:
        executor._publish([executor._outgoing(make_workload())])
    assert str(err.value) == ("publishing 1 workload(s) to redis://:***@fake-redis:6379/0 failed: "
                              "TimeoutError: Timeout reading from socket")
    assert isinstance(err.value.__cause__, TimeoutError)


def test_publish_error_masks_the_broker_password(executor, make_workload):
    executor._app = mock.Mock()
    executor._app.send_task.side_effect = OSError("connect to redis://:hunter2@fake-redis:6379/0 failed")
    executor._producer = mock.Mock(spec=["connection"])
    with pytest.raises(PublishError) as err:
        executor._publish([executor._outgoing(make_workload())])
    assert "hunter2" not in str(err.value)
    assert "redis://:***@fake-redis:6379/0" in str(err.value)


def test_publish_writes_the_record_before_sending(executor, fake_redis, make_workload):
    workload = make_workload(priority_weight=600)
    item = executor._outgoing(workload)
    order: list[str] = []
    executor._app = mock.Mock()
    executor._app.send_task.side_effect = lambda *a, **k: order.append(
        "send" if f"unit:task:{item.task_id}" in fake_redis.hashes else "send-before-record")
    executor._producer = mock.Mock(spec=["connection"])
    executor._publish([item])
    assert order == ["send"]
    record = fake_redis.hashes[f"unit:task:{item.task_id}"]
    assert record["state"] == "published" and record["queue"] == "default"
    assert fake_redis.ttls[f"unit:task:{item.task_id}"] == executor.settings.state_ttl
    (call,) = executor._app.send_task.call_args_list
    assert call.kwargs["task_id"] == item.task_id and call.kwargs["priority"] == 1
    assert call.kwargs["args"][0] == workload.model_dump_json()
    assert "tok" not in call.kwargs.get("argsrepr", "")  # the token never reaches Celery's logs


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

    fake_redis.fail_with = redis.ConnectionError("down")
    executor.revoke_task(ti=_ti(ti_key(), "ext-1"))


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
        "unit:task:id-pub": {"queue": "q1", "published_at": "100.5", "state": "published"},
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
