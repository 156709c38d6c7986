"""asyncq_bench_sleep: N mapped tasks that sleep, the loaded state of ``bench/memory/run.py``.

N (default 8) and the sleep (default 300 s) come from ``$ASYNCQ_BENCH_SLEEPERS`` and
``$ASYNCQ_BENCH_SLEEP_S``. The benchmark samples the worker tree while all N sleep, then stops the
deployment; the tasks never need to finish.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag, task

N = int(os.environ.get("ASYNCQ_BENCH_SLEEPERS", "8"))
SLEEP_S = float(os.environ.get("ASYNCQ_BENCH_SLEEP_S", "300"))


@dag(
    dag_id="asyncq_bench_sleep",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=64,
    tags=["benchmark"],
)
def asyncq_bench_sleep():
    @task
    def sleep(x: int) -> None:
        import time

        time.sleep(SLEEP_S)

    sleep.expand(x=list(range(N)))


asyncq_bench_sleep()
