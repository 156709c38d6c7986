"""The asyncq_native_tasks example on real Airflow: scheduler, triggerer, an asyncq worker whose native
lane runs the example's tasks, PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Iterator

import pytest
import redis

from devtools.stack import Stack
from tests.system.conftest import REDIS_DB, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

DAG_ID = "asyncq_native_tasks"


@pytest.fixture(scope="module")
def native_worker(stack: Stack) -> Iterator[str]:
    """A worker with a native lane (its Airflow lane listens on a queue nothing uses)."""
    stack.spawn("w-native", "asyncq", "worker", "-q", "native_idle", "-c", "1", "--skip-serve-logs",
                "--hostname", "w-native@%h", "--loop-concurrency", "50", "--sync-threads", "2",
                env={"AIRFLOW__ASYNCQ__TASK_MODULES": "airflow_asyncq_provider.native.examples",
                     "ASYNCQ_WORKER_NAME": "w-native"})
    client = redis.Redis(db=REDIS_DB, decode_responses=True)
    prefix = stack.env["AIRFLOW__ASYNCQ__KEY_PREFIX"]
    key = f"{prefix}:native:tasks"

    def lane_ready() -> bool:
        # Both: this lane registered the tasks (an earlier test's lane may have left the name behind),
        # and the worker's heartbeat shows its lane alive, which is what the example's first task checks.
        record = client.hget(key, "asyncq.examples.fetch_page")
        if not record or not json.loads(record).get("hostname", "").startswith("w-native@"):
            return False
        names = [n for n in client.smembers(f"{prefix}:workers") if n.startswith("w-native@")]
        native = [client.hget(f"{prefix}:worker:{n}", "native") for n in names]
        return any(raw and json.loads(raw).get("alive") for raw in native)

    wait_for(lane_ready, 120, "the native lane to register the example tasks and show in the registry",
             stack=stack)
    try:
        yield "w-native"
    finally:
        stack.kill("w-native", signal.SIGTERM)


def test_native_tasks_example_runs_on_the_lane_and_combines_through_xcom(stack: Stack, native_worker: str) -> None:
    stack.wait_dag(DAG_ID)
    run_id = stack.trigger(DAG_ID)
    state = stack.wait_run(DAG_ID, run_id, timeout=240)
    tis = {ti["task_id"]: ti for ti in stack.task_instances(DAG_ID, run_id)}
    failed = [tid for tid, ti in tis.items() if ti["state"] != "success"]
    assert state == "success", {tid: (tis[tid]["state"], stack.task_log(DAG_ID, run_id, tid, tis[tid]["try_number"])[-3000:])
                                for tid in failed}
    assert {tid: ti["state"] for tid, ti in tis.items()} == dict.fromkeys(
        ["serve_pages", "fetch_pages", "checksum", "flaky", "urgent", "combine", "stop_pages"], "success")
    # Each native call deferred once and resumed (the triggerer carried the wait).
    for task_id in ("fetch_pages", "checksum", "flaky", "urgent"):
        assert tis[task_id]["try_number"] == 1

    pages = stack.xcom(DAG_ID, run_id, "fetch_pages")
    assert [p["url"].rsplit("/", 1)[-1] for p in pages] == ["1", "2", "3", "4", "5"]
    assert [p["words"] for p in pages] == [2 + 10 * i for i in range(1, 6)]
    digest = stack.xcom(DAG_ID, run_id, "checksum")
    assert digest["sha256"] == hashlib.sha256(f"{run_id}\nasyncq\nnative".encode()).hexdigest()
    assert stack.xcom(DAG_ID, run_id, "flaky") == {"attempts": 3}
    assert stack.xcom(DAG_ID, run_id, "urgent") == {"label": "urgent", "priority": 0}
    combined = stack.xcom(DAG_ID, run_id, "combine")
    assert combined["pages"] == 5 and combined["words"] == sum(2 + 10 * i for i in range(1, 6))
    assert combined["flaky_attempts"] == 3 and combined["statuses"] == [200]

    fetch_log = stack.task_log(DAG_ID, run_id, "fetch_pages", 1)
    assert "Sent native task asyncq.examples.fetch_page" in fetch_log
    assert "finished" in fetch_log
    worker_log = (stack.logs / "w-native.log").read_text(errors="replace")
    assert "native lane w-native@" in worker_log and "asyncq.examples.flaky" in worker_log
    assert "Retry in 1s" in worker_log


def test_unknown_task_name_and_remote_failure_fail_the_task_with_a_clear_log(stack: Stack, native_worker: str) -> None:
    """Dropped into the copied dags folder: an unknown name fails before sending; a remote failure
    fails the task with the remote type and traceback in its log."""
    dags = stack.home / "dags"
    (dags / "asyncq_native_bad_input.py").write_text(BAD_INPUT_DAG)
    stack.wait_dag("asyncq_native_bad_input", timeout=240)
    run_id = stack.trigger("asyncq_native_bad_input")
    assert stack.wait_run("asyncq_native_bad_input", run_id, timeout=180) == "failed"
    tis = {ti["task_id"]: ti for ti in stack.task_instances("asyncq_native_bad_input", run_id)}
    assert tis["unknown_name"]["state"] == "failed"
    assert tis["remote_failure"]["state"] == "failed"
    assert tis["fire_and_forget"]["state"] == "success"
    unknown_log = stack.task_log("asyncq_native_bad_input", run_id, "unknown_name", 1)
    assert "UnknownTaskError" in unknown_log and "asyncq.examples.fetch_pag" in unknown_log
    assert "Did you mean 'asyncq.examples.fetch_page'" in unknown_log
    failure_log = stack.task_log("asyncq_native_bad_input", run_id, "remote_failure", 1)
    assert "httpx.ConnectError" in failure_log and "remote traceback" in failure_log.lower()
    assert "examples.py" in failure_log  # a frame of the remote task
    task_id = stack.xcom("asyncq_native_bad_input", run_id, "fire_and_forget")
    assert isinstance(task_id, str) and len(task_id) == 36
    # Celery logs this line on the lane after it stored any result, so the result key is final then.
    done = f"Task asyncq.examples.rank[{task_id}] succeeded in "
    lane_log = stack.logs / f"{native_worker}.log"  # the lane writes to its worker's log
    wait_for(lambda: done in lane_log.read_text(errors="replace"), 60,
             f"the lane to log {done!r} in {lane_log}", stack=stack)
    client = redis.Redis(db=REDIS_DB, decode_responses=True)
    assert not client.exists(f"{stack.env['AIRFLOW__ASYNCQ__KEY_PREFIX']}:native:celery-task-meta-{task_id}")
    json.dumps(tis["unknown_name"])  # the API answered JSON for every TI


BAD_INPUT_DAG = '''
import pendulum
from airflow.sdk import dag
from airflow_asyncq_provider.operators.queue_task import QueueTaskOperator


@dag(dag_id="asyncq_native_bad_input", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
     catchup=False)
def bad_input():
    QueueTaskOperator(task_id="unknown_name", task_name="asyncq.examples.fetch_pag", args=["x"])
    # Nothing listens on port 1: httpx raises ConnectError on the lane.
    QueueTaskOperator(task_id="remote_failure", task_name="asyncq.examples.fetch_page",
                      args=["http://127.0.0.1:1/nothing-listens-here"])
    QueueTaskOperator(task_id="fire_and_forget", task_name="asyncq.examples.rank", args=["ff"],
                      wait_for_result=False)


bad_input()
'''
