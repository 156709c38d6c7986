"""asyncq_chunked_csv_etl: aggregate a sales CSV bigger than one task's memory, in parallel on the fleet.

What it shows, in the order of the graph:

1. ``generate`` writes a synthetic sales CSV of ``params.size_mb`` MiB (default 32; it scales to several
   GB) with order id, region, product, quantity, amount and an optional note. Some notes are quoted and
   contain commas, doubled quotes and newlines, so a naive "split at the next newline" would cut records
   in half. ``params.bad_rows`` malformed rows are mixed in (a row with too many fields, a quantity that
   is not a number). While writing, it keeps the exact per-region totals: the independent truth.
2. ``aggregate`` is the fan-out task group from ``chunked_fan_out``: ``split`` samples the file, sizes
   chunks so one chunk fits ``memory_budget`` (512 MiB) and cuts record-aligned byte ranges (at least
   ``params.parallelism`` of them); ``process`` is mapped over those descriptors, each chunk task asking
   the fleet for 512 MiB through ``executor_config`` and writing its per-region sums as a Parquet part;
   ``combine`` folds the parts. Malformed rows are counted and skipped (``on_bad_rows="skip"``).
3. ``aggregate_streaming`` does the same in one task with ``ChunkedFileOperator``: it streams the file
   chunk by chunk within the same budget and logs progress (rows/s, percent, ETA).
4. ``check`` compares both results with the truth, exactly (amounts are summed as integer cents), and
   checks the malformed-row count. ``cleanup`` removes the run's files unless ``params.keep_files``.

The CSV, the Parquet parts and the attempt markers go to ``[asyncq] shared_storage`` (a path every
worker host mounts, or an object storage URL such as ``s3://aws_default@bucket/prefix``), because the
chunk tasks run on whichever workers are free. Unset, they go to the temp dir: a one-host fleet only.

Try it with a bigger file: trigger with ``{"size_mb": 2048}``; the chunk tasks' memory stays the same.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from airflow_asyncq_provider.operators import ChunkedFileOperator, chunked_fan_out, storage

DAG_ID = "asyncq_chunked_csv_etl"
MEMORY_BUDGET = "512MiB"
REGIONS = ("north", "south", "east", "west", "central", "coastal", "mountain", "island")
COLUMNS = ("order_id", "region", "product", "quantity", "amount", "note")
DTYPES = {"order_id": "int64", "region": "str", "product": "str", "quantity": "int64", "amount": "float64",
          "note": "str"}
NOTES = ('said "hi", then\nleft', "gift wrap,\nno invoice", 'size 12" (boxed)')
BAD_ROWS = (b'999999999,"north","P001",1,1.00,"",too,many,fields\n', b'999999998,"south","P002",lots,2.00,\n')
BLOCK_ROWS = 250_000


def generate_sales_csv(path: str, size_bytes: int, *, seed: int = 7, bad_rows: int = 0) -> dict:
    """Write at least ``size_bytes`` of sales CSV to ``path`` (local or object storage); returns the
    exact truth per region.

    Blocks of rows come from a seeded generator and are written with pyarrow's CSV writer (strings
    quoted, quotes doubled). Every 997th row carries a note with a comma, a quote or a newline.
    ``bad_rows`` malformed rows are spread between blocks and left out of the truth.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    regions = pa.array(REGIONS)
    products = pa.array([f"P{i:03d}" for i in range(50)])
    orders = np.zeros(len(REGIONS), dtype=np.int64)
    quantity = np.zeros(len(REGIONS), dtype=np.int64)
    cents = np.zeros(len(REGIONS), dtype=np.int64)
    rows = bad = 0
    if os.path.dirname(path):
        storage.makedirs(os.path.dirname(path))
    with storage.atomic_output(path) as out:
        out.write(",".join(COLUMNS).encode() + b"\n")
        while out.tell() < size_bytes or bad < bad_rows:
            n = max(1, min(BLOCK_ROWS, (size_bytes - out.tell()) // 30 + 1))
            region = rng.integers(0, len(REGIONS), n)
            qty = rng.integers(1, 21, n)
            amount = rng.integers(100, 100_000, n)
            note = np.full(n, None, dtype=object)
            positions = np.arange(rows, rows + n)
            special = positions % 997 == 0
            note[special] = [NOTES[i % len(NOTES)] for i in positions[special]]
            table = pa.table({
                "order_id": positions, "region": regions.take(region),
                "product": products.take(rng.integers(0, 50, n)), "quantity": qty,
                "amount": amount / 100.0, "note": pa.array(note, pa.string()),
            })
            pacsv.write_csv(table, out, pacsv.WriteOptions(include_header=False))
            orders += np.bincount(region, minlength=len(REGIONS))
            quantity += np.bincount(region, weights=qty, minlength=len(REGIONS)).astype(np.int64)
            cents += np.bincount(region, weights=amount, minlength=len(REGIONS)).astype(np.int64)
            rows += n
            if bad < bad_rows:
                out.write(BAD_ROWS[bad % len(BAD_ROWS)])
                bad += 1
        size = out.tell()
    truth = {name: {"orders": int(orders[i]), "quantity": int(quantity[i]), "cents": int(cents[i])}
             for i, name in enumerate(REGIONS)}
    return {"path": path, "bytes": size, "rows": rows, "bad_rows": bad, "truth": truth}


def sum_by_region(frame, chunk):
    """process: per-region orders, quantity and amount in integer cents, for one chunk."""
    import pandas as pd

    cents = (frame["amount"] * 100).round().astype("int64")
    sums = pd.DataFrame({"region": frame["region"], "orders": 1, "quantity": frame["quantity"],
                         "cents": cents})
    return sums.groupby("region", as_index=False).sum()


def merge_sums(accumulated, part):
    """combine: associative, so chunks can be folded in any grouping."""
    import pandas as pd

    return pd.concat([accumulated, part]).groupby("region", as_index=False).sum()


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    params={
        "size_mb": Param(32, type="integer", minimum=1, description="size of the generated CSV in MiB"),
        "parallelism": Param(4, type="integer", minimum=1, description="cut into at least this many chunks"),
        "bad_rows": Param(4, type="integer", minimum=0, description="malformed rows to mix in"),
        "data_dir": Param("", type="string",
                          description="where to write the CSV (default: under [asyncq] shared_storage)"),
        "keep_files": Param(False, type="boolean"),
    },
    tags=["asyncq", "example", "chunked"],
    doc_md=__doc__,
)
def asyncq_chunked_csv_etl():
    @task(multiple_outputs=True)
    def generate() -> dict:
        context = get_current_context()
        params = context["params"]
        base = params["data_dir"] or storage.default_work_dir(DAG_ID, context["run_id"], "input")
        result = generate_sales_csv(storage.join(base, "sales.csv"), int(params["size_mb"]) * 1024**2,
                                    bad_rows=int(params["bad_rows"]))
        print(f"wrote {result['rows']:,} rows and {result['bad_rows']} malformed rows, "
              f"{result['bytes']:,} bytes, to {result['path']}")
        return result

    data = generate()
    fan = chunked_fan_out(
        group_id="aggregate",
        path=data["path"],
        memory_budget=MEMORY_BUDGET,
        process=sum_by_region,
        combine=merge_sums,
        read_options={"dtype": DTYPES},
        on_bad_rows="skip",
        min_chunks="{{ params.parallelism }}",
    )
    streaming = ChunkedFileOperator(
        task_id="aggregate_streaming",
        path=data["path"],
        memory_budget=MEMORY_BUDGET,
        process=sum_by_region,
        combine=merge_sums,
        read_options={"dtype": DTYPES},
        on_bad_rows="skip",
        progress_interval=5.0,
        executor_config={"asyncq": {"memory_request": MEMORY_BUDGET, "memory_limit": "768MiB"}},
    )

    @task
    def check(truth: dict, expected_bad: int, fanned: dict, streamed: dict) -> dict:
        from airflow_asyncq_provider.operators.results import read_parquet

        ti = get_current_context()["ti"]
        for name, result, stats_task in (("fan-out", fanned, "aggregate.combine"),
                                         ("streaming", streamed, "aggregate_streaming")):
            frame = read_parquet(result["parquet"]).set_index("region").sort_index()
            got = {region: {k: int(v) for k, v in row.items()} for region, row in frame.iterrows()}
            if got != truth:
                raise ValueError(f"{name} totals differ from the truth:\n got   {got}\n truth {truth}")
            stats = ti.xcom_pull(task_ids=stats_task, key="stats")
            if stats["bad_rows"] != expected_bad:
                raise ValueError(f"{name} counted {stats['bad_rows']} malformed rows, "
                                 f"expected {expected_bad}")
            print(f"{name}: {stats['rows']:,} rows in {stats['chunks']} chunk(s), {stats['bad_rows']} "
                  f"malformed rows skipped, totals match the truth exactly")
        orders = sum(v["orders"] for v in truth.values())
        return {"orders": orders, "regions": len(truth), "bad_rows": expected_bad}

    @task
    def cleanup(checked: dict, path: str) -> None:
        context = get_current_context()
        if context["params"]["keep_files"]:
            print("keep_files is set; leaving the run's files in place")
            return
        run_dir = storage.run_work_dir(DAG_ID, context["run_id"])
        storage.remove_tree(run_dir)
        storage.remove_tree(path)  # a data_dir of its own lies outside the run's work dir
        print(f"removed {path} and {run_dir}")

    checked = check(data["truth"], data["bad_rows"], fan.output, streaming.output)
    cleanup(checked, data["path"])


asyncq_chunked_csv_etl()
