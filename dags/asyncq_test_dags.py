"""DAGs the system tests drive: retries with a visible reason, queue routing, priority, side effects.

Each task appends one line to ``$ASYNCQ_SIDE_EFFECTS`` (when set), so tests can count how many times
every task instance really ran.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pendulum
from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback, dag, get_current_context, task

START = pendulum.datetime(2026, 1, 1, tz="UTC")


def _record(tag: str) -> None:
    path = os.environ.get("ASYNCQ_SIDE_EFFECTS")
    if not path:
        return
    ctx = get_current_context()
    ti = ctx["ti"]
    line = (f"{tag} {ti.dag_id} {ti.task_id} {ti.map_index} {ti.try_number} {ctx['run_id']} "
            f"{socket.gethostname()} {os.environ.get('ASYNCQ_WORKER_NAME', '')} {time.time():.3f}\n")
    with open(path, "a") as fh:
        fh.write(line)


def _sleep(seconds: float, until: str) -> None:
    """``seconds``, or less once the file ``until`` exists (when set): a test ends the wait when what it
    needed the task running for has happened."""
    if not until:
        time.sleep(seconds)
        return
    deadline = time.time() + seconds
    while time.time() < deadline and not os.path.exists(until):
        time.sleep(0.2)


@dag(dag_id="asyncq_test_retry", schedule=None, start_date=START, catchup=False)
def asyncq_test_retry():
    @task(retries=1, retry_delay=datetime.timedelta(seconds=1))
    def always_fails() -> None:
        _record("run")
        raise RuntimeError("deliberate failure from asyncq_test_retry")

    always_fails()


@dag(dag_id="asyncq_test_queues", schedule=None, start_date=START, catchup=False)
def asyncq_test_queues():
    @task(queue="high_mem")
    def on_high_mem() -> str:
        _record("run")
        return os.environ.get("ASYNCQ_WORKER_NAME", "")

    @task
    def on_default() -> str:
        _record("run")
        return os.environ.get("ASYNCQ_WORKER_NAME", "")

    on_high_mem()
    on_default()


@dag(dag_id="asyncq_test_blocker", schedule=None, start_date=START, catchup=False)
def asyncq_test_blocker():
    @task(queue="prio", priority_weight=1)
    def blocker() -> None:
        _record("start")
        time.sleep(12)

    blocker()


@dag(dag_id="asyncq_test_priority", schedule=None, start_date=START, catchup=False, max_active_tasks=16)
def asyncq_test_priority():
    """Low-priority work is published first; the high-priority task is published later (after gate)."""

    @task(queue="prio", priority_weight=1, weight_rule="absolute")
    def low(i: int) -> None:
        _record("start")

    @task(weight_rule="absolute")
    def gate() -> None:
        time.sleep(1)

    @task(queue="prio", priority_weight=1000, weight_rule="absolute")
    def high() -> None:
        _record("start")

    low.expand(i=[1, 2, 3])
    gate() >> high()


@dag(dag_id="asyncq_test_sleepers", schedule=None, start_date=START, catchup=False,
     params={"n": 6, "s": 6, "until": ""})
def asyncq_test_sleepers():
    """``n`` sleepers of ``s`` seconds each, or until the file ``until`` exists (when set)."""

    @task
    def items() -> list[int]:
        ctx = get_current_context()
        return list(range(int(ctx["params"]["n"])))

    @task
    def sleeper(i: int) -> int:
        _record("run")
        params = get_current_context()["params"]
        _sleep(float(params["s"]), params["until"])
        return i

    @task
    def gather(values: list[int]) -> int:
        _record("run")
        return sum(values)

    gather(sleeper.expand(i=items()))


asyncq_test_retry()
asyncq_test_queues()
asyncq_test_blocker()
asyncq_test_priority()
asyncq_test_sleepers()


@dag(dag_id="asyncq_test_nobody", schedule=None, start_date=START, catchup=False)
def asyncq_test_nobody():
    @task(queue="nobody_listens")
    def stranded() -> None:
        _record("run")

    stranded()


asyncq_test_nobody()


@dag(
    dag_id="asyncq_test_deadline",
    schedule=None,
    start_date=START,
    catchup=False,
    params={"tag": "none", "until": ""},
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=datetime.timedelta(seconds=2),
        callback=SyncCallback("asyncq_callbacks.record_deadline_miss", kwargs={"tag": "deadline-test"}),
    ),
)
def asyncq_test_deadline():
    @task
    def slow() -> None:
        _sleep(15, get_current_context()["params"]["until"])

    slow()


asyncq_test_deadline()


@dag(dag_id="asyncq_test_memory", schedule=None, start_date=START, catchup=False,
     params={"mib": 400, "limit": "200MiB", "request": "64MiB"})
def asyncq_test_memory():
    """One task allocates past its limit; the next one must still run on the same worker."""

    @task(queue="high_mem", retries=0, executor_config={"asyncq": {"memory_request": "64MiB",
                                                                    "memory_limit": "200MiB"}})
    def hog() -> None:
        _record("run")
        mib = int(get_current_context()["params"]["mib"])
        blocks = []
        for _ in range(mib // 10):
            blocks.append(bytearray(10 * 1024 * 1024))
            time.sleep(0.05)
        time.sleep(5)

    @task(queue="high_mem", trigger_rule="all_done")
    def after() -> str:
        _record("run")
        return os.environ.get("ASYNCQ_WORKER_NAME", "")

    hog() >> after()


@dag(dag_id="asyncq_test_budget", schedule=None, start_date=START, catchup=False)
def asyncq_test_budget():
    """Two tasks whose requests together exceed w-highmem's budget must not overlap on it."""

    @task(queue="high_mem", executor_config={"asyncq": {"memory_request": "600MiB"}})
    def big(i: int) -> None:
        _record("start")
        time.sleep(4)
        _record("end")

    big.expand(i=[1, 2])


@dag(dag_id="asyncq_test_too_big", schedule=None, start_date=START, catchup=False)
def asyncq_test_too_big():
    @task(queue="high_mem", executor_config={"asyncq": {"memory_request": "500GiB"}})
    def enormous() -> None:
        _record("run")

    enormous()


asyncq_test_memory()
asyncq_test_budget()
asyncq_test_too_big()


@dag(dag_id="asyncq_fault_long", schedule=None, start_date=START, catchup=False,
     params={"s": 20, "retry_s": 2})
def asyncq_fault_long():
    """One long task with a retry: the fault suite kills or drains its worker mid-run. The first try runs
    ``s`` seconds, a retry ``retry_s``: only the first try has to outlast the fault."""

    @task(retries=1, retry_delay=datetime.timedelta(seconds=1))
    def long_task() -> str:
        _record("run")
        ctx = get_current_context()
        time.sleep(float(ctx["params"]["s"] if ctx["ti"].try_number == 1 else ctx["params"]["retry_s"]))
        return os.environ.get("ASYNCQ_WORKER_NAME", "")

    long_task()


@dag(dag_id="asyncq_fault_slowq", schedule=None, start_date=START, catchup=False)
def asyncq_fault_slowq():
    """A task on a queue that gets its worker late, after its token has expired."""

    @task(queue="slowq")
    def late() -> str:
        _record("run")
        return "ran"

    late()


asyncq_fault_long()
asyncq_fault_slowq()
