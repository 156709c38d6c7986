"""The fault-injection stack: like the system stack, but with a Redis of its own that the suite may
kill and restart, protected by an ACL user and password, and short timeouts so faults show quickly.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.stack import Stack, free_port
from tests.system.conftest import PG, _psql, _require, read_effects

REDIS_USER = "asyncq"
REDIS_PASSWORD = "fault-suite-Secr3t-pw"
TASK_QUEUED_TIMEOUT = 30


class PrivateRedis:
    """A redis-server that keeps nothing on disk, like the machine's, but ours to restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir),
             "--user", "default", "off",
             "--user", REDIS_USER, "on", f">{REDIS_PASSWORD}", "~*", "&*", "+@all"],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


@pytest.fixture(scope="session")
def fault_effects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault_effects") / "side_effects.log"


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; run `make services`")
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory: pytest.TempPathFactory, private_redis: PrivateRedis,
                fault_effects: Path) -> Iterator[Stack]:
    _require(5432, "PostgreSQL")
    db = f"asyncq_faults_{os.getpid()}"
    _psql(f"DROP DATABASE IF EXISTS {db}")
    _psql(f"CREATE DATABASE {db}")
    home = tmp_path_factory.mktemp("fault_home")
    s = Stack(home, sql_conn=PG.format(db=db), broker_url=private_redis.url, key_prefix="faults",
              extra_env={
                  "ASYNCQ_SIDE_EFFECTS": str(fault_effects),
                  "AIRFLOW__ASYNCQ__WORKER_HEARTBEAT_INTERVAL": "1",
                  "AIRFLOW__ASYNCQ__WORKER_LOST_TIMEOUT": "6",
                  "AIRFLOW__ASYNCQ__WORKER_DRAIN_TIMEOUT": "4",
                  "AIRFLOW__ASYNCQ__KILL_GRACE_PERIOD": "3",
                  "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(TASK_QUEUED_TIMEOUT),
                  "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "3600",
                  "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
                  "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "20",
              })
    s.migrate()
    s.start_core()
    try:
        s.wait_api()
        yield s
    finally:
        s.stop()
        if os.environ.get("ASYNCQ_KEEP_LOGS"):
            shutil.copytree(s.logs, Path(os.environ["ASYNCQ_KEEP_LOGS"]) / "faults", dirs_exist_ok=True)
        _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def account(case: str, stack: Stack, effects: Path, dag_id: str, run_id: str,
            expected: dict[str, str], max_tries: dict[str, int] | None = None) -> None:
    """Count outcomes: every TI in its expected final state, none queued or running, no try ran twice.

    ``expected`` maps "task_id[map_index]" to the final state; ``max_tries`` how many tries may run.
    """
    tis = stack.task_instances(dag_id, run_id)
    finals = {f"{ti['task_id']}[{ti['map_index']}]": ti["state"] for ti in tis}
    runs = Counter((r[2], r[3], r[4]) for r in read_effects(effects, dag_id, run_id) if r[0] == "run")
    twice = {k: n for k, n in runs.items() if n > 1}
    stuck = [k for k, state in finals.items() if state in ("queued", "running", "scheduled", None)]
    tries = Counter(f"{task}[{index}]" for task, index, _try in runs)
    print(f"\nFAULT {case}: {len(tis)} task instance(s) final={dict(Counter(finals.values()))} "
          f"runs={sum(runs.values())} ran_twice={len(twice)} stuck={len(stuck)}")
    assert finals == expected, finals
    assert not stuck, stuck
    assert not twice, f"some try ran more than once: {twice}"
    for name, limit in (max_tries or {}).items():
        assert tries[name] <= limit, (name, tries[name])


def grep_logs(stack: Stack, needle: str) -> list[str]:
    hits = []
    for path in stack.logs.rglob("*.log"):
        text = path.read_text(errors="replace")
        if needle in text:
            hits.append(f"{path.name}: ...{text[max(0, text.index(needle) - 200):text.index(needle) + 50]}")
    return hits
