"""The worker serves running tasks' logs from a thread (Airflow's log server app): it answers, it
refuses unsigned requests, and a port that is already taken costs the log server, not the worker."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.integration._support import (
    REDIS_URL,
    WorkerProcess,
    airflow_env,
    delete_prefix,
    queue_keys,
    wait_for,
)

pytestmark = [pytest.mark.integration]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(tmp_path: Path, port: int) -> tuple[WorkerProcess, str, str]:
    uid = uuid.uuid4().hex[:8]
    prefix, queue = f"it-logs-{uid}", f"itq_{uid}"
    env = airflow_env(tmp_path, broker_url=REDIS_URL, key_prefix=prefix)
    env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(port)
    worker = WorkerProcess(["-q", queue, "-c", "1", "--hostname", f"{uid}@%h"], env, tmp_path / "worker.log")
    wait_for(lambda: not worker.alive() or " ready." in worker.output(), 90,
             lambda: f"the worker to be ready\n{worker.output()[-3000:]}")
    assert worker.alive(), worker.output()[-3000:]
    return worker, prefix, queue


@pytest.fixture()
def cleanup(redis_client: redis.Redis) -> Iterator[list[tuple[WorkerProcess, str, str]]]:
    started: list[tuple[WorkerProcess, str, str]] = []
    yield started
    for worker, prefix, queue in started:
        code = worker.stop()
        delete_prefix(redis_client, prefix)
        redis_client.delete(*queue_keys(queue))
        assert code == 0, worker.output()[-3000:]


def test_logs_are_served_and_unsigned_requests_refused(tmp_path: Path, cleanup: list) -> None:
    port = free_port()
    cleanup.append(start(tmp_path, port))
    worker = cleanup[0][0]
    wait_for(lambda: f"Serving task logs on port {port}" in worker.output(), 30, "the log server thread")

    def status() -> int:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/log/any.log", timeout=5).status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    assert wait_for(lambda: status() in (401, 403) and status(), 30, "an answer from the log server") in (401, 403)


def test_a_taken_port_costs_the_log_server_not_the_worker(tmp_path: Path, cleanup: list) -> None:
    with socket.socket(socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET) as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cleanup.append(start(tmp_path, port))
        worker = cleanup[0][0]
        wait_for(lambda: "address already in use" in worker.output().lower(), 30,
                 lambda: f"the bind error in the worker's log\n{worker.output()[-3000:]}")
        assert worker.alive()
