"""asyncq_memory_guard: a chunk task blows past its memory limit, is stopped, and its retry succeeds.

What it shows:

1. ``generate`` writes a small CSV of ``params.rows`` fixed-width rows (about 2 MB).
2. ``guarded`` is a ``chunked_fan_out`` cut into ``params.chunks`` chunks. Each chunk task asks the
   fleet for ``memory_budget`` (1 GiB) with a hard ``memory_limit`` of 1.5 GiB through
   ``executor_config``. The ``process`` step is a stand-in for feature engineering whose working set
   grows with the rows it holds; on chunk ``params.heavy_chunk`` it needs about 1.9 GiB for the whole
   chunk.
3. Try 1 of that chunk goes over 1.5 GiB. The worker's memory watchdog kills its process tree, and the
   task instance fails with "memory limit exceeded: used X MiB > limit 1536 MiB" (also appended to the
   try's log). The other chunks succeed.
4. Try 2 (the chunk tasks have retries) finds the first try's attempt marker still "running", so it
   knows that try was killed rather than raising, and processes the chunk as 2 record-aligned pieces
   one after another. Each piece needs about 0.95 GiB plus the interpreter, under the limit: it
   succeeds. The log says "Adaptive retry: ... processing it as 2 record-aligned pieces".
5. ``check`` verifies that every generated row was counted exactly once across the chunks.

It needs the memory watchdog of ``airflow asyncq worker`` (memory limits from ``executor_config``).
The CSV and the attempt markers go to ``[asyncq] shared_storage``: the retry may run on another
worker host than the try that was killed, and it must find that try's marker.
"""

from __future__ import annotations

import datetime
import os

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from airflow_asyncq_provider.operators import chunked_fan_out, storage
from airflow_asyncq_provider.sizes import MIB

DAG_ID = "asyncq_memory_guard"
MEMORY_LIMIT = 1536 * MIB
# what the whole heavy chunk would need: 1.25x the limit, so half of it (0.62x) fits beside the interpreter
HEAVY_WORKING_SET = int(MEMORY_LIMIT * 1.25)


def write_rows(path: str, rows: int) -> int:
    """Fixed-width rows, so chunks and pieces hold the same number of rows whatever the cut."""
    storage.makedirs(os.path.dirname(path))
    with storage.atomic_output(path) as out:
        out.write(b"id,sensor,value\n")
        for start in range(0, rows, 10_000):
            out.write("".join(f"{i:09d},s{i % 97:02d},{(i * 7919) % 100_000:06d}\n"
                              for i in range(start, min(rows, start + 10_000))).encode())
    return rows


def expensive_features(frame, chunk):
    """process: a working set proportional to the rows held, and far larger on the heavy chunk."""
    import numpy as np

    heavy = int(get_current_context()["params"]["heavy_chunk"])
    if chunk.index == heavy:
        # the whole chunk needs HEAVY_WORKING_SET; a piece of it needs its share
        need = HEAVY_WORKING_SET // chunk.pieces
        print(f"{chunk.label}: building a {need // MIB} MiB feature matrix for {len(frame)} rows")
        features = np.ones(need // 8, dtype=np.float64)  # np.ones writes every page: really resident
        checksum = int(features[:: 4096].sum())
        del features
    else:
        checksum = 0
    return {"rows": len(frame), "value_sum": int(frame["value"].sum()), "checksum": checksum}


def add_counts(accumulated, value):
    return {key: accumulated[key] + value[key] for key in accumulated}


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={
        "rows": Param(60_000, type="integer", minimum=100),
        "chunks": Param(3, type="integer", minimum=2),
        "heavy_chunk": Param(1, type="integer", minimum=0, description="index of the chunk that blows up"),
    },
    tags=["asyncq", "example", "chunked", "memory"],
    doc_md=__doc__,
)
def asyncq_memory_guard():
    @task
    def generate() -> str:
        context = get_current_context()
        path = storage.join(storage.default_work_dir(DAG_ID, context["run_id"], "input"), "readings.csv")
        rows = write_rows(path, int(context["params"]["rows"]))
        print(f"wrote {rows} rows to {path}")
        return path

    path = generate()
    guarded = chunked_fan_out(
        group_id="guarded",
        path=path,
        memory_budget="1GiB",
        memory_limit=MEMORY_LIMIT,
        process=expensive_features,
        combine=add_counts,
        min_chunks="{{ params.chunks }}",
        process_retries=2,
        process_retry_delay=datetime.timedelta(seconds=2),
    )

    @task
    def check(totals: dict) -> dict:
        rows = int(get_current_context()["params"]["rows"])
        expected = sum((i * 7919) % 100_000 for i in range(rows))
        if totals["rows"] != rows or totals["value_sum"] != expected:
            raise ValueError(f"rows were lost or doubled: {totals} vs rows={rows} value_sum={expected}")
        print(f"all {rows} rows counted exactly once: {totals}")
        return totals

    check(guarded.output)


asyncq_memory_guard()
