"""One measured pass, in a fresh process: ``python bench/chunked/task.py MODE PATH [BUDGET]``.

Prints one JSON line: wall and CPU seconds, peak RSS (``ru_maxrss`` of this process, so the interpreter, Airflow's
SDK, pandas and pyarrow are included, as in a real task) and what was computed.

MODE
  stream  ``ChunkedFileOperator`` over the whole file: aggregate by region within BUDGET
  chunk   ``ChunkSplitOperator`` plans the file, then one ``ChunkProcessOperator`` runs the middle chunk
  pandas  one plain ``pandas.read_csv`` of the whole file, then the same aggregation
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import airflow.sdk  # noqa: E402,F401  (what every task process has loaded)
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import pyarrow  # noqa: E402,F401

from airflow_asyncq_provider.example_dags.asyncq_chunked_csv_etl import DTYPES, merge_sums, sum_by_region  # noqa: E402
from airflow_asyncq_provider.operators import (  # noqa: E402
    ChunkedFileOperator,
    ChunkProcessOperator,
    ChunkSplitOperator,
)

MIB = 1024**2


class StubTI:
    try_number = 1

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def context() -> dict[str, Any]:
    return {"ti": StubTI(), "dag": SimpleNamespace(dag_id="bench"), "run_id": "bench"}


def _cpu() -> float:
    """CPU seconds of this process: less disturbed than wall time when other work shares the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    budget = sys.argv[3] if len(sys.argv) > 3 else "512MiB"
    baseline = psutil.Process().memory_info().rss
    out = tempfile.mkdtemp(prefix="asyncq-bench-")
    started = time.perf_counter()
    cpu_started = _cpu()
    extra: dict[str, Any] = {}
    if mode == "stream":
        op = ChunkedFileOperator(
            task_id="stream",
            path=path,
            memory_budget=budget,
            process=sum_by_region,
            combine=merge_sums,
            read_options={"dtype": DTYPES},
            output_dir=out,
            progress_interval=3600,
        )
        ctx = context()
        result = op.execute(ctx)
        frame = pd.read_parquet(result["parquet"])
        extra = {"chunks": ctx["ti"].pushed["stats"]["chunks"], "rows": ctx["ti"].pushed["stats"]["rows"]}
    elif mode == "chunk":
        plan_started = time.perf_counter()
        descriptors = ChunkSplitOperator(
            task_id="split", path=path, memory_budget=budget, read_options={"dtype": DTYPES}
        ).execute(context())
        plan_seconds = time.perf_counter() - plan_started
        middle = descriptors[len(descriptors) // 2]
        chunk_started = time.perf_counter()
        record = ChunkProcessOperator(
            task_id="process",
            chunk=middle,
            process=sum_by_region,
            read_options={"dtype": DTYPES},
            output_dir=out,
        ).execute(context())
        frame = pd.read_parquet(record["outputs"][0]["parquet"])
        extra = {
            "chunks": len(descriptors),
            "chunk_bytes": middle["end"] - middle["start"],
            "rows": record["rows"],
            "plan_s": round(plan_seconds, 2),
            "chunk_s": round(time.perf_counter() - chunk_started, 2),
        }
    elif mode == "pandas":
        whole = pd.read_csv(path, dtype=DTYPES)
        frame = sum_by_region(whole, None)
        extra = {"rows": len(whole)}
        del whole
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - started
    cpu_seconds = _cpu() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "mode": mode,
                "path": path,
                "budget": budget,
                "seconds": round(seconds, 3),
                      "cpu_seconds": round(cpu_seconds, 3),
                "peak_rss_mib": round(peak / MIB, 1),
                "baseline_rss_mib": round(baseline / MIB, 1),
                "orders": int(frame["orders"].sum()),
                **extra,
            }
        )
    )


if __name__ == "__main__":
    main()
