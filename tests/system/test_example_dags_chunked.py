"""The chunked example DAGs on real Airflow: the fan-out ETL, the memory guard's adaptive retry, and the
scheduled report pipeline with its failure notification."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from devtools.stack import Stack

pytestmark = [pytest.mark.system, pytest.mark.slow]


def by_task(tis: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for ti in tis:
        grouped[ti["task_id"]].append(ti)
    return grouped


def overlapping(tis: list[dict]) -> bool:
    spans = sorted((ti["start_date"], ti["end_date"]) for ti in tis)
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


def settle(stack: Stack, dag_id: str, timeout: float = 180) -> None:
    """Wait for every run of ``dag_id`` to end (a scheduled report run starts with the stack and holds
    w-default's slots for a few seconds, which would serialize the chunk tasks of the next test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = stack.api("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]
        if all(run["state"] in ("success", "failed") for run in runs):
            return
        time.sleep(1)
    raise TimeoutError(f"runs of {dag_id} still active after {timeout} s")


def test_chunked_csv_etl_fans_out_and_matches_the_truth(stack: Stack) -> None:
    dag_id = "asyncq_chunked_csv_etl"
    stack.wait_dag(dag_id)
    stack.wait_dag("asyncq_report_pipeline")
    settle(stack, "asyncq_report_pipeline")
    run_id = stack.trigger(dag_id, conf={"size_mb": 8, "parallelism": 4, "bad_rows": 4})
    assert stack.wait_run(dag_id, run_id, timeout=240) == "success"
    tasks = by_task(stack.task_instances(dag_id, run_id))
    process = tasks["aggregate.process"]
    assert len(process) >= 4
    assert {ti["state"] for ti in process} == {"success"}
    assert all(ti["try_number"] == 1 for ti in process)
    assert overlapping(process), "the chunk tasks should run in parallel on w-default (4 slots)"
    assert "'memory_request': '512MiB'" in process[0]["executor_config"]
    assert "'memory_limit': '768MiB'" in process[0]["executor_config"]

    descriptors = stack.xcom(dag_id, run_id, "aggregate.split")
    assert len(descriptors) == len(process)
    assert all(len(json.dumps(d)) < 1024 for d in descriptors)
    chunk_result = stack.xcom(dag_id, run_id, "aggregate.process", map_index=0)
    assert len(json.dumps(chunk_result)) < 1024 and chunk_result["outputs"][0]["parquet"].endswith(".parquet")

    checked = stack.xcom(dag_id, run_id, "check")
    assert checked["regions"] == 8 and checked["bad_rows"] == 4 and checked["orders"] > 200_000
    check_log = stack.task_log(dag_id, run_id, "check", 1)
    assert "fan-out:" in check_log and "totals match the truth exactly" in check_log
    streaming_log = stack.task_log(dag_id, run_id, "aggregate_streaming", 1)
    assert "Progress: 100.0%" in streaming_log and "rows/s" in streaming_log and "ETA" in streaming_log
    assert "Skipped 4 malformed row(s)" in streaming_log
    split_log = stack.task_log(dag_id, run_id, "aggregate.split", 1)
    assert "Plan:" in split_log and "memory_budget 512 MiB" in split_log


def test_memory_guard_kills_the_heavy_chunk_and_the_split_retry_succeeds(stack: Stack) -> None:
    dag_id = "asyncq_memory_guard"
    stack.wait_dag(dag_id)
    run_id = stack.trigger(dag_id, conf={"rows": 60_000, "chunks": 3, "heavy_chunk": 1})
    assert stack.wait_run(dag_id, run_id, timeout=240) == "success"
    process = {ti["map_index"]: ti for ti in by_task(stack.task_instances(dag_id, run_id))["guarded.process"]}
    assert sorted(process) == [0, 1, 2]
    assert {ti["state"] for ti in process.values()} == {"success"}
    assert process[0]["try_number"] == 1 and process[2]["try_number"] == 1
    assert process[1]["try_number"] == 2, "the heavy chunk should have been stopped once, then retried"
    first = stack.task_log(dag_id, run_id, "guarded.process", 1, map_index=1)
    assert "memory limit exceeded: used" in first and "> limit 1536 MiB" in first
    second = stack.task_log(dag_id, run_id, "guarded.process", 2, map_index=1)
    assert "ended without reporting back" in second
    assert "Adaptive retry" in second and "as 2 record-aligned pieces" in second
    assert stack.xcom(dag_id, run_id, "guarded.process", map_index=1)["pieces"] == 2
    assert stack.xcom(dag_id, run_id, "check")["rows"] == 60_000


def test_report_pipeline_writes_the_report(stack: Stack, tmp_path: Path) -> None:
    dag_id = "asyncq_report_pipeline"
    stack.wait_dag(dag_id)
    dag = stack.api("GET", f"/api/v2/dags/{dag_id}")
    assert "15 6 * * *" in json.dumps(dag)
    reports = tmp_path / "reports"
    run_id = stack.trigger(dag_id, conf={"orders": 20_000, "pages": 4, "reports_dir": str(reports)})
    assert stack.wait_run(dag_id, run_id, timeout=240) == "success"
    tasks = by_task(stack.task_instances(dag_id, run_id))
    assert len(tasks["pages.process"]) >= 4
    assert {ti["state"] for tis in tasks.values() for ti in tis} == {"success"}

    source = stack.xcom(dag_id, run_id, "seed_source")
    expected: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    with open(source) as fh:  # independent of pandas and of the operators
        for line in fh:
            order = json.loads(line)
            totals = expected[order["product"]]
            totals[0] += 1
            totals[1] += order["qty"]
            totals[2] += order["qty"] * order["price_cents"]
    report = stack.xcom(dag_id, run_id, "write_report")
    assert Path(report["path"]).parent == reports
    with open(report["path"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = {r["product"]: [int(r["orders"]), int(r["quantity"]), round(float(r["revenue"]) * 100)]
           for r in rows}
    assert got == dict(expected)
    assert report["orders"] == 20_000
    # page summaries are small values in XCom, not files
    page = stack.xcom(dag_id, run_id, "pages.process", map_index=0)
    assert "value" in page["outputs"][0] and len(json.dumps(page)) < 4096


def test_report_pipeline_failure_is_notified(stack: Stack) -> None:
    dag_id = "asyncq_report_pipeline"
    stack.wait_dag(dag_id)
    run_id = stack.trigger(dag_id, conf={"source": "/nonexistent/orders.jsonl"})
    assert stack.wait_run(dag_id, run_id, timeout=180) == "failed"
    tis = {ti["task_id"]: ti for ti in stack.task_instances(dag_id, run_id)}
    assert tis["pages.split"]["state"] == "failed"
    assert tis["pages.split"]["try_number"] == 1, "a missing input fails at once, without retries"
    assert tis["write_report"]["state"] == "upstream_failed"
    log = stack.task_log(dag_id, run_id, "pages.split", 1)
    assert "'/nonexistent/orders.jsonl' does not exist" in log
    assert "REPORT FAILURE NOTIFICATION" in log and "No e-mail was sent" in log
    assert Counter(ti["state"] for ti in tis.values())["failed"] == 1
