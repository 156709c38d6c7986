"""Two schedulers with AsyncQExecutor share one fleet; one is SIGKILLed mid-run and the other adopts.

Both schedulers publish to the same queues and read the same event stream. Each executor applies only
the events of the workloads it published or adopted (tests/unit/test_executor_sharing.py); Airflow's
row locks decide which scheduler queues which task instance. When one scheduler dies, the survivor
marks its job failed after ``[scheduler] scheduler_health_check_threshold`` and adopts its QUEUED and
RUNNING task instances from their records in Redis.

The counting: every task instance succeeded, none was left queued or running, no try ran twice, and
every task instance the dead scheduler had in flight ended queued by the survivor's job.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from devtools.stack import Stack
from tests.system.conftest import read_effects, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

DAG_ID = "asyncq_test_sleepers"
TASKS = 32
#: Seconds each sleeper runs. The survivor notices the dead job only after the health check threshold
#: (10 s) and at its next orphan check (every 10 s), so up to ~20 s after the kill; a try running at
#: the kill must still run then, or it ends unadopted. 5 s was enough while each task cost two forks;
#: with supervisor hosts the backlog drained before the survivor looked (CI, 2026-12-02).
SLEEP_S = 30
ADOPTED = re.compile(r"^(?P<at>\S+Z) \[info\s*\] Adopted \d+ task instance\(s\):\n(?P<tis>(?:\t.*\n)+)",
                     re.MULTILINE)
ADOPTED_TI = re.compile(rf"\t<TaskInstance: {re.escape(DAG_ID)}\.(\w+) \S+(?: map_index=(\d+))? \[")


def sql(stack: Stack, query: str) -> list[list[str]]:
    """Rows of a query on the stack's own metadata database (psql, as tests/system/conftest.py does)."""
    db = stack.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].rsplit("/", 1)[1]
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1",
                          "-AtF", "\t", "-c", query], check=True, capture_output=True, text=True).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def live_scheduler_jobs(stack: Stack) -> set[int]:
    rows = sql(stack, "SELECT id FROM job WHERE job_type = 'SchedulerJob' AND state = 'running' "
                      "AND latest_heartbeat > now() - interval '8 seconds'")
    return {int(r[0]) for r in rows}


def in_flight(stack: Stack, run_id: str) -> dict[tuple[str, int], int]:
    """(task_id, map_index) -> queued_by_job_id of every task instance queued or running now."""
    rows = sql(stack, f"SELECT task_id, map_index, queued_by_job_id FROM task_instance WHERE dag_id = "
                      f"'{DAG_ID}' AND run_id = '{run_id}' AND state IN ('queued', 'running')")
    return {(r[0], int(r[1])): int(r[2]) for r in rows if r[2]}


def adoptions(log: str) -> list[tuple[float, set[tuple[str, int]]]]:
    """(time, task instances) of each "Adopted N task instance(s)" the executor logged."""
    rounds = []
    for match in ADOPTED.finditer(log):
        at = datetime.datetime.fromisoformat(match["at"]).timestamp()
        tis = {(m[1], int(m[2]) if m[2] else -1) for m in ADOPTED_TI.finditer(match["tis"])}
        rounds.append((at, tis))
    return rounds


def test_two_schedulers_one_killed_mid_run_the_survivor_adopts(stack: Stack, side_effects: Path) -> None:
    stack.wait_dag(DAG_ID)
    (job_a,) = wait_for(lambda: live_scheduler_jobs(stack), 60, "the session scheduler's job", stack)
    stack.spawn("scheduler-b", "scheduler")
    stack.start_worker("w-ha", queues="default", concurrency=4)  # 8 default slots with w-default
    names = {job_a: "scheduler"}
    try:
        jobs = wait_for(lambda: len(live := live_scheduler_jobs(stack)) == 2 and live, 120,
                        "two live scheduler jobs", stack)
        (job_b,) = jobs - {job_a}
        names[job_b] = "scheduler-b"
        run_id = stack.trigger(DAG_ID, conf={"n": TASKS, "s": SLEEP_S})

        def both_busy() -> dict[tuple[str, int], int] | None:
            started = [r for r in read_effects(side_effects, DAG_ID, run_id) if r[2] == "sleeper"]
            flight = in_flight(stack, run_id)
            return flight if len(started) >= 6 and flight else None

        flight = wait_for(both_busy, 240, "sleepers running under the two schedulers", stack, every=0.3)
        owners = Counter(flight.values())
        dead_job, _count = owners.most_common(1)[0]
        alive_job = (set(names) - {dead_job}).pop()
        victim, survivor = names[dead_job], names[alive_job]
        survivor_log = stack.logs / f"{survivor}.log"
        log_offset = survivor_log.stat().st_size
        killed_at = time.time()
        stack.kill(victim)  # SIGKILL: no chance to hand anything over

        assert stack.wait_run(DAG_ID, run_id, timeout=420) == "success"
        tis = stack.task_instances(DAG_ID, run_id)
        assert Counter(ti["state"] for ti in tis) == {"success": TASKS + 2}  # items, 32 sleepers, gather
        # No try ran twice; a workload the dead scheduler had queued but not yet published is reset
        # and runs as its next try, once.
        tries = Counter((r[2], r[3], r[4]) for r in read_effects(side_effects, DAG_ID, run_id))
        assert max(tries.values()) == 1, [t for t, n in tries.items() if n > 1]
        assert {(task, int(index)) for task, index, _try in tries} == \
            {("sleeper", i) for i in range(TASKS)} | {("gather", -1)}
        assert stack.xcom(DAG_ID, run_id, "gather") == sum(range(TASKS))

        # The survivor took over: the dead job is marked failed and the survivor's executor adopted the
        # dead one's task instances. Those it adopted ended queued by the survivor's job. Those it did
        # not had finished before it looked (a task reports its state to the Execution API, not to a
        # scheduler) and keep the dead job's id.
        assert sql(stack, f"SELECT state FROM job WHERE id = {dead_job}") == [["failed"]]
        # On a quiet machine the run can end before the survivor's orphan check has logged (or flushed)
        # its adoption: wait for the line, bounded, instead of reading the log once.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: adoptions(survivor_log.read_text(errors="replace")[log_offset:]), 60,
                     f"{survivor} to log its adoption", stack)
        rounds = adoptions(survivor_log.read_text(errors="replace")[log_offset:])
        assert rounds, f"{survivor} adopted nothing after {victim} died"
        adopted = set().union(*(tis for _at, tis in rounds))
        first_adoption = min(at for at, _tis in rounds)
        finals = {(r[0], int(r[1])): (int(r[2]) if r[2] else None, float(r[3]) if r[3] else 0.0)
                  for r in sql(stack, f"SELECT task_id, map_index, queued_by_job_id, "
                                      f"extract(epoch from end_date) FROM task_instance WHERE dag_id = "
                                      f"'{DAG_ID}' AND run_id = '{run_id}'")}
        orphans = {ti for ti, job in flight.items() if job == dead_job}
        assert adopted & orphans, (adopted, orphans)
        assert {ti: finals[ti][0] for ti in adopted} == dict.fromkeys(adopted, alive_job)
        for ti in orphans - adopted:
            job, ended = finals[ti]
            assert job == alive_job or (job == dead_job and killed_at - 1 < ended < first_adoption), \
                (ti, finals[ti], killed_at, first_adoption)
        # While both lived, each executor applied only its own workloads' events: a task reported
        # failed by the wrong executor would have shown above as a second try or a failed state.
    finally:
        # Leave the session as it was: one scheduler named "scheduler", the usual workers.
        if "w-ha" in stack.procs:
            stack.kill("w-ha", signal.SIGTERM)
        if "scheduler-b" in stack.procs:
            stack.kill("scheduler-b", signal.SIGTERM)
        if "scheduler" not in stack.procs:
            stack.spawn("scheduler", "scheduler")
