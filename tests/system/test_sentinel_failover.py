"""A whole deployment on Redis Sentinel: a planned ``SENTINEL FAILOVER`` and then a SIGKILLed master,
both in the middle of one DAG run.

The stack is our own (its own PostgreSQL database, key prefix and Redis): api-server, scheduler,
dag-processor, triggerer and two ``airflow asyncq worker`` processes, whose ``[asyncq] broker_url`` is
the ``sentinel://`` URL of a private master, replica and three sentinels (real processes, started by
``tests/integration/test_sentinel.py``'s ``group`` fixture; down-after-milliseconds raised to 2 s here,
as the 1 s of that test took false failovers on a loaded 2-core machine: bench/chaos/sentinel.py).

The run: ``asyncq_test_sleepers`` with 30 sleepers on 2 x 2 slots. Once a few sleepers have started,
``SENTINEL FAILOVER``. Once the old master is demoted, both workers have started sleepers after that and
the executor has had its look for workloads lost with the old master's last writes, SIGKILL of the
(new) master. Once the sentinels promote the replica, the killed server is started again as the new
master's replica, as an operator would.

What is counted: every task instance succeeded, none left queued or running, no (task instance, try)
recorded twice in the side-effect file, the run succeeded, finished tasks' logs read through the REST
API (the UI's path), each worker started sleepers after each failover (the measured times are printed),
no worker fenced itself, the executor saw both switches (its "run_id changed" warning), a new
``airflow asyncq status`` finds both workers through the sentinels, and no component log holds the
master's password.

``worker_lost_timeout`` stays at its 30 s default: a worker fences itself after 20 s without a renewed
lease (30 s minus a 10 s margin, worker/fencing.py). A planned failover leaves the clients on the old
master until its demotion, then they reconnect; a SIGKILL is followed within down-after (2 s) plus the
vote, so the longest silence is one heartbeat interval (5 s) plus a few seconds, well below 20 s. The
test asserts that no worker fenced, so a longer outage shows as a failure, not as a silent retry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.stack import REPO, Stack
from tests.integration.test_sentinel import (  # noqa: F401 - ``group`` is a fixture, used by name
    MASTER_NAME,
    MASTER_PW,
    SENTINEL_PW,
    SentinelGroup,
    _in_sync,
    _role,
    group,
)
from tests.system.conftest import PG, _psql, _require, read_effects, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

DAG_ID = "asyncq_test_sleepers"
TASKS = 30
SLEEP = 5  # seconds each sleeper sleeps
CONCURRENCY = 2
WORKERS = ("w-sentinel-a", "w-sentinel-b")
DOWN_AFTER_MS = 2000
HEARTBEAT = 5.0  # [asyncq] worker_heartbeat_interval, the default: the executor's recovery waits 2 of them
SWITCHED = "(run_id changed)"
REPUBLISHED = "Re-published "


@dataclasses.dataclass
class Deployment:
    stack: Stack
    group: SentinelGroup
    effects: Path
    prefix: str


@pytest.fixture
def sentinel_stack(group: SentinelGroup,  # noqa: F811 - the imported fixture, by name
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    for port in group.sentinel_ports:
        assert group.sentinel(port).execute_command("SENTINEL", "SET", MASTER_NAME, "down-after-milliseconds",
                                                    str(DOWN_AFTER_MS))
    _require(5432, "PostgreSQL")
    db = f"asyncq_sentinel_{os.getpid()}"
    _psql(f"DROP DATABASE IF EXISTS {db}")
    _psql(f"CREATE DATABASE {db}")
    home = tmp_path_factory.mktemp("sentinel_home")
    dags = home / "dags"  # only the DAG file it runs: less for the dag-processor to parse
    dags.mkdir()
    shutil.copy(REPO / "dags" / "asyncq_test_dags.py", dags)
    effects = home / "side_effects.log"
    prefix = f"sent-{uuid.uuid4().hex[:8]}"
    s = Stack(home, sql_conn=PG.format(db=db), broker_url=group.url, key_prefix=prefix, dags_folder=dags,
              extra_env={
                  "ASYNCQ_SIDE_EFFECTS": str(effects),
                  "AIRFLOW__ASYNCQ__SENTINEL_MASTER": MASTER_NAME,
                  "AIRFLOW__ASYNCQ__SENTINEL_PASSWORD": SENTINEL_PW,
                  "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "30",
                  # Not about Redis: on a loaded shared machine the api-server took over 5 s (the default)
                  # to answer a task's first Execution API call, 5 times in a row, and `items` failed.
                  "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
              })
    try:
        s.migrate()
        s.start_core()
        # One log server per host port: the second worker skips it (its logs are files the api-server reads).
        s.start_worker(WORKERS[0], concurrency=CONCURRENCY)
        s.start_worker(WORKERS[1], concurrency=CONCURRENCY, serve_logs=False)
        s.wait_api()
        yield Deployment(s, group, effects, prefix)
    finally:
        s.stop()
        if os.environ.get("ASYNCQ_KEEP_LOGS"):
            keep = Path(os.environ["ASYNCQ_KEEP_LOGS"]) / "sentinel"
            shutil.copytree(s.logs, keep, dirs_exist_ok=True)
            for log in group.dir.glob("*.log"):
                shutil.copy(log, keep)
        _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _master(sentinels: SentinelGroup) -> int | None:
    """The master the first sentinel names now (None if it does not answer)."""
    with contextlib.suppress(redis.RedisError, TypeError):
        return sentinels.master_port()
    return None


def _executor_log(stack: Stack, needle: str) -> list[float]:
    """Wall times of the scheduler's log lines that contain ``needle`` (the executor logs there)."""
    text = (stack.logs / "scheduler.log").read_text(errors="replace")
    return [datetime.datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()
            for line in text.splitlines() if needle in line and line[:4].isdigit()]


def _hostname(name: str) -> str:
    return f"{name}@{socket.gethostname()}"  # celery's %h


@dataclasses.dataclass
class Event:
    what: str
    at: float  # wall clock of the SENTINEL FAILOVER / the SIGKILL
    switched: float = 0.0  # the sentinels name the new master
    settled: float = 0.0  # every client must be on the new master: the old one demoted (failover) or dead

    def report(self, starts: list[tuple[str, float]], until: float,
               stack: Stack) -> tuple[str, dict[str, float], list[float]]:
        """``until``: the next event (or the end); the executor's lines in between are this event's."""
        switches = [t - self.at for t in _executor_log(stack, SWITCHED) if self.at < t < until]
        republished = [t - self.at for t in _executor_log(stack, REPUBLISHED) if self.at < t < until]
        after_event = [t for _w, t in starts if t > self.at]
        first_any = min(after_event) - self.at if after_event else float("nan")
        per_worker = {w: min((t for who, t in starts if who == w and t > self.settled), default=float("nan"))
                      - self.settled for w in WORKERS}
        first_settled = min((v for v in per_worker.values() if v == v), default=float("nan"))  # not nan
        by_worker = ", ".join(f"{w} +{v:.2f} s" for w, v in per_worker.items())
        saw = f"after {switches[0]:.2f} s" if switches else "not"
        when = f" {min(republished):.2f}-{max(republished):.2f} s after the event" if republished else ""
        line = (f"{self.what}: sentinels switched after {self.switched - self.at:.2f} s, clients on the new "
                f"master after {self.settled - self.at:.2f} s; first sleeper started {first_any:.2f} s after "
                f"the event, {first_settled:.2f} s after the switch completed (by worker: {by_worker}); "
                f"executor saw the switch {saw}, re-published {len(republished)} workload(s){when}")
        return line, per_worker, switches


def test_sentinel_failover_and_a_killed_master_mid_run(sentinel_stack: Deployment) -> None:
    stack, effects = sentinel_stack.stack, sentinel_stack.effects
    group = sentinel_stack.group  # noqa: F811 - the fixture of that name is imported above
    first, second = group.redis_ports  # the starting master, its replica
    assert _master(group) == first
    stack.wait_dag(DAG_ID)
    from airflow_asyncq_provider.state import registry
    from airflow_asyncq_provider.state.keys import Keys

    keys = Keys(sentinel_stack.prefix)
    hostnames = [_hostname(w) for w in WORKERS]
    wait_for(lambda: all(registry.alive(group.direct(first), keys, hostnames).values()), 120,
             "both workers registered on the master", stack)

    began = time.monotonic()
    run_id = stack.trigger(DAG_ID, conf={"n": TASKS, "s": SLEEP})

    def starts() -> list[tuple[str, float]]:
        """(worker, wall time) of each sleeper's start, from the side-effect file."""
        return [(r[7], float(r[8])) for r in read_effects(effects, DAG_ID, run_id) if r[2] == "sleeper"]

    looked = [0.0]

    def sleepers_started(count: int) -> bool:
        """Fail fast if the run ends first (the run's state: every 5 s, and a slow api-server is no error)."""
        if len(starts()) >= count:
            return True
        if time.monotonic() - looked[0] < 5:
            return False
        looked[0] = time.monotonic()
        try:
            state = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]
        except (TimeoutError, OSError):
            return False
        if state not in ("queued", "running"):
            unfinished = [f"{ti['task_id']}[{ti['map_index']}]={ti['state']}"
                          for ti in stack.task_instances(DAG_ID, run_id) if ti["state"] != "success"]
            raise AssertionError(f"the run is {state} before {count} sleepers started: {unfinished}")
        return False

    wait_for(lambda: sleepers_started(3), 180, "three sleepers started", stack)

    # --- 1. a planned SENTINEL FAILOVER: the replica becomes master, the old master its replica
    failover = Event("SENTINEL FAILOVER", time.time())
    assert group.sentinel().execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
    wait_for(lambda: _master(group) == second, 30, "the sentinels to name the replica", stack, every=0.1)
    failover.switched = time.time()
    # Until the sentinels demote the old master (about 10 s later, OPERATIONS.md) clients may still use it.
    wait_for(lambda: _role(group.direct(first)) == "slave", 45, "the old master to be demoted", stack,
             every=0.1)
    failover.settled = time.time()
    group.wait_ready(second)  # the old master in sync as a replica, every sentinel agreeing
    wait_for(lambda: {w for w, t in starts() if t > failover.settled} == set(WORKERS), 90,
             "both workers to start sleepers after the demotion", stack, every=0.3)
    # What the fleet wrote on the old master before its demotion is lost (OPERATIONS.md): workloads
    # published there too. The executor re-publishes those once it has seen the switch and the workers
    # have re-asserted their claims (2 heartbeats). Let that happen before the next fault, so each
    # event's times are its own (a switch in between starts that wait again).
    noticed = wait_for(lambda: [t for t in _executor_log(stack, SWITCHED) if t > failover.at], 60,
                       "the executor to notice the failover", stack)[0]
    wait_for(lambda: time.time() > noticed + 2 * HEARTBEAT + 3, 2 * HEARTBEAT + 10,
             "the executor's check for lost workloads", stack)
    started_before_kill = len(starts())

    # --- 2. SIGKILL of the master (the promoted one), then the operator restarts it as a replica
    kill = Event("SIGKILL of the master", time.time())
    group.kill(second)
    wait_for(lambda: _master(group) == first, 45, "the sentinels to promote the replica", stack, every=0.1)
    kill.switched = kill.settled = time.time()
    group.start_redis(second, replica_of=first)
    wait_for(lambda: _in_sync(group.direct(second)), 30, "the restarted server to sync as a replica", stack)
    group.wait_ready(first)
    restored = time.time() - kill.at

    assert stack.wait_run(DAG_ID, run_id, timeout=300) == "success"
    took = time.monotonic() - began

    # --- every task instance ended right, none stayed queued or running, no try ran twice
    tis = stack.task_instances(DAG_ID, run_id)
    assert Counter(ti["state"] for ti in tis) == {"success": TASKS + 2}, Counter(ti["state"] for ti in tis)
    rows = read_effects(effects, DAG_ID, run_id)
    tries = Counter((r[2], int(r[3]), int(r[4])) for r in rows)
    assert max(tries.values()) == 1, [t for t, n in tries.items() if n > 1]
    assert {(task, index) for task, index, _try in tries} == \
        {("sleeper", i) for i in range(TASKS)} | {("gather", -1)}
    assert stack.xcom(DAG_ID, run_id, "gather") == sum(range(TASKS))

    # --- both workers consumed after each failover
    all_starts = starts()
    lines = []
    for event, until in ((failover, kill.at), (kill, time.time())):
        line, per_worker, switches = event.report(all_starts, until, stack)
        lines.append(line)
        assert all(v == v for v in per_worker.values()), f"a worker started nothing after: {line}"  # nan
        assert switches, f"the executor did not see the switch: {line}"

    # --- the logs read through the REST API (the UI's path): a sleeper started after each switch, and gather
    by_start = sorted((float(r[8]), r[2], int(r[3]), int(r[4])) for r in rows if r[2] == "sleeper")
    for event in (failover, kill):
        _t, task, index, try_number = next(s for s in by_start if s[0] > event.settled)
        text = stack.task_log(DAG_ID, run_id, task, try_number, index)
        assert '"task_id": "sleeper"' in text and "Pushing xcom" in text, (event.what, index, text[-2000:])
    gather_log = stack.task_log(DAG_ID, run_id, "gather", 1)
    assert "Pushing xcom" in gather_log, gather_log[-2000:]

    # --- no worker fenced itself; the executor noticed both switches
    dropped = refused = 0
    for name in WORKERS:
        log = (stack.logs / f"{name}.log").read_text(errors="replace")
        assert "fenced:" not in log, f"{name} fenced itself:\n{log[log.index('fenced:') - 500:][:2000]}"
        # Redeliveries: the new master still lists what was consumed from the old one in its last
        # seconds. Dropped by the claim check, or (a workload that also finished there, its claim lost
        # with it) started again and refused by the Execution API; the side effects prove no try re-ran.
        dropped += log.count("dropping this duplicate delivery")
        refused += log.count("TI was not in a state where it could be marked as running")
    scheduler_log = (stack.logs / "scheduler.log").read_text(errors="replace")
    switches = scheduler_log.count(SWITCHED)
    republished = scheduler_log.count(REPUBLISHED)

    # --- the fleet, seen by a new CLI process through the sentinels, is both workers on the new master
    result = stack.run("asyncq", "status", "--json", check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = json.loads(result.stdout)
    assert {row["worker"] for row in shown["workers"]} >= set(hostnames), shown["workers"]
    assert MASTER_PW not in result.stdout and SENTINEL_PW not in result.stdout
    leaked = [p.name for p in stack.logs.glob("*.log") if MASTER_PW in p.read_text(errors="replace")]
    assert not leaked, f"the master's password is in {leaked}"

    print(f"\nSentinel failover system test: {TASKS} sleepers x {SLEEP} s on {len(WORKERS)} x {CONCURRENCY} "
          f"slots, run took {took:.1f} s (trigger -> success); {started_before_kill} sleepers had started "
          f"before the SIGKILL")
    for line in lines:
        print("  " + line)
    print(f"  killed server back as a replica, sentinels agreeing: {restored:.2f} s after the SIGKILL")
    print(f"  executor: {switches} 'run_id changed' warning(s), {republished} workload(s) re-published; "
          f"try numbers {dict(Counter(ti['try_number'] for ti in tis))}")
    print(f"  workers: {dropped} duplicate deliveries dropped by the claim check, {refused} redelivered "
          f"finished workload(s) refused by the Execution API")
