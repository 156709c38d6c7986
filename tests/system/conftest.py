"""A real deployment for the system tier: api-server, scheduler, dag-processor, triggerer, three
``airflow asyncq worker`` processes, PostgreSQL and Redis. Started once per session (about 30 s).

Missing services fail here, loudly: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack import Stack

# Each concurrent run of the system tier needs a Redis DB of its own: Celery queue names are unprefixed.
REDIS_DB = int(os.environ.get("ASYNCQ_SYSTEM_REDIS_DB", "13"))
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"
#: Lines of each component log that a failed system test prints.
LOG_TAIL_LINES = 40


def _require(port: int, name: str) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    except OSError as exc:
        pytest.fail(f"{name} is not reachable on 127.0.0.1:{port} ({exc}); run `make services`")


def _psql(sql: str) -> None:
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql],
                   check=True, capture_output=True)


@pytest.fixture(scope="session")
def side_effects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("effects") / "side_effects.log"


class StatsdListener:
    """A real UDP StatsD endpoint: every datagram the stack's components send, kept in order."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statsd-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except OSError:
                continue
            with self._lock:
                self.lines.extend(line for line in data.decode(errors="replace").splitlines() if line)

    def received(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(scope="session")
def statsd() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, side_effects: Path,
          statsd: StatsdListener) -> Iterator[Stack]:
    _require(5432, "PostgreSQL")
    _require(6379, "Redis")
    db = f"asyncq_system_{os.getpid()}"
    _psql(f"DROP DATABASE IF EXISTS {db}")
    _psql(f"CREATE DATABASE {db}")
    home = tmp_path_factory.mktemp("airflow_home")
    dags = home / "dags"  # a copy, so tests can drop broken DAG files into it
    shutil.copytree(Path(__file__).resolve().parents[2] / "dags", dags,
                    ignore=shutil.ignore_patterns("__pycache__"))
    prefix = f"sys-{uuid.uuid4().hex[:8]}"
    s = Stack(home, sql_conn=PG.format(db=db), broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
              key_prefix=prefix, dags_folder=dags, extra_env={
                  "ASYNCQ_SIDE_EFFECTS": str(side_effects),
                  "AIRFLOW__ASYNCQ__UNCONSUMED_QUEUE_WARNING": "4",
                  "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
                  "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
                  "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
                  # Every component sends its metrics to the session's StatsD listener (test_metrics.py).
                  "AIRFLOW__METRICS__STATSD_ON": "True",
                  "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
                  "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
                  "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
              })
    subprocess.run(["redis-cli", "-n", str(REDIS_DB), "FLUSHDB"], check=True, capture_output=True)
    s.migrate()
    s.start_core()
    s.start_worker("w-default", queues="default", concurrency=4)
    s.start_worker("w-highmem", queues="high_mem", concurrency=2, serve_logs=False, memory_budget="1GiB")
    s.start_worker("w-prio", queues="prio", concurrency=1, serve_logs=False)
    try:
        s.wait_api()
        yield s
    finally:
        s.stop()
        if os.environ.get("ASYNCQ_KEEP_LOGS"):
            shutil.copytree(s.logs, Path(os.environ["ASYNCQ_KEEP_LOGS"]), dirs_exist_ok=True)
        _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def read_effects(path: Path, dag_id: str, run_id: str) -> list[list[str]]:
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [r for r in rows if r[1] == dag_id and r[5] == run_id]


def wait_for(predicate, timeout: float, what: str, stack: Stack | None = None, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack is not None:
            stack.check_alive()
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed system test shows the end of each component's log: CI keeps nothing else of the run."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    stacks = {id(s): s for s in (getattr(arg, "stack", arg) for arg in item.funcargs.values())
              if isinstance(s, Stack)}
    for stack in stacks.values():
        for path in sorted(stack.logs.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"log tail {path.name}", "\n".join(line[:400] for line in lines)))
