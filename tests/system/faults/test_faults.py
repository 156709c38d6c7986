"""Fault injection on real processes: each case injects the fault for real, then counts that every task
instance reached its correct final state, none stayed queued or running, and no try ran twice."""

from __future__ import annotations

import contextlib
import json
import signal
import time
import uuid
from pathlib import Path

import pytest

from airflow_asyncq_provider.broker.config import make_celery_app
from airflow_asyncq_provider.broker.messages import EXECUTE_WORKLOAD
from airflow_asyncq_provider.settings import AsyncQSettings
from devtools.stack import Stack
from tests.system.conftest import read_effects, wait_for
from tests.system.faults.conftest import (
    REDIS_PASSWORD,
    TASK_QUEUED_TIMEOUT,
    PrivateRedis,
    account,
    grep_logs,
)

pytestmark = [pytest.mark.system, pytest.mark.slow]


@pytest.fixture
def workers(fault_stack: Stack):
    """Workers a case starts; whatever is left is stopped after the case."""
    names: list[str] = []

    def start(name: str, queues: str = "default", concurrency: int = 2) -> str:
        fault_stack.start_worker(name, queues=queues, concurrency=concurrency, serve_logs=False)
        names.append(name)
        return name

    yield start
    for name in names:
        if name in fault_stack.procs:
            fault_stack.kill(name, signal.SIGKILL)


def _runs(effects: Path, dag_id: str, run_id: str) -> list[list[str]]:
    return [r for r in read_effects(effects, dag_id, run_id) if r[0] == "run"]


def _wait_registered(redis_server: PrivateRedis, name: str) -> None:
    client = redis_server.client()
    wait_for(lambda: any(k.startswith(f"faults:worker:{name}@") for k in client.keys("faults:worker:*")),
             120, f"worker {name} to register")


def test_worker_sigkill_mid_task(fault_stack: Stack, workers, fault_effects: Path,
                                 private_redis: PrivateRedis) -> None:
    dag_id = "asyncq_fault_long"
    workers("victim")
    fault_stack.wait_dag(dag_id)
    run_id = fault_stack.trigger(dag_id, conf={"s": 60, "retry_s": 2})  # only the killed try must be long
    wait_for(lambda: _runs(fault_effects, dag_id, run_id), 120, "the long task to start", fault_stack)
    killed_at = time.monotonic()
    fault_stack.kill("victim", signal.SIGKILL)  # the worker's whole process group, as an OOM kill would
    workers("rescuer")
    # the executor reports the try failed (worker lost) within worker_lost_timeout, Airflow retries it
    wait_for(lambda: len(_runs(fault_effects, dag_id, run_id)) >= 2, 120, "the retry to start", fault_stack)
    assert time.monotonic() - killed_at < 60, "worker loss must be noticed in seconds, not after 300 s"
    fault_stack.api("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", {"note": "retry running"})
    assert fault_stack.wait_run(dag_id, run_id, timeout=180) == "success"
    account("worker SIGKILL mid-task", fault_stack, fault_effects, dag_id, run_id,
            {"long_task[-1]": "success"}, max_tries={"long_task[-1]": 2})
    assert fault_stack.xcom(dag_id, run_id, "long_task") == "rescuer"
    assert "worker victim@" in (fault_stack.logs / "scheduler.log").read_text()


def test_scheduler_sigkill_mid_run(fault_stack: Stack, workers, fault_effects: Path) -> None:
    dag_id = "asyncq_test_sleepers"
    workers("steady", concurrency=4)
    fault_stack.wait_dag(dag_id)
    run_id = fault_stack.trigger(dag_id, conf={"n": 6, "s": 8})
    wait_for(lambda: len(_runs(fault_effects, dag_id, run_id)) >= 2, 120, "sleepers to start", fault_stack)
    fault_stack.kill("scheduler", signal.SIGKILL)
    fault_stack.spawn("scheduler", "scheduler")
    assert fault_stack.wait_run(dag_id, run_id, timeout=300) == "success"
    account("scheduler SIGKILL mid-run", fault_stack, fault_effects, dag_id, run_id,
            {**{f"sleeper[{i}]": "success" for i in range(6)}, "items[-1]": "success",
             "gather[-1]": "success"}, max_tries={f"sleeper[{i}]": 1 for i in range(6)})


def test_redis_restart_mid_run(fault_stack: Stack, workers, fault_effects: Path,
                               private_redis: PrivateRedis) -> None:
    dag_id = "asyncq_test_sleepers"
    workers("survivor", concurrency=2)
    fault_stack.wait_dag(dag_id)
    release = fault_stack.home / f"release-{uuid.uuid4().hex[:8]}"  # the sleepers end once it exists
    run_id = fault_stack.trigger(dag_id, conf={"n": 6, "s": 6, "until": str(release)})
    # two sleepers run, four wait in Redis; then Redis restarts with nothing on disk
    wait_for(lambda: len(_runs(fault_effects, dag_id, run_id)) >= 2, 120, "sleepers to start", fault_stack)
    scheduler_log = fault_stack.logs / "scheduler.log"
    offset = scheduler_log.stat().st_size
    private_redis.stop()
    time.sleep(1)
    private_redis.start()
    # Once the executor has seen the restart, the sleepers need not sleep: the four it lost are
    # re-published after that and then run at once, instead of in two more waves of 6 s.
    with contextlib.suppress(TimeoutError):  # the assertions below tell what went wrong
        wait_for(lambda: b"Redis restarted" in scheduler_log.read_bytes()[offset:], 60,
                 "the executor to see the restart", fault_stack)
    release.touch()
    assert fault_stack.wait_run(dag_id, run_id, timeout=300) == "success"
    account("Redis restart mid-run", fault_stack, fault_effects, dag_id, run_id,
            {**{f"sleeper[{i}]": "success" for i in range(6)}, "items[-1]": "success",
             "gather[-1]": "success"}, max_tries={f"sleeper[{i}]": 1 for i in range(6)})
    assert "Redis restarted" in (fault_stack.logs / "scheduler.log").read_text()


def test_worker_sigterm_drains_then_terminates(fault_stack: Stack, workers, fault_effects: Path) -> None:
    dag_id = "asyncq_fault_long"
    workers("drained", concurrency=1)
    fault_stack.wait_dag(dag_id)
    run_id = fault_stack.trigger(dag_id, conf={"s": 40, "retry_s": 2})  # only the drained try must be long
    wait_for(lambda: _runs(fault_effects, dag_id, run_id), 120, "the long task to start", fault_stack)
    proc = fault_stack.procs["drained"]
    proc.send_signal(signal.SIGTERM)  # the worker process only, as `docker stop` does
    assert proc.wait(60) == 5  # documented: drain timeout ran out, running tasks were terminated
    fault_stack.procs.pop("drained")
    log = (fault_stack.logs / "drained.log").read_text()
    assert "worker_drain_timeout of 4 s ran out" in log
    workers("successor")
    assert fault_stack.wait_run(dag_id, run_id, timeout=180) == "success"
    account("worker SIGTERM with a running task", fault_stack, fault_effects, dag_id, run_id,
            {"long_task[-1]": "success"}, max_tries={"long_task[-1]": 2})
    task_log = fault_stack.task_log(dag_id, run_id, "long_task", 1)
    assert "worker_drain_timeout of 4 s ran out" in task_log


def test_poison_messages_are_dead_lettered_and_the_worker_keeps_serving(
        fault_stack: Stack, workers, fault_effects: Path, private_redis: PrivateRedis) -> None:
    workers("sturdy", queues="default")
    _wait_registered(private_redis, "sturdy")
    app = make_celery_app(AsyncQSettings(broker_url=private_redis.url, key_prefix="faults"))
    client = private_redis.client()
    client.delete("faults:dlq")
    poison = [f"poison-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    app.send_task(EXECUTE_WORKLOAD, args=("this is not json",), task_id=poison[0], queue="default")
    app.send_task(EXECUTE_WORKLOAD, args=(json.dumps({"type": "ExecuteTask", "token": "x"}),),
                  task_id=poison[1], queue="default")
    with app.connection_for_write() as conn:  # a pickle body must be refused unread
        conn.default_channel.basic_publish(
            conn.default_channel.prepare_message(
                b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.", content_type="application/x-python-serialize",
                content_encoding="binary", headers={"id": poison[2], "task": EXECUTE_WORKLOAD}),
            exchange="", routing_key="default")
    dead = wait_for(lambda: (len(client.lrange("faults:dlq", 0, -1)) >= 3) and client.lrange("faults:dlq", 0, -1),
                    60, "three dead letters")
    records = [json.loads(r) for r in dead]
    assert {r["id"] for r in records} == set(poison)
    assert any("pickle" in r["error"] or "ContentDisallowed" in r["error"] for r in records)
    listed = fault_stack.run("asyncq", "dlq", "list").stdout
    assert all(p in listed for p in poison)
    dag_id = "asyncq_quickstart"
    fault_stack.wait_dag(dag_id)
    run_id = fault_stack.trigger(dag_id, conf={"n": 4})
    assert fault_stack.wait_run(dag_id, run_id, timeout=180) == "success"
    account("poison messages", fault_stack, fault_effects, dag_id, run_id,
            {"numbers[-1]": "success", "total[-1]": "success", **{f"square[{i}]": "success" for i in range(4)}})
    assert fault_stack.run("asyncq", "dlq", "purge", "--yes").returncode == 0


def test_duplicate_delivery_runs_once(fault_stack: Stack, workers, fault_effects: Path,
                                      private_redis: PrivateRedis) -> None:
    """Copy the message while no worker consumes the queue, so two identical deliveries exist."""
    dag_id = "asyncq_fault_slowq"
    client = private_redis.client()
    fault_stack.wait_dag(dag_id)
    run_id = fault_stack.trigger(dag_id)

    def queued_message() -> tuple[str, str] | None:
        # kombu keeps one list per priority step: "slowq" for step 0, "slowq\x06\x16<n>" for the others
        for key in client.keys("slowq*"):
            items = client.lrange(key, 0, -1)
            if items:
                return key, items[0]
        return None

    key, raw = wait_for(queued_message, 120, "the message on slowq", fault_stack)
    client.lpush(key, raw)
    assert client.llen(key) == 2
    workers("dupes", queues="slowq", concurrency=2)
    assert fault_stack.wait_run(dag_id, run_id, timeout=180) == "success"
    account("duplicate delivery", fault_stack, fault_effects, dag_id, run_id, {"late[-1]": "success"},
            max_tries={"late[-1]": 1})
    wait_for(lambda: "dropping this duplicate delivery" in (fault_stack.logs / "dupes.log").read_text(), 30,
             "the duplicate to be dropped")
    assert client.llen(key) == 0


def test_expired_token_is_refreshed_before_the_task_starts(fault_stack: Stack, workers,
                                                           fault_effects: Path) -> None:
    dag_id = "asyncq_fault_slowq"
    fault_stack.wait_dag(dag_id)
    run_id = fault_stack.trigger(dag_id)
    wait_for(lambda: fault_stack.task_instances(dag_id, run_id)[0]["state"] == "queued", 120, "queued",
             fault_stack)
    time.sleep(TASK_QUEUED_TIMEOUT + 3)  # the workload's token is now past its validity
    workers("latecomer", queues="slowq")
    assert fault_stack.wait_run(dag_id, run_id, timeout=180) == "success"
    account("expired token", fault_stack, fault_effects, dag_id, run_id, {"late[-1]": "success"},
            max_tries={"late[-1]": 1})
    assert "sent with a fresh token" in (fault_stack.logs / "scheduler.log").read_text()


def test_no_secret_in_any_log(fault_stack: Stack, workers, private_redis: PrivateRedis) -> None:
    """Every component's log and every task log, grepped for secrets. The case makes logs of its own (a
    worker that connects with the password, a run whose workloads carry tokens), so it does not count on
    the other cases having run; when they did, their logs are grepped too."""
    workers("witness")
    _wait_registered(private_redis, "witness")
    dag_id = "asyncq_quickstart"
    fault_stack.wait_dag(dag_id)
    run_id = fault_stack.trigger(dag_id, conf={"n": 2})
    assert fault_stack.wait_run(dag_id, run_id, timeout=180) == "success"
    # the grep below has this case's logs to search: the worker's, and the run's task logs
    assert (fault_stack.logs / "witness.log").read_text(errors="replace").strip()
    assert "sum of 2 squares = 1" in fault_stack.task_log(dag_id, run_id, "total", 1)
    assert grep_logs(fault_stack, REDIS_PASSWORD) == []
    assert grep_logs(fault_stack, '"token":') == []
    status = fault_stack.run("asyncq", "status")
    assert REDIS_PASSWORD not in status.stdout + status.stderr
    assert "asyncq:***@" in status.stdout
