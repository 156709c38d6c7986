"""How long one publish to a dead broker holds the scheduler loop, where
tests/integration/test_executor.py only checks that it stays within ``[asyncq] publish_timeout``.

    .venv/bin/python bench/publish_timeout.py [--repeats 7] [--timeouts 0.5,2]

For each publish timeout, times ``AsyncQExecutor._process_workloads`` of one workload after the broker
went away, against two dead brokers:

* ``refused``: nothing listens (port 1), so the connection is refused at once;
* ``silent``: a socket of this script accepts the connection and never answers, so only the timeout
  ends the attempt.

The executor's own Redis (for its task records) is DB 12, under a key prefix of this run, whose keys are
deleted at the end. Prints every run and the medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DB = 12
URL = f"redis://127.0.0.1:6379/{DB}"


class SilentBroker:
    """Accepts TCP connections and never sends a byte, as a hung Redis would."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, name="silent-broker", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def workload(queue: str) -> Any:
    from airflow.executors.workloads import BundleInfo, ExecuteTask, TaskInstanceDTO

    ti = TaskInstanceDTO(id=uuid.uuid4(), task_id="t", dag_id="bench_dag", run_id="manual__1", try_number=1,
                         dag_version_id=uuid.uuid4(), map_index=-1, pool_slots=1, priority_weight=1,
                         queue=queue, external_executor_id=str(uuid.uuid4()))
    return ExecuteTask(ti=ti, dag_rel_path=Path("bench_dag.py"), token="bench-token",
                       log_path="dag_id=bench_dag/attempt=1.log", bundle_info=BundleInfo(name="dags-folder"))


def one_publish(dead_url: str, queue: str) -> float:
    """Seconds one ``_process_workloads`` took; a fresh executor each time, so no connection is reused."""
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor
    from airflow_asyncq_provider.state.client import make_redis

    executor = AsyncQExecutor()
    executor.start()
    try:
        item = workload(queue)
        executor.queue_workload(item, session=None)
        executor._redis.close()  # the broker goes away after start, as in the test
        executor._redis = make_redis(dataclasses.replace(executor.settings, broker_url=dead_url))
        started = time.monotonic()
        executor._process_workloads([item])
        elapsed = time.monotonic() - started
        assert item.ti.key in executor.queued_tasks, "a failed publish must stay queued for the next try"
        return elapsed
    finally:
        executor.end()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--timeouts", default="0.5,2", help="[asyncq] publish_timeout values, in seconds")
    args = parser.parse_args(argv)
    timeouts = [float(t) for t in args.timeouts.split(",") if t.strip()]
    if args.repeats < 1 or not timeouts:
        parser.error("--repeats must be positive and --timeouts non-empty")
    import redis

    # Every run logs a failed publish on purpose; Airflow reads its log level when it first configures.
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "ERROR")
    prefix = f"bench-publish-{uuid.uuid4().hex[:8]}"
    queue = f"{prefix}-q"
    os.environ.update({"AIRFLOW__ASYNCQ__BROKER_URL": URL, "AIRFLOW__ASYNCQ__KEY_PREFIX": prefix})
    client = redis.Redis(db=DB)
    client.ping()
    silent = SilentBroker()
    brokers = {"refused": "redis://127.0.0.1:1/0", "silent": f"redis://127.0.0.1:{silent.port}/0"}
    medians: dict[tuple[float, str], float] = {}
    try:
        for timeout in timeouts:
            os.environ["AIRFLOW__ASYNCQ__PUBLISH_TIMEOUT"] = str(timeout)
            for name, dead_url in brokers.items():
                runs = [round(one_publish(dead_url, queue), 3) for _ in range(args.repeats)]
                medians[timeout, name] = statistics.median(runs)
                print(f"publish_timeout {timeout:g} s, {name} broker: runs {runs}", flush=True)
    finally:
        silent.close()
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
    print()
    for (timeout, name), median in medians.items():
        print(f"publish_timeout {timeout:4g} s  {name:8} broker  median {median:6.3f} s  "
              f"({median / timeout:.2f}x the timeout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
