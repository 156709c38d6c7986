"""Several executors: ``[core] executor = LocalExecutor,<AsyncQExecutor>``, tasks pick one with ``executor=``.

A deployment of its own (the shared stack has one executor): PostgreSQL database named with the pid,
key prefix of its own, the Redis DB of ``ASYNCQ_SYSTEM_REDIS_DB``, and a default queue of its own
(``mx_default``), so that its workload messages never meet the shared stack's workers in the same Redis
DB (Celery's queue names are not prefixed). It runs twice, once per spelling of the configuration:

- ``LocalExecutor,airflow_asyncq_provider.executors.AsyncQExecutor`` with ``executor="AsyncQExecutor"``
  (the class name; Airflow also accepts the module path);
- ``LocalExecutor,AsyncQ:airflow_asyncq_provider.executors.AsyncQExecutor`` with ``executor="AsyncQ"``.

The DAG is dags/asyncq_multi_executor.py. Per task instance the test checks which executor ran it: the
TI's ``executor`` field, the task record the fleet keeps in Redis (only fleet tasks have one), and where
the process ran, from its XCom: the fleet worker's name and the worker's pid among its ancestors, or the
scheduler's pid among them (LocalExecutor forks tasks under the scheduler).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.stack import REPO, Stack
from tests.system.conftest import PG, REDIS_DB, _psql, _require, read_effects, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

DAG_ID = "asyncq_test_multi_executor"
QUEUE = "mx_default"
WORKER = "mx-w1"


@dataclasses.dataclass(frozen=True)
class Form:
    config: str  # [core] executor
    fleet: str  # what tasks write in executor=


FORMS = {
    "class-name": Form("LocalExecutor,airflow_asyncq_provider.executors.AsyncQExecutor", "AsyncQExecutor"),
    "alias": Form("LocalExecutor,AsyncQ:airflow_asyncq_provider.executors.AsyncQExecutor", "AsyncQ"),
}


@dataclasses.dataclass
class Deployment:
    stack: Stack
    form: Form
    effects: Path
    redis: redis.Redis
    prefix: str


@pytest.fixture(scope="module", params=list(FORMS))
def mx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    _require(5432, "PostgreSQL")
    _require(6379, "Redis")
    form = FORMS[request.param]
    db = f"asyncq_mx_{os.getpid()}"
    _psql(f"DROP DATABASE IF EXISTS {db}")
    _psql(f"CREATE DATABASE {db}")
    home = tmp_path_factory.mktemp(f"mx_home_{request.param}")
    dags = home / "dags"
    dags.mkdir()
    shutil.copy(REPO / "dags" / "asyncq_multi_executor.py", dags)  # this DAG alone: less to parse
    effects = home / "side_effects.log"
    prefix = f"mx-{uuid.uuid4().hex[:8]}"
    s = Stack(home, sql_conn=PG.format(db=db), broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
              executor=form.config, key_prefix=prefix, dags_folder=dags, extra_env={
                  "ASYNCQ_SIDE_EFFECTS": str(effects),
                  "ASYNCQ_MULTI_EXECUTORS": f"LocalExecutor,{form.fleet}",
                  "AIRFLOW__OPERATORS__DEFAULT_QUEUE": QUEUE,
                  "AIRFLOW__CORE__PARALLELISM": "8",
              })
    client = redis.Redis(port=6379, db=REDIS_DB, decode_responses=True)
    s.migrate()
    s.start_core()
    # The scheduler serves the LocalExecutor's logs on worker_log_server_port; the worker, on the same
    # machine, must not bind it too. Its tasks' logs are read from the shared log folder.
    s.start_worker(WORKER, queues=QUEUE, concurrency=4, serve_logs=False)
    try:
        s.wait_api()
        yield Deployment(s, form, effects, client, prefix)
    finally:
        s.stop()
        if os.environ.get("ASYNCQ_KEEP_LOGS"):
            shutil.copytree(s.logs, Path(os.environ["ASYNCQ_KEEP_LOGS"]) / f"mx-{request.param}",
                            dirs_exist_ok=True)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        keys += [k for k in client.scan_iter(match=f"{QUEUE}*", count=1000)]
        keys += [k for k in client.scan_iter(match=f"_kombu.binding.{QUEUE}*", count=1000)]
        if keys:
            client.delete(*keys)
        _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_tasks_run_on_the_executor_they_name(mx: Deployment) -> None:
    stack = mx.stack
    stack.wait_dag(DAG_ID)
    run_id = stack.trigger(DAG_ID)
    assert stack.wait_run(DAG_ID, run_id, timeout=300) == "success"
    tis = {(ti["task_id"], ti["map_index"]): ti for ti in stack.task_instances(DAG_ID, run_id)}
    fleet = [("on_fleet", i) for i in range(3)] + [("gather", -1)]
    local = [("on_local", i) for i in range(2)]
    assert set(tis) == {*fleet, *local, ("on_default", -1)}
    assert Counter(ti["state"] for ti in tis.values()) == {"success": 7}

    # 1. What Airflow recorded: the executor named on the task, None for the default one.
    assert {key: tis[key]["executor"] for key in fleet} == dict.fromkeys(fleet, mx.form.fleet)
    assert {key: tis[key]["executor"] for key in local} == dict.fromkeys(local, "LocalExecutor")
    assert tis[("on_default", -1)]["executor"] is None  # the first of [core] executor: LocalExecutor

    # 2. Where each one ran: under the worker (its name in the environment, its pid an ancestor) or
    # under the scheduler.
    scheduler_pid, worker_pid = stack.procs["scheduler"].pid, stack.procs[WORKER].pid
    where = {key: stack.xcom(DAG_ID, run_id, key[0], key[1]) for key in [*fleet, *local, ("on_default", -1)]}
    where[("gather", -1)] = where[("gather", -1)]["here"]
    for key in fleet:
        assert where[key]["worker"] == WORKER and worker_pid in where[key]["ancestors"], (key, where[key])
        assert scheduler_pid not in where[key]["ancestors"]
    for key in [*local, ("on_default", -1)]:
        assert where[key]["worker"] == "" and scheduler_pid in where[key]["ancestors"], (key, where[key])
        assert worker_pid not in where[key]["ancestors"]

    # 3. What the fleet saw: a task record and a finished state for its four workloads, nothing for
    # the local ones; XCom crossed from the local tasks to the fleet's gather.
    records = [mx.redis.hgetall(k) for k in mx.redis.scan_iter(match=f"{mx.prefix}:task:*", count=1000)]
    finished = Counter((r.get("state"), r.get("claimed_by", "").split("@")[0]) for r in records)
    assert finished == {("success", WORKER): 4}, records
    gathered = stack.xcom(DAG_ID, run_id, "gather")
    assert (gathered["fleet"], gathered["local"]) == (3, 2)

    # 4. Each ran once, and each log is where a user looks for it.
    runs = Counter((r[2], r[3]) for r in read_effects(mx.effects, DAG_ID, run_id))
    assert runs == {(task, str(index)): 1 for task, index in tis}
    for task, index in [("on_fleet", 0), ("on_local", 0)]:
        text = stack.task_log(DAG_ID, run_id, task, 1, index)
        assert f"asyncq-multi-executor: {task} runs with worker=" in text, text[-2000:]


def test_a_worker_without_the_schedulers_executor_list_cannot_load_such_dags(mx: Deployment) -> None:
    """apache/airflow#71175 on the fleet: a task parses its DAG file again on the worker, and Airflow
    checks every ``executor=`` in it against the *worker's* ``[core] executor``. A worker started
    without the scheduler's list (here the default, as a pod template that hard-codes one would do)
    cannot load such a DAG: Airflow 3.3 logs "Dag not found during start up" and puts the task back to
    UP_FOR_RESCHEDULE, again and again, so the run never ends. ``airflow asyncq worker`` warns about it
    when it starts; the fix is to give the workers the scheduler's ``[core] executor``."""
    stack = mx.stack
    stack.kill(WORKER, signal.SIGTERM)
    stack.spawn("mx-bad", "asyncq", "worker", "-q", QUEUE, "-c", "2", "--hostname", "mx-bad@%h",
                "--skip-serve-logs", env={"ASYNCQ_WORKER_NAME": "mx-bad",
                                          "AIRFLOW__CORE__EXECUTOR": "LocalExecutor"})
    run_id = stack.trigger(DAG_ID)
    try:
        needle = f"specifies executor '{mx.form.fleet}', which is not available"

        def rescheduled() -> str | None:
            try:
                text = stack.task_log(DAG_ID, run_id, "on_fleet", 1, 0)
            except RuntimeError:  # no log yet
                return None
            return text if needle in text and "UP_FOR_RESCHEDULE" in text else None

        wait_for(rescheduled, 180, "the fleet task's parse failure on the misconfigured worker", stack, every=2)

        def local_done() -> dict[tuple[str, int], str] | None:
            tis = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in stack.task_instances(DAG_ID, run_id)}
            done = all(tis[key] == "success" for key in [("on_local", 0), ("on_local", 1), ("on_default", -1)])
            return tis if done else None

        tis = wait_for(local_done, 180, "the local tasks, which the worker's config does not concern", stack)
        assert {tis[("on_fleet", i)] for i in range(3)} <= {"up_for_reschedule", "scheduled", "queued", "running"}
        assert tis[("gather", -1)] in (None, "scheduled")  # waits on the fleet tasks
        assert [r for r in read_effects(mx.effects, DAG_ID, run_id) if r[2] == "on_fleet"] == []  # no code ran
        worker_log = (stack.logs / "mx-bad.log").read_text(errors="replace")
        assert "without AsyncQExecutor" in worker_log and "apache/airflow#71175" in worker_log
    finally:
        stack.api("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", {"state": "failed"})
        stack.kill("mx-bad", signal.SIGTERM)
        stack.start_worker(WORKER, queues=QUEUE, concurrency=4, serve_logs=False)

