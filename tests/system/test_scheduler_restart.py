"""kill -9 the scheduler while tasks run; a new one adopts them and nothing runs twice."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from pathlib import Path

import pytest

from devtools.stack import Stack
from tests.system.conftest import read_effects, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_scheduler_sigkill_mid_run_then_restart(stack: Stack, side_effects: Path) -> None:
    dag_id = "asyncq_test_sleepers"
    stack.wait_dag(dag_id)
    # Sleepers that still run when the new scheduler, which may take half a minute to start on a loaded
    # machine, looks for orphans: otherwise it finds nothing to adopt. They hold until it has adopted
    # them (the file ``release`` exists), at most 120 s.
    release = stack.home / f"release-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger(dag_id, conf={"n": 6, "s": 120, "until": str(release)})
    wait_for(lambda: len(read_effects(side_effects, dag_id, run_id)) >= 3, 120,
             "three sleepers to start", stack)
    scheduler_log = stack.logs / "scheduler.log"
    offset = scheduler_log.stat().st_size  # the new scheduler appends to the same log
    stack.kill("scheduler")
    stack.spawn("scheduler", "scheduler")
    try:
        with contextlib.suppress(TimeoutError):  # the assertions below tell what went wrong
            wait_for(lambda: b"Adopted" in scheduler_log.read_bytes()[offset:], 120,
                     "the new scheduler to adopt the sleepers", stack)
    finally:
        release.touch()
    assert stack.wait_run(dag_id, run_id, timeout=300) == "success"
    tis = stack.task_instances(dag_id, run_id)
    assert Counter(ti["state"] for ti in tis) == {"success": 8}
    runs = Counter((r[2], r[3]) for r in read_effects(side_effects, dag_id, run_id))
    assert runs == {**{("sleeper", str(i)): 1 for i in range(6)}, ("gather", "-1"): 1}, runs
    assert stack.xcom(dag_id, run_id, "gather") == sum(range(6))
    assert "Adopted" in scheduler_log.read_text()


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
