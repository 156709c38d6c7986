"""DAGs the many-hosts tier drives (tests/system/hosts/): tasks that say which host ran them, and a task
that holds a slot long enough to cut its host off mid-run.

Each task appends lines to ``$ASYNCQ_SIDE_EFFECTS`` (when set), a file every host can write:
``<tag> <dag_id> <task_id> <map_index> <try_number> <run_id> <hostname> <worker> <time>``. ``hold`` writes
``start``, then ``tick`` every second, then ``done``, so a test can tell when a fenced try stopped and
that it never finished.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pendulum
from airflow.sdk import dag, get_current_context, task

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


@dag(dag_id="asyncq_hosts_many", schedule=None, start_date=START, catchup=False, max_active_tasks=32,
     params={"n": 6})
def asyncq_hosts_many():
    """``n`` short mapped tasks: which hosts take them, and whether every one runs exactly once."""

    @task
    def items() -> list[int]:
        return list(range(int(get_current_context()["params"]["n"])))

    @task(retries=1, retry_delay=datetime.timedelta(seconds=1))
    def where(i: int) -> str:
        _record("run")
        print(f"asyncq-hosts: item {i} ran on {socket.gethostname()}")
        return socket.gethostname()

    where.expand(i=items())


@dag(dag_id="asyncq_hosts_hold", schedule=None, start_date=START, catchup=False, max_active_tasks=32,
     params={"n": 1, "s": 60, "retry_s": 2, "until": ""})
def asyncq_hosts_hold():
    """``n`` tasks that run ``s`` seconds on their first try and ``retry_s`` on a retry, or less once the
    file ``until`` exists (when set): a test ends the hold when the fault it needed it for is over."""

    @task
    def slots() -> list[int]:
        return list(range(int(get_current_context()["params"]["n"])))

    @task(retries=1, retry_delay=datetime.timedelta(seconds=1))
    def hold(i: int) -> str:
        ctx = get_current_context()
        seconds = float(ctx["params"]["s"] if ctx["ti"].try_number == 1 else ctx["params"]["retry_s"])
        until = ctx["params"]["until"]
        _record("start")
        print(f"asyncq-hosts: slot {i} holds {seconds:g} s on {socket.gethostname()}")
        deadline = time.time() + seconds
        while time.time() < deadline and not (until and os.path.exists(until)):
            _record("tick")
            time.sleep(1)
        _record("done")
        return socket.gethostname()

    hold.expand(i=slots())


asyncq_hosts_many()
asyncq_hosts_hold()
