"""AsyncQExecutor against a real Redis: the publish path, the event stream, liveness, broker errors."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest

from airflow_asyncq_provider.broker.config import priority_step
from airflow_asyncq_provider.broker.messages import EXECUTE_WORKLOAD
from airflow_asyncq_provider.errors import BrokerUnavailable
from airflow_asyncq_provider.state import events, records, registry
from airflow_asyncq_provider.state.keys import Keys

from ._support import KOMBU_SEP, REDIS_URL

pytestmark = pytest.mark.integration


@pytest.fixture
def states():
    from airflow.utils.state import TaskInstanceState

    return TaskInstanceState


@pytest.fixture
def asyncq_env(monkeypatch, key_prefix, queue_name):
    """Settings through AIRFLOW__* variables, which ExecutorConf reads."""
    monkeypatch.setenv("AIRFLOW__ASYNCQ__BROKER_URL", REDIS_URL)
    monkeypatch.setenv("AIRFLOW__ASYNCQ__KEY_PREFIX", key_prefix)
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_QUEUE", queue_name)  # tasks without queue= go here
    monkeypatch.setenv("AIRFLOW__ASYNCQ__PUBLISH_TIMEOUT", "2")
    return monkeypatch


@pytest.fixture
def executor(asyncq_env) -> Iterator[Any]:
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    ex = AsyncQExecutor()
    ex.start()
    yield ex
    ex.end()


def _queue_list(name: str, step: int) -> str:
    return name if step == 0 else f"{name}{KOMBU_SEP}{step}"


def _publish(executor, workloads) -> None:
    for w in workloads:
        executor.queue_workload(w, session=None)
    executor._process_workloads(workloads)


def _message_for(redis_client, queue: str, task_id: str) -> tuple[int, dict[str, Any]]:
    for step in range(10):
        for raw in redis_client.lrange(_queue_list(queue, step), 0, -1):
            message = json.loads(raw)
            if message["headers"]["id"] == task_id:
                return step, message
    raise AssertionError(f"no message {task_id} in any priority list of {queue!r}")


def test_start_reads_settings_from_airflow_config(executor, key_prefix, queue_name):
    assert executor.settings.broker_url == REDIS_URL
    assert executor.settings.key_prefix == key_prefix
    assert executor.settings.default_queue == queue_name
    assert executor.keys == Keys(key_prefix)


def test_start_reads_only_new_events(asyncq_env, redis_client, key_prefix):
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    keys = Keys(key_prefix)
    events.emit(redis_client, keys, "before-start", events.SUCCESS, maxlen=1000, ttl=60)
    ex = AsyncQExecutor()
    ex.start()
    try:
        assert ex._last_event_id == events.latest_id(redis_client, keys) != "0-0"
    finally:
        ex.end()


def test_publish_puts_json_messages_in_the_priority_lists(executor, redis_client, key_prefix, queue_name,
                                                          new_queue, make_workload, states):
    from airflow.executors.workloads import ExecutorWorkload
    from pydantic import TypeAdapter

    # publish to our own queues only, so the cleanup finds everything this test wrote
    assert executor.settings.default_queue == queue_name
    other = new_queue()
    workloads = [
        make_workload(task_id="urgent", priority_weight=5000, queue=queue_name),
        make_workload(task_id="mid", priority_weight=500, queue=queue_name),
        make_workload(task_id="low", priority_weight=1, queue=queue_name),
        make_workload(task_id="elsewhere", priority_weight=20, queue=other),
        make_workload(task_id="no_queue", priority_weight=3, queue=""),
    ]
    _publish(executor, workloads)

    assert executor.queued_tasks == {}
    decoder = TypeAdapter(ExecutorWorkload)
    expected_queue = {"urgent": queue_name, "mid": queue_name, "low": queue_name, "elsewhere": other,
                      "no_queue": queue_name}  # the empty queue falls back to [operators] default_queue
    for w in workloads:
        task_id = w.ti.external_executor_id
        queue = expected_queue[w.ti.task_id]
        step, message = _message_for(redis_client, queue, task_id)
        assert step == priority_step(w.ti.priority_weight), w.ti.task_id
        assert message["content-type"] == "application/json"
        assert message["headers"]["task"] == EXECUTE_WORKLOAD
        assert message["headers"]["id"] == task_id  # the message id is the pre-assigned id
        assert message["properties"]["priority"] == step
        assert message["properties"]["delivery_info"]["routing_key"] == queue
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert kwargs == {}
        payload, meta = args  # (workload JSON, scheduling metadata)
        assert decoder.validate_json(payload).model_dump() == w.model_dump()
        assert meta == {"memory_request": executor.settings.default_memory_request,
                        "memory_limit": executor.settings.default_memory_limit}
        assert w.token not in json.dumps(message["headers"])  # Celery logs argsrepr, not the token

        record = redis_client.hgetall(f"{key_prefix}:task:{task_id}")
        assert record["state"] == "published" and record["queue"] == queue
        assert json.loads(record["key"]) == {"dag_id": w.ti.dag_id, "task_id": w.ti.task_id,
                                             "run_id": w.ti.run_id, "try_number": 1, "map_index": -1}
        assert 0 < redis_client.ttl(f"{key_prefix}:task:{task_id}") <= executor.settings.state_ttl

        assert w.ti.key in executor.running
        assert executor.event_buffer[w.ti.key] == (states.QUEUED, task_id)

    assert redis_client.llen(queue_name) == 1  # only the urgent one is on step 0
    assert redis_client.llen(_queue_list(queue_name, 9)) == 1


def test_republishing_the_same_workload_keeps_one_identity(executor, redis_client, queue_name,
                                                           make_workload):
    workload = make_workload(queue=queue_name)
    _publish(executor, [workload])
    _publish(executor, [workload])  # e.g. a retry after an ambiguous failure
    step = priority_step(workload.ti.priority_weight)
    ids = {json.loads(m)["headers"]["id"] for m in redis_client.lrange(_queue_list(queue_name, step), 0, -1)}
    assert ids == {workload.ti.external_executor_id}  # a worker's claim drops the second copy


def test_sync_turns_events_into_states(executor, redis_client, key_prefix, queue_name, make_workload,
                                       states):
    keys = Keys(key_prefix)
    ok, bad, dup = (make_workload(task_id=n, queue=queue_name) for n in ("ok", "bad", "dup"))
    _publish(executor, [ok, bad, dup])
    executor.get_event_buffer()  # drop the QUEUED entries
    registry.heartbeat(redis_client, keys, "w-it@h", {"queues": [queue_name]}, ttl=30)

    def emit(w, kind, **fields):
        events.emit(redis_client, keys, w.ti.external_executor_id, kind, maxlen=10_000, ttl=60,
                    hostname="w-it@h", **fields)

    emit(ok, events.RECEIVED)
    emit(ok, events.STARTED, pid=123)
    emit(bad, events.STARTED, pid=124)
    executor.sync()
    assert executor.get_event_buffer() == {ok.ti.key: (states.RUNNING, ok.ti.external_executor_id),
                                           bad.ti.key: (states.RUNNING, bad.ti.external_executor_id)}

    emit(ok, events.SUCCESS, exit_code=0, reason="exit code 0")
    emit(bad, events.FAILED, exit_code=1, reason="task process exited with code 1")
    emit(dup, events.DUPLICATE, reason="already claimed by someone@h")
    executor.sync()
    assert executor.get_event_buffer() == {
        ok.ti.key: (states.SUCCESS, ok.ti.external_executor_id),
        bad.ti.key: (states.FAILED, "task process exited with code 1"),
    }
    assert executor.running == {dup.ti.key}  # a duplicate delivery reports nothing


def test_an_idle_sync_waits_for_the_next_outcome_and_returns_with_it(asyncq_env, redis_client, key_prefix,
                                                                     queue_name, make_workload, states):
    """What [asyncq] event_wait buys the scheduler: an outcome written while its loop would sleep is
    applied by the sync() already waiting, at once, not after the idle sleep and the next loop."""
    import threading

    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    asyncq_env.setenv("AIRFLOW__ASYNCQ__EVENT_WAIT", "1.5")
    asyncq_env.setenv("AIRFLOW__ASYNCQ__PUBLISH_TIMEOUT", "4")  # the wait is capped at half of it
    executor = AsyncQExecutor()
    with mock.patch("airflow_asyncq_provider.executors.asyncq_executor._is_sole_executor", return_value=True):
        executor.start()
    try:
        workload = make_workload(task_id="waited", queue=queue_name)
        _publish(executor, [workload])
        executor.sync()  # this loop was handed the workload: no wait
        executor.get_event_buffer()

        started = time.monotonic()
        executor.sync()  # nothing happens: it waits event_wait, then returns with nothing
        assert time.monotonic() - started >= 1.4
        assert executor.get_event_buffer() == {}

        task_id = workload.ti.external_executor_id
        timer = threading.Timer(0.3, events.emit, (redis_client, Keys(key_prefix), task_id, events.SUCCESS),
                                {"maxlen": 10_000, "ttl": 60, "hostname": "w-it@h", "exit_code": 0})
        timer.start()
        started = time.monotonic()
        executor.sync()
        waited = time.monotonic() - started
        timer.join()
        assert executor.get_event_buffer() == {workload.ti.key: (states.SUCCESS, task_id)}
        assert 0.25 <= waited < 1.4, f"sync() returned after {waited:.2f} s, not with the event"
    finally:
        executor.end()


def test_started_on_a_worker_without_heartbeat_is_lost(executor, redis_client, key_prefix, queue_name,
                                                       make_workload, states):
    keys = Keys(key_prefix)
    workload = make_workload(queue=queue_name)
    _publish(executor, [workload])
    events.emit(redis_client, keys, workload.ti.external_executor_id, events.STARTED, maxlen=1000, ttl=60,
                hostname="never-beat@h")
    executor.sync()
    state, reason = executor.get_event_buffer()[workload.ti.key]
    assert state == states.FAILED
    assert reason.startswith("worker never-beat@h lost: no heartbeat for more than 30 s")


def _heartbeat(redis_client, keys, hostname: str, started_at: float, pid: int, tasks: list[str]) -> None:
    """What a worker process' heartbeat writes (worker/service.py ``info``)."""
    registry.heartbeat(redis_client, keys, hostname, registry.WorkerInfo(
        queues=["q"], slots=4, running=len(tasks), version="it", pid=pid, forkserver_pid=None,
        started_at=started_at, last_claim_at=started_at, consumer_tick_at=time.time(), draining=False,
        memory_budget=1, memory_reserved=0, memory_in_use=0,
        tasks={t: registry.RunningTask(123, 0, None) for t in tasks}), ttl=30)


def test_a_worker_restarted_under_the_same_name_has_its_predecessors_tasks_lost_at_once(
        executor, redis_client, key_prefix, queue_name, make_workload, states):
    keys, host = Keys(key_prefix), "w-restart@h"
    workload = make_workload(queue=queue_name)
    task_id = workload.ti.external_executor_id
    _publish(executor, [workload])
    _heartbeat(redis_client, keys, host, started_at=time.time() - 10, pid=100, tasks=[])
    # what the worker does with the message (worker/runner.py): claim, received, first lease, started
    assert records.claim(redis_client, keys, task_id, host, ttl=60).won
    events.emit(redis_client, keys, task_id, events.RECEIVED, maxlen=1000, ttl=60, hostname=host)
    records.take_lease(redis_client, keys, task_id, host, lease_ms=30_000)
    events.emit(redis_client, keys, task_id, events.STARTED, maxlen=1000, ttl=60, hostname=host, pid=123)
    executor.sync()  # started after the process' last heartbeat: not listed yet, but its lease is there
    assert executor.get_event_buffer() == {workload.ti.key: (states.RUNNING, task_id)}

    # SIGKILLed; a supervisor starts the node again at once (1 s later on its clock) and it heartbeats
    _heartbeat(redis_client, keys, host, started_at=time.time() + 1, pid=200, tasks=[])
    executor._next_liveness = 0.0  # the next periodic check, without waiting LIVENESS_EVERY
    executor.sync()

    state, reason = executor.get_event_buffer()[workload.ti.key]
    assert state == states.FAILED
    assert reason.startswith(f"worker {host} lost: it restarted (pid 200, started at ")
    assert reason.endswith("after it took this task; the process that ran it is gone")
    assert redis_client.exists(keys.lease(task_id)), "reported while the dead process' lease still runs"


def test_sync_cost_follows_events_not_running_tasks(executor, redis_client, key_prefix, queue_name,
                                                    make_workload, monkeypatch, states):
    workloads = [make_workload(task_id=f"t{i}", queue=queue_name) for i in range(500)]
    _publish(executor, workloads)
    assert len(executor.running) == 500
    executor.get_event_buffer()

    commands: list[str] = []
    pipelines: list[bool] = []
    client = executor._redis
    real_execute, real_pipeline = client.execute_command, client.pipeline

    def execute_command(*args: Any, **kwargs: Any) -> Any:
        commands.append(str(args[0]).upper())
        return real_execute(*args, **kwargs)

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipelines.append(True)
        return real_pipeline(*args, **kwargs)

    monkeypatch.setattr(client, "execute_command", execute_command)
    monkeypatch.setattr(client, "pipeline", pipeline)

    # The first sync runs the periodic checks (Redis restart, liveness, waiting workloads); their
    # round trips must not grow with the number of tasks.
    executor.sync()
    assert len(commands) + len(pipelines) <= 6, (commands, pipelines)
    assert not {"HGETALL", "HGET", "EXISTS"} & set(commands), "no command per task"

    commands.clear()
    pipelines.clear()
    executor.sync()
    assert (commands, pipelines) == (["XREAD"], []), "500 idle tasks and no events cost one XREAD"

    keys = Keys(key_prefix)
    for w in workloads[:3]:
        events.emit(redis_client, keys, w.ti.external_executor_id, events.SUCCESS, maxlen=10_000, ttl=60)
    commands.clear()
    executor.sync()
    assert (commands, pipelines) == (["XREAD"], [])
    assert executor.get_event_buffer() == {w.ti.key: (states.SUCCESS, w.ti.external_executor_id)
                                           for w in workloads[:3]}
    assert len(executor.running) == 497


def test_events_are_read_in_batches(asyncq_env, redis_client, key_prefix, queue_name, make_workload):
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    asyncq_env.setenv("AIRFLOW__ASYNCQ__EVENT_BATCH_SIZE", "4")
    ex = AsyncQExecutor()
    ex.start()
    try:
        workloads = [make_workload(task_id=f"t{i}", queue=queue_name) for i in range(10)]
        _publish(ex, workloads)
        ex.get_event_buffer()
        for w in workloads:
            events.emit(redis_client, Keys(key_prefix), w.ti.external_executor_id, events.SUCCESS,
                        maxlen=10_000, ttl=60)
        sizes = []
        for _ in range(4):
            ex.sync()
            sizes.append(len(ex.get_event_buffer()))
        assert sizes == [4, 4, 2, 0]
    finally:
        ex.end()


def test_revoke_marks_the_record(executor, redis_client, key_prefix, queue_name, make_workload):
    workload = make_workload(queue=queue_name)
    _publish(executor, [workload])
    executor.revoke_task(ti=workload.ti)
    record = redis_client.hgetall(f"{key_prefix}:task:{workload.ti.external_executor_id}")
    assert float(record["revoked"]) > 0
    assert workload.ti.key not in executor.running


def test_adoption_from_records(executor, redis_client, key_prefix, queue_name, make_workload, states):
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    done, running, unknown = (make_workload(task_id=n, queue=queue_name) for n in ("done", "running", "x"))
    _publish(executor, [done, running])
    keys = Keys(key_prefix)
    registry.heartbeat(redis_client, keys, "w@h", {}, ttl=30)
    events.emit(redis_client, keys, done.ti.external_executor_id, events.SUCCESS, maxlen=1000, ttl=60,
                hostname="w@h")
    events.emit(redis_client, keys, running.ti.external_executor_id, events.STARTED, maxlen=1000, ttl=60,
                hostname="w@h")

    successor = AsyncQExecutor()  # a new scheduler after a restart
    successor.start()
    try:
        not_adopted = successor.try_adopt_task_instances([done.ti, running.ti, unknown.ti])
        assert [ti.key for ti in not_adopted] == [unknown.ti.key]
        assert successor.get_event_buffer() == {
            done.ti.key: (states.SUCCESS, done.ti.external_executor_id),
            running.ti.key: (states.RUNNING, running.ti.external_executor_id)}
        assert successor.running == {running.ti.key}
    finally:
        successor.end()


def test_a_record_whose_message_was_never_sent_is_left_to_airflow_to_reset(
        executor, redis_client, key_prefix, queue_name, make_workload):
    """A record without ``sent_at`` and untouched by any worker has no message: a publisher of an older
    version was killed between its record and its send (today both are one MULTI). The adopting
    scheduler B cannot send it, so it does not adopt it: Airflow resets it and queues it again at once,
    instead of after [scheduler] task_queued_timeout. What was sent, or a worker touched, B adopts."""
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    keys = Keys(key_prefix)
    sent, unsent, claimed = (make_workload(task_id=n, queue=queue_name) for n in ("sent", "unsent", "claimed"))
    _publish(executor, [sent])
    records.publish(redis_client, keys, [records.NewRecord(w.ti.external_executor_id, "{}", queue_name)
                                         for w in (unsent, claimed)], ttl=60)  # records, no message
    messages = {json.loads(raw)["headers"]["id"] for step in range(10)
                for raw in redis_client.lrange(_queue_list(queue_name, step), 0, -1)}
    assert messages == {sent.ti.external_executor_id}
    for w in (unsent, claimed):
        record = redis_client.hgetall(keys.task(w.ti.external_executor_id))
        assert record["state"] == "published" and "sent_at" not in record
    assert "sent_at" in redis_client.hgetall(keys.task(sent.ti.external_executor_id))
    # A worker claimed this one although its mark is missing: a message did exist, so it is adopted.
    records.claim(redis_client, keys, claimed.ti.external_executor_id, "w@h", ttl=60)

    successor = AsyncQExecutor()  # B, on the same fleet
    successor.start()
    try:
        not_adopted = successor.try_adopt_task_instances([sent.ti, unsent.ti, claimed.ti])
        assert [ti.key for ti in not_adopted] == [unsent.ti.key]
        assert successor.running == {sent.ti.key, claimed.ti.key}
        assert successor.get_event_buffer() == {}
        # and revoked, so that a message A did send after all is dropped before a worker claims it
        assert records.is_revoked(redis_client, keys, unsent.ti.external_executor_id)
        assert not records.is_revoked(redis_client, keys, sent.ti.external_executor_id)
    finally:
        successor.end()


def _lose_the_broker(executor: Any) -> None:
    """The broker goes away after start: the executor's client now points at a closed port."""
    import dataclasses

    from airflow_asyncq_provider.state.client import make_redis

    executor._redis.close()
    executor._redis = make_redis(dataclasses.replace(executor.settings, broker_url="redis://127.0.0.1:1/0"))


@pytest.mark.slow
def test_broker_lost_after_start_retries_then_fails_the_task(asyncq_env, queue_name, make_workload, states):
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    asyncq_env.setenv("AIRFLOW__ASYNCQ__PUBLISH_TIMEOUT", "0.5")
    asyncq_env.setenv("AIRFLOW__ASYNCQ__PUBLISH_MAX_RETRIES", "1")
    ex = AsyncQExecutor()
    ex.start()
    try:
        workload = make_workload(queue=queue_name)
        ex.queue_workload(workload, session=None)
        _lose_the_broker(ex)
        ex._process_workloads([workload])
        assert workload.ti.key in ex.queued_tasks  # still queued: retried on the next heartbeat
        assert workload.ti.key not in ex.event_buffer
        ex._process_workloads([workload])
        state, reason = ex.get_event_buffer()[workload.ti.key]
        assert state == states.FAILED
        assert reason.startswith("could not publish to the broker after 2 attempts: publishing 1 "
                                 "workload(s) to ")
        assert workload.ti.key not in ex.queued_tasks and workload.ti.key not in ex.running
    finally:
        ex.end()


@pytest.mark.slow
def test_publish_to_a_dead_broker_is_bounded_by_publish_timeout(asyncq_env, queue_name, make_workload):
    import time

    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    publish_timeout = 0.5
    asyncq_env.setenv("AIRFLOW__ASYNCQ__PUBLISH_TIMEOUT", str(publish_timeout))
    ex = AsyncQExecutor()
    ex.start()
    try:
        workload = make_workload(queue=queue_name)
        ex.queue_workload(workload, session=None)
        _lose_the_broker(ex)
        started = time.monotonic()
        ex._process_workloads([workload])
        elapsed = time.monotonic() - started
        assert workload.ti.key in ex.queued_tasks
        # The contract, not a speed target (bench/publish_timeout.py measures how fast: a few ms):
        # one attempt gives up within publish_timeout and never sleeps in kombu's reconnect back-off,
        # which took 4x publish_timeout here (2 s). The extra second is for a loaded machine.
        assert elapsed < publish_timeout + 1.0, \
            f"one publish attempt blocked the scheduler loop for {elapsed:.1f} s"
    finally:
        ex.end()


# ---------------------------------------------------------------------------------- broker unavailable
@pytest.mark.parametrize(("url", "masked", "secret"), [
    ("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0", None),
    ("redis://asyncq:Sup3r-S3cret@127.0.0.1:1/0", "redis://asyncq:***@127.0.0.1:1/0", "Sup3r-S3cret"),
    ("redis://:Sup3r-S3cret@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0", "Sup3r-S3cret"),
])
def test_unreachable_broker_at_start(monkeypatch, caplog, capsys, url, masked, secret):
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    monkeypatch.setenv("AIRFLOW__ASYNCQ__BROKER_URL", url)
    monkeypatch.setenv("AIRFLOW__ASYNCQ__PUBLISH_TIMEOUT", "1")
    ex = AsyncQExecutor()
    with caplog.at_level("ERROR"), pytest.raises(BrokerUnavailable) as err:
        ex.start()
    message = str(err.value)
    assert message.startswith(f"AsyncQExecutor: [asyncq] broker_url is {masked} but no Redis answered")
    assert "[asyncq] broker_url" in message
    assert err.value.__cause__ is not None  # translated at the boundary, cause kept
    captured = capsys.readouterr()
    logged = caplog.text + captured.out + captured.err  # Airflow 3 logs through structlog to stdout
    assert f"broker_url is {masked}" in logged  # the scheduler log says why it stopped
    if secret:
        for text in (message, logged, repr(err.value)):
            assert secret not in text
