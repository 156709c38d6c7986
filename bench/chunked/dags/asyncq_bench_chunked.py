"""asyncq_bench_chunked: the fan-out of bench/chunked/run.py (split → mapped process → combine).

Aggregates ``params.path`` (a sales CSV from the ETL example's generator) by region in at least
``params.chunks`` chunks, within a 1 GiB budget per chunk task.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag

from airflow_asyncq_provider.example_dags.asyncq_chunked_csv_etl import DTYPES, merge_sums, sum_by_region
from airflow_asyncq_provider.operators import chunked_fan_out


@dag(
    dag_id="asyncq_bench_chunked",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={"path": Param("", type="string"), "chunks": Param(8, type="integer", minimum=1)},
)
def asyncq_bench_chunked():
    chunked_fan_out(
        group_id="agg",
        path="{{ params.path }}",
        memory_budget="1GiB",
        process=sum_by_region,
        combine=merge_sums,
        read_options={"dtype": DTYPES},
        min_chunks="{{ params.chunks }}",
        process_retries=0,
    )


asyncq_bench_chunked()
