"""ExecuteCallback workloads (deadline callbacks) run on the fleet; running tasks' logs are served."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from devtools.stack import Stack
from tests.system.conftest import wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_deadline_callback_runs_on_a_worker(stack: Stack, side_effects: Path) -> None:
    stack.wait_dag("asyncq_test_deadline")
    release = stack.home / f"release-{uuid.uuid4().hex[:8]}"  # the slow task ends once it exists
    run_id = stack.trigger("asyncq_test_deadline", conf={"until": str(release)})

    def callback_ran() -> list[str]:
        text = side_effects.read_text() if side_effects.exists() else ""
        return [line for line in text.splitlines() if line.startswith("callback deadline deadline-test")]

    (line,) = wait_for(callback_ran, 120, "the deadline callback to run on a worker", stack)
    assert line.split()[7] == "w-default"  # callbacks go to [asyncq] default_queue
    release.touch()  # the deadline passed while the task ran and its callback ran: the task may end
    assert stack.wait_run("asyncq_test_deadline", run_id, timeout=120) == "success"


def test_running_task_log_is_visible_then_final_log(stack: Stack) -> None:
    dag_id = "asyncq_test_sleepers"
    stack.wait_dag(dag_id)
    release = stack.home / f"release-{uuid.uuid4().hex[:8]}"  # the sleeper ends once it exists
    run_id = stack.trigger(dag_id, conf={"n": 1, "s": 12, "until": str(release)})

    def running_sleeper():
        for ti in stack.task_instances(dag_id, run_id):
            if ti["task_id"] == "sleeper" and ti["state"] == "running":
                return ti
        return None

    ti = wait_for(running_sleeper, 120, "a running sleeper", stack)

    def live_log() -> str:
        text = stack.task_log(dag_id, run_id, "sleeper", ti["try_number"], ti["map_index"])
        return text if '"task_id": "sleeper"' in text else ""

    live = wait_for(live_log, 30, "the live log", stack)
    print(live[:600])
    assert '"task_id": "sleeper"' in live, live[:2000]
    assert "Pushing xcom" not in live  # it really was read while the task ran
    release.touch()
    assert stack.wait_run(dag_id, run_id, timeout=120) == "success"
    final = stack.task_log(dag_id, run_id, "sleeper", ti["try_number"], ti["map_index"])
    assert "Pushing xcom" in final, final[-2000:]
