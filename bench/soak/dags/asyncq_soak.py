"""asyncq_soak: ``params.n`` trivial mapped tasks; bench/soak/run.py triggers it until 2,000+ ran."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task


@dag(
    dag_id="asyncq_soak",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"n": 500},
    max_active_tasks=64,
)
def asyncq_soak():
    @task
    def items() -> list[int]:
        return list(range(int(get_current_context()["params"]["n"])))

    @task
    def noop(i: int) -> int:
        return i

    noop.expand(i=items())


asyncq_soak()
