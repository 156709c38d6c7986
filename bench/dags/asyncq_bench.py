"""asyncq_bench: N dynamically mapped trivial tasks, the workload of ``bench/run.py``.

N comes from ``$ASYNCQ_BENCH_N`` (default 100), which the benchmark sets for every component, so the
mapping is expanded by the scheduler when the run is created and no upstream task runs first: the
run's wall time is N task instances going through the executor and nothing else.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag, task

N = int(os.environ.get("ASYNCQ_BENCH_N", "100"))


@dag(
    dag_id="asyncq_bench",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["benchmark"],
)
def asyncq_bench():
    @task
    def noop(x: int) -> None:
        """Trivial on purpose: the cost measured is the executor's, not the task's."""
        return None

    noop.expand(x=list(range(N)))


asyncq_bench()
