"""Memory-aware fleet on real Airflow: limits, admission by budget, impossible requests, bad config."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from devtools.stack import Stack
from tests.system.conftest import read_effects, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_task_over_its_limit_is_stopped_with_the_reason_and_the_worker_goes_on(stack: Stack) -> None:
    dag_id = "asyncq_test_memory"
    stack.wait_dag(dag_id)
    run_id = stack.trigger(dag_id)
    stack.wait_run(dag_id, run_id, timeout=240)  # the leaf (after) decides the run state
    tis = {ti["task_id"]: ti for ti in stack.task_instances(dag_id, run_id)}
    assert tis["hog"]["state"] == "failed"
    assert tis["after"]["state"] == "success"
    assert stack.xcom(dag_id, run_id, "after") == "w-highmem"
    log = stack.task_log(dag_id, run_id, "hog", 1)
    assert "memory limit exceeded: used" in log and "> limit 200 MiB" in log, log[-3000:]
    scheduler_log = (stack.logs / "scheduler.log").read_text()
    assert "memory limit exceeded: used" in scheduler_log


def test_requests_beyond_the_budget_never_overlap_on_one_worker(stack: Stack, side_effects: Path) -> None:
    dag_id = "asyncq_test_budget"
    stack.wait_dag(dag_id)
    run_id = stack.trigger(dag_id)
    assert stack.wait_run(dag_id, run_id, timeout=240) == "success"
    rows = read_effects(side_effects, dag_id, run_id)
    spans: dict[str, dict[str, float]] = {}
    for row in rows:
        spans.setdefault(row[3], {})[row[0]] = float(row[-1])
    (a, b) = spans.values()
    assert a["end"] <= b["start"] or b["end"] <= a["start"], spans  # 2 x 600 MiB > 1 GiB budget


def test_request_larger_than_every_budget_fails_with_a_clear_reason(stack: Stack) -> None:
    dag_id = "asyncq_test_too_big"
    stack.wait_dag(dag_id)
    run_id = stack.trigger(dag_id)
    assert stack.wait_run(dag_id, run_id, timeout=180) == "failed"
    scheduler_log = (stack.logs / "scheduler.log").read_text()
    assert "exceeds every worker's memory budget on queue 'high_mem'" in scheduler_log


def test_bad_executor_config_is_rejected_at_parse_time(stack: Stack) -> None:
    path = Path(stack.env["AIRFLOW__CORE__DAGS_FOLDER"]) / "asyncq_test_bad_config.py"
    path.write_text(textwrap.dedent('''
        import pendulum
        from airflow.sdk import dag, task

        @dag(dag_id="asyncq_test_bad_config", schedule=None, catchup=False,
             start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
        def asyncq_test_bad_config():
            @task(executor_config={"asyncq": {"memory_request": "12 bananas"}})
            def greedy():
                pass

            greedy()

        asyncq_test_bad_config()
    '''))
    try:
        def import_error() -> str:
            errors = stack.api("GET", "/api/v2/importErrors")["import_errors"]
            return next((e["stack_trace"] for e in errors if "asyncq_test_bad_config" in e["filename"]), "")

        trace = wait_for(import_error, 120, "the import error for the bad executor_config", stack, every=2)
        assert "asyncq_test_bad_config.greedy" in trace
        assert "'12 bananas'" in trace and "memory_request" in trace
    finally:
        path.unlink()
