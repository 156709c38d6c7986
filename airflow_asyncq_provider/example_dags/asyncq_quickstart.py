"""asyncq_quickstart: the DAG ``make demo`` runs, and the first thing to look at in the UI.

A fan-out over ``params.n`` (default 24) dynamically mapped task instances, each squaring its input on
the fleet, then a fan-in that sums their XComs and checks the sum against the closed form
n(n-1)(2n-1)/6. Every task instance runs on an ``airflow asyncq worker``; the XComs travel through the
Execution API exactly as under LocalExecutor.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task


@dag(
    dag_id="asyncq_quickstart",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"n": 24},
    tags=["asyncq", "example"],
)
def asyncq_quickstart():
    @task
    def numbers() -> list[int]:
        n = int(get_current_context()["params"]["n"])
        return list(range(n))

    @task
    def square(x: int) -> int:
        return x * x

    @task
    def total(squares: list[int]) -> int:
        values = list(squares)
        n = len(values)
        expected = (n - 1) * n * (2 * n - 1) // 6
        result = sum(values)
        if result != expected:
            raise ValueError(f"sum of squares is {result}, expected {expected}")
        print(f"sum of {n} squares = {result}")
        return result

    total(square.expand(x=numbers()))


asyncq_quickstart()
