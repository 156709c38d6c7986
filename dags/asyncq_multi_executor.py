"""One DAG, two executors: tasks pick theirs with ``executor=``; the rest run on the default one.

For ``[core] executor = LocalExecutor,airflow_asyncq_provider.executors.AsyncQExecutor`` (or with an
alias, ``LocalExecutor,AsyncQ:airflow_asyncq_provider.executors.AsyncQExecutor``). Airflow checks every
task's ``executor=`` against ``[core] executor`` when it parses the file, in the dag-processor and again
on the worker that runs the task (apache/airflow#71175), so the names are read from
``$ASYNCQ_MULTI_EXECUTORS`` (``<local name>,<fleet name>``, set by tests/system/test_multi_executor.py)
and the DAG exists only where that is set: under the default single-executor configuration of the demo
it would be an import error.

Every task returns where it ran: the fleet worker's name (``$ASYNCQ_WORKER_NAME``, set only on
``airflow asyncq worker`` processes) and the process ids of its ancestors, so the test can tell a task
forked under the scheduler (LocalExecutor) from one forked under a worker.
"""

from __future__ import annotations

import os
import socket
import time

import pendulum
from airflow.sdk import dag, get_current_context, task

START = pendulum.datetime(2026, 1, 1, tz="UTC")
NAMES = os.environ.get("ASYNCQ_MULTI_EXECUTORS", "")


def _where(tag: str) -> dict[str, object]:
    import psutil

    ctx = get_current_context()
    ti = ctx["ti"]
    path = os.environ.get("ASYNCQ_SIDE_EFFECTS")
    worker = os.environ.get("ASYNCQ_WORKER_NAME", "")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{tag} {ti.dag_id} {ti.task_id} {ti.map_index} {ti.try_number} {ctx['run_id']} "
                     f"{socket.gethostname()} {worker or '-'} {time.time():.3f}\n")
    print(f"asyncq-multi-executor: {ti.task_id} runs with worker={worker or '-'} pid={os.getpid()}")
    return {"worker": worker, "pid": os.getpid(), "ancestors": [p.pid for p in psutil.Process().parents()]}


if NAMES:
    LOCAL, FLEET = (name.strip() for name in NAMES.split(","))

    @dag(dag_id="asyncq_test_multi_executor", schedule=None, start_date=START, catchup=False)
    def asyncq_test_multi_executor():
        @task(executor=FLEET)
        def on_fleet(i: int) -> dict[str, object]:
            return _where("run")

        @task(executor=LOCAL)
        def on_local(i: int) -> dict[str, object]:
            return _where("run")

        @task
        def on_default() -> dict[str, object]:
            return _where("run")

        @task(executor=FLEET)
        def gather(fleet: list[dict[str, object]], local: list[dict[str, object]],
                   default: dict[str, object]) -> dict[str, object]:
            """Downstream of both executors: XCom crosses from local tasks to the fleet."""
            here = _where("run")
            return {"here": here, "fleet": len(fleet), "local": len(local), "default": default["pid"]}

        gather(on_fleet.expand(i=[1, 2, 3]), on_local.expand(i=[1, 2]), on_default())

    asyncq_test_multi_executor()
