"""The slice, end to end on real Airflow, Redis and PostgreSQL (issue: the end-to-end slice)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from devtools.stack import Stack
from tests.system.conftest import read_effects, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_quickstart_fan_out_fan_in(stack: Stack) -> None:
    stack.wait_dag("asyncq_quickstart")
    run_id = stack.trigger("asyncq_quickstart", conf={"n": 24})
    assert stack.wait_run("asyncq_quickstart", run_id, timeout=300) == "success"
    tis = stack.task_instances("asyncq_quickstart", run_id)
    assert Counter(ti["state"] for ti in tis) == {"success": 26}
    assert sum(1 for ti in tis if ti["task_id"] == "square") == 24
    assert all(ti["try_number"] == 1 for ti in tis)
    assert stack.xcom("asyncq_quickstart", run_id, "total") == sum(i * i for i in range(24))
    assert stack.xcom("asyncq_quickstart", run_id, "square", map_index=7) == 49
    log = stack.task_log("asyncq_quickstart", run_id, "total", 1)
    assert "sum of 24 squares = 4324" in log


def test_failing_task_retries_then_fails_with_reason(stack: Stack, side_effects: Path) -> None:
    stack.wait_dag("asyncq_test_retry")
    run_id = stack.trigger("asyncq_test_retry")
    assert stack.wait_run("asyncq_test_retry", run_id, timeout=240) == "failed"
    (ti,) = stack.task_instances("asyncq_test_retry", run_id)
    assert ti["state"] == "failed"
    assert ti["try_number"] == 2
    assert len(read_effects(side_effects, "asyncq_test_retry", run_id)) == 2
    for try_number in (1, 2):
        log = stack.task_log("asyncq_test_retry", run_id, "always_fails", try_number)
        assert "deliberate failure from asyncq_test_retry" in log


def test_queue_routing(stack: Stack) -> None:
    stack.wait_dag("asyncq_test_queues")
    run_id = stack.trigger("asyncq_test_queues")
    assert stack.wait_run("asyncq_test_queues", run_id, timeout=240) == "success"
    assert stack.xcom("asyncq_test_queues", run_id, "on_high_mem") == "w-highmem"
    assert stack.xcom("asyncq_test_queues", run_id, "on_default") == "w-default"


def test_higher_priority_starts_first_from_a_backlog(stack: Stack, side_effects: Path) -> None:
    """w-prio has one slot. The blocker holds it while three low-priority tasks are published, then
    one high-priority task is published last; when the slot frees, the high one must start first."""
    stack.wait_dag("asyncq_test_blocker")
    stack.wait_dag("asyncq_test_priority")
    blocker_run = stack.trigger("asyncq_test_blocker")
    wait_for(lambda: read_effects(side_effects, "asyncq_test_blocker", blocker_run), 120,
             "the blocker to start", stack)
    run_id = stack.trigger("asyncq_test_priority")
    assert stack.wait_run("asyncq_test_priority", run_id, timeout=300) == "success"
    assert stack.wait_run("asyncq_test_blocker", blocker_run, timeout=60) == "success"
    tis = {(ti["task_id"], ti["map_index"]): ti for ti in stack.task_instances("asyncq_test_priority", run_id)}
    blocker_end = stack.task_instances("asyncq_test_blocker", blocker_run)[0]["end_date"]
    # the backlog really existed: every prio task was queued before the blocker finished
    for key in [("high", -1), ("low", 0), ("low", 1), ("low", 2)]:
        assert tis[key]["queued_when"] < blocker_end, key
    # and the high one was published last, so FIFO order alone would have started it last
    assert max(tis[("low", i)]["queued_when"] for i in range(3)) < tis[("high", -1)]["queued_when"]
    starts = {(r[2], r[3]): float(r[-1]) for r in read_effects(side_effects, "asyncq_test_priority", run_id)}
    assert starts[("high", "-1")] < min(starts[("low", str(i))] for i in range(3)), starts
