"""A real native lane process against a real Redis (DB 15): every option Celery documents, the time
limits, lane isolation, and the result trigger. Missing Redis fails; nothing is skipped."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded, TaskRevokedError, TimeLimitExceeded

from tests.integration._support import wait_for

pytestmark = [pytest.mark.integration]

DB = 15
URL = f"redis://127.0.0.1:6379/{DB}"
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def lane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    client = redis.Redis(db=DB, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {URL} ({exc}); run `make services`")
    prefix = f"it-native-{uuid.uuid4().hex[:6]}"
    queue = f"nq-{uuid.uuid4().hex[:6]}"
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__ASYNCQ__BROKER_URL": URL, "AIRFLOW__ASYNCQ__KEY_PREFIX": prefix,
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db"})
    log = open(home / "lane.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "airflow_asyncq_provider.native.lane", "--loop-concurrency", "50",
                             "--sync-threads", "2", "--queues", queue, "--hostname", "it@%h-native",
                             "--task-modules", "tests.integration.native.tasks"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    old = {k: os.environ.get(k) for k in ("AIRFLOW__ASYNCQ__BROKER_URL", "AIRFLOW__ASYNCQ__KEY_PREFIX")}
    os.environ.update({"AIRFLOW__ASYNCQ__BROKER_URL": URL, "AIRFLOW__ASYNCQ__KEY_PREFIX": prefix})
    from celery.utils.nodenames import host_format

    from airflow_asyncq_provider.broker.config import native_config
    from airflow_asyncq_provider.native import fleet
    from airflow_asyncq_provider.settings import load_settings

    fleet.conf.update(native_config(load_settings()))
    # An earlier test in this process (the eager unit test) may already have built the app's result
    # backend, connection pool and producer pool from the default settings. Celery caches all three
    # (celery/app/base.py: backend, pool, amqp), so drop them and let the new settings build fresh ones.
    fleet.close()
    fleet._pool = None
    vars(fleet).pop("amqp", None)
    vars(fleet._local).pop("backend", None)
    fleet._backend_cache = None
    wait_for(lambda: client.hexists(f"{prefix}:native:tasks", "t.sleep") or proc.poll() is not None, 60,
             "the lane to register its tasks")
    assert proc.poll() is None, (home / "lane.log").read_text()[-3000:]
    try:
        yield SimpleNamespace(proc=proc, queue=queue, prefix=prefix, client=client, fleet=fleet,
                              log=home / "lane.log", hostname=host_format("it@%h-native"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        client.delete(queue, *(f"{queue}\x06\x16{i}" for i in range(1, 10)))
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def send(lane: SimpleNamespace, name: str, *args: Any, **options: Any) -> Any:
    return lane.fleet.send_task(name, args=list(args), queue=lane.queue, **options)


def wait_started(lane: SimpleNamespace, *results: Any, timeout: float = 10) -> None:
    """Until the lane runs every one of these tasks: Celery's ``inspect active`` lists a task from the
    moment a coroutine slot or sync thread accepts it."""
    inspect = lane.fleet.control.inspect(destination=[lane.hostname], timeout=1.0)
    wanted = {r.id for r in results}

    def running() -> bool:
        active = (inspect.active() or {}).get(lane.hostname) or []
        return wanted <= {task["id"] for task in active}

    wait_for(running, timeout, lambda: f"the lane to start {sorted(wanted)}; log tail:\n"
                                       f"{lane.log.read_text(errors='replace')[-2000:]}")


def wait_finished(lane: SimpleNamespace, result: Any, timeout: float = 10) -> None:
    """Until the lane has finished this task: Celery logs the line after it stored any result."""
    line = f"[{result.id}] succeeded in "
    wait_for(lambda: line in lane.log.read_text(errors="replace"), timeout,
             lambda: f"the lane to log {line!r}; log tail:\n{lane.log.read_text(errors='replace')[-2000:]}")


def test_registry_lists_kinds(lane: SimpleNamespace) -> None:
    import json

    names = lane.client.hgetall(f"{lane.prefix}:native:tasks")
    assert json.loads(names["t.sleep"])["kind"] == "async" and json.loads(names["t.add"])["kind"] == "sync"
    assert "t.shared_double" in names  # shared_task lands on the fleet app


def test_async_sync_shared_bind_and_priority(lane: SimpleNamespace) -> None:
    assert send(lane, "t.add", 2, 3).get(timeout=10) == 5
    assert send(lane, "t.shared_double", 21).get(timeout=10) == 42
    who = send(lane, "t.whoami", priority=2).get(timeout=10)
    assert who["priority"] == 2 and who["retries"] == 0 and who["pid"] == lane.proc.pid


def test_thousand_coroutines_share_one_loop(lane: SimpleNamespace) -> None:
    started = time.monotonic()
    results = [send(lane, "t.sleep", 0.5) for _ in range(100)]
    assert [r.get(timeout=20) for r in results] == [0.5] * 100
    # Correctness, not speed (bench/native_lane_speed.py measures that; about 1 s): one at a time these
    # take 50 s, and on the lane's two sync threads 25 s. Under 12.5 s, at least four ran at once on
    # average, which only the shared loop can do.
    elapsed = time.monotonic() - started
    assert elapsed < 100 * 0.5 / 4, f"100 x 0.5 s on 50 coroutine slots must overlap (took {elapsed:.1f} s)"


def test_blocked_sync_threads_do_not_stall_the_loop(lane: SimpleNamespace) -> None:
    blockers = [send(lane, "t.sync_sleep", 2.0) for _ in range(2)]
    wait_started(lane, *blockers)  # both sync threads busy
    assert [send(lane, "t.sleep", 0.05).get(timeout=10) for _ in range(5)] == [0.05] * 5
    # The coroutines finished while both threads were still blocked: they did not wait for a thread.
    # (How fast they finish is measured in bench/native_lane_speed.py.)
    assert not any(b.ready() for b in blockers), "the coroutines waited for a blocked sync thread"
    assert [b.get(timeout=10) for b in blockers] == [2.0, 2.0]


def test_retry_with_countdown_and_max_retries(lane: SimpleNamespace) -> None:
    started = time.monotonic()
    assert send(lane, "t.retry", 2).get(timeout=10) == 2
    assert time.monotonic() - started >= 0.4  # two countdowns of 0.2 s
    result = send(lane, "t.retry", 5)
    with pytest.raises(Exception) as info:
        result.get(timeout=10)
    assert "MaxRetriesExceeded" in type(info.value).__name__


def test_autoretry_for_on_async_and_sync_tasks(lane: SimpleNamespace) -> None:
    assert send(lane, "t.autoretry", 2).get(timeout=10) == 2  # retried twice, then succeeded
    with pytest.raises(ConnectionError):  # retry_kwargs max_retries=3 ran out: the last error is raised
        send(lane, "t.autoretry", 9).get(timeout=10)
    with pytest.raises(ConnectionResetError):  # dont_autoretry_for: fails at once
        send(lane, "t.autoretry", 1, "ConnectionResetError").get(timeout=10)
    started = time.monotonic()
    assert send(lane, "t.autoretry_sync", 2).get(timeout=10) == 2
    assert time.monotonic() - started >= 1.5  # retry_backoff without jitter: 1 s + min(2 s, max 1 s)


def test_async_time_limits(lane: SimpleNamespace) -> None:
    with pytest.raises(SoftTimeLimitExceeded):
        send(lane, "t.async_soft", 3).get(timeout=10)
    with pytest.raises(TimeLimitExceeded):
        send(lane, "t.async_hard", 3).get(timeout=10)
    assert send(lane, "t.async_soft", 0.01).get(timeout=10) == "finished"


def test_a_coroutine_that_never_yields_is_stopped_and_the_rest_keeps_running(lane: SimpleNamespace) -> None:
    spin = send(lane, "t.spin", 30)
    time.sleep(0.2)
    sync = send(lane, "t.add", 1, 1)
    assert sync.get(timeout=5) == 2  # threads run while the loop is stuck
    with pytest.raises(TimeLimitExceeded):
        spin.get(timeout=10)
    assert send(lane, "t.sleep", 0.01).get(timeout=5) == 0.01  # the loop is free again


def test_sync_time_limits(lane: SimpleNamespace) -> None:
    assert send(lane, "t.sync_soft", 3).get(timeout=10) == "cleaned up"
    with pytest.raises(TimeLimitExceeded):
        send(lane, "t.sync_hard", 3).get(timeout=10)


def test_countdown_eta_expires_and_rate_limit(lane: SimpleNamespace) -> None:
    started = time.monotonic()
    assert send(lane, "t.add", 1, 2, countdown=1).get(timeout=10) == 3
    assert time.monotonic() - started >= 0.9
    eta = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1)
    started = time.monotonic()
    assert send(lane, "t.sleep", 0, eta=eta).get(timeout=10) == 0
    assert time.monotonic() - started >= 0.9
    with pytest.raises(TaskRevokedError):
        send(lane, "t.add", 1, 1, countdown=2, expires=1).get(timeout=10)
    started = time.monotonic()
    stamps = sorted(r.get(timeout=20) for r in [send(lane, "t.stamp") for _ in range(10)])
    assert stamps[-1] - stamps[0] >= 1.4, "rate_limit 5/s: 10 tasks need about 2 s"


@pytest.mark.parametrize("name", ["t.mark_after", "t.sync_mark_after"])
def test_revoke_terminate_stops_a_running_task(lane: SimpleNamespace, name: str) -> None:
    key = f"{lane.prefix}:marker:{uuid.uuid4().hex}"
    result = send(lane, name, key, 2.0)
    wait_started(lane, result)  # revoked while it runs; a revoke before the start is another test
    lane.fleet.control.revoke(result.id, terminate=True)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    # This sleep is what the test checks: a task that ran on would write its marker 2 s after it
    # started; wait past that moment and see that no marker came.
    time.sleep(2.5)
    assert lane.client.get(key) is None, "the task ran on after revoke(terminate=True)"
    assert send(lane, "t.add", 1, 1).get(timeout=10) == 2  # the lane carries on


def test_fire_and_forget_stores_nothing(lane: SimpleNamespace) -> None:
    result = send(lane, "t.add", 4, 4, ignore_result=True)
    wait_finished(lane, result)
    assert not lane.client.exists(f"{lane.prefix}:native:celery-task-meta-{result.id}")


def test_result_keys_live_under_the_prefix_and_expire(lane: SimpleNamespace) -> None:
    result = send(lane, "t.add", 5, 5)
    assert result.get(timeout=10) == 10
    key = f"{lane.prefix}:native:celery-task-meta-{result.id}"
    assert lane.client.exists(key) and 0 < lane.client.ttl(key) <= 86_400


def test_trigger_collects_a_group_in_order_and_fails_fast(lane: SimpleNamespace) -> None:
    from airflow_asyncq_provider.triggers.native_result import NativeResultTrigger

    async def first(trigger: NativeResultTrigger) -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    ids = [send(lane, "t.sleep", d).id for d in (0.3, 0.1, 0.2)]
    payload = asyncio.run(asyncio.wait_for(first(NativeResultTrigger(ids, ["t.sleep"] * 3, 10_000)), 15))
    assert payload == {"status": "success", "task_ids": ids, "results": [0.3, 0.1, 0.2]}
    ids = [send(lane, "t.sleep", 5).id, send(lane, "t.fail", "boom").id]
    payload = asyncio.run(asyncio.wait_for(first(NativeResultTrigger(ids, ["t.sleep", "t.fail"], 10_000)), 15))
    # Fail fast: the event came while the slow member still ran (bench/native_lane_speed.py times it).
    assert not lane.fleet.AsyncResult(ids[0]).ready(), "the trigger waited for the 5 s task to finish"
    assert payload["status"] == "failed" and payload["exc_type"] == "ValueError"
    assert "raise ValueError(message)" in payload["traceback"]
    big = send(lane, "t.big", 5000).id
    payload = asyncio.run(asyncio.wait_for(first(NativeResultTrigger([big], ["t.big"], 1000)), 15))
    assert payload["status"] == "too_large" and payload["size"] > 5000


def test_operator_without_deferral_sends_checks_and_collects(lane: SimpleNamespace) -> None:
    from airflow_asyncq_provider.native.errors import UnknownTaskError
    from airflow_asyncq_provider.operators.queue_task import QueueTaskGroupOperator, QueueTaskOperator

    run_id = f"r-{uuid.uuid4().hex[:6]}"

    def ti(task_id: str) -> SimpleNamespace:
        return SimpleNamespace(dag_id="d", task_id=task_id, run_id=run_id, map_index=-1, try_number=1)

    op = QueueTaskOperator(task_id="t", task_name="t.add", args=[20, 22], queue=lane.queue, deferrable=False)
    assert op.execute({"ti": ti("t")}) == 42
    group = QueueTaskGroupOperator(task_id="g", deferrable=False, queue=lane.queue,
                                   signatures=[{"task_name": "t.sleep", "args": [0.2]}, {"task_name": "t.add", "args": [1, 2]}])
    assert group.execute({"ti": ti("g")}) == [0.2, 3]
    with pytest.raises(UnknownTaskError, match="Did you mean 't.add'"):
        QueueTaskOperator(task_id="u", task_name="x.add", queue=lane.queue, deferrable=False).execute({"ti": ti("u")})
