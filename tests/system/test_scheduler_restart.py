"""kill -9 the scheduler while tasks run; a new one adopts them and nothing runs twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from devtools.stack import Stack
from tests.system.conftest import read_effects, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_scheduler_sigkill_mid_run_then_restart(stack: Stack, side_effects: Path) -> None:
    dag_id = "asyncq_test_sleepers"
    stack.wait_dag(dag_id)
    run_id = stack.trigger(dag_id, conf={"n": 6, "s": 8})
    wait_for(lambda: len(read_effects(side_effects, dag_id, run_id)) >= 3, 120,
             "three sleepers to start", stack)
    stack.kill("scheduler")
    stack.spawn("scheduler", "scheduler")
    assert stack.wait_run(dag_id, run_id, timeout=300) == "success"
    tis = stack.task_instances(dag_id, run_id)
    assert Counter(ti["state"] for ti in tis) == {"success": 8}
    runs = Counter((r[2], r[3]) for r in read_effects(side_effects, dag_id, run_id))
    assert runs == {**{("sleeper", str(i)): 1 for i in range(6)}, ("gather", "-1"): 1}, runs
    assert stack.xcom(dag_id, run_id, "gather") == sum(range(6))
    scheduler_log = (stack.logs / "scheduler.log").read_text()
    assert "Adopted" in scheduler_log


def test_queue_without_worker_waits_with_a_clear_log_line(stack: Stack, side_effects: Path) -> None:
    dag_id = "asyncq_test_nobody"
    stack.wait_dag(dag_id)
    run_id = stack.trigger(dag_id)
    wait_for(lambda: "which no live worker consumes" in (stack.logs / "scheduler.log").read_text(), 90,
             "the unconsumed-queue warning", stack)
    log = (stack.logs / "scheduler.log").read_text()
    assert "'nobody_listens'" in log and "airflow asyncq worker -q nobody_listens" in log
    (ti,) = stack.task_instances(dag_id, run_id)
    assert ti["state"] == "queued"
    assert read_effects(side_effects, dag_id, run_id) == []
    stack.api("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", {"state": "failed"})
