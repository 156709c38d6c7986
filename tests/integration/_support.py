"""Helpers the integration tests share: waiting, key names, and ``airflow`` subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 14
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
KOMBU_SEP = "\x06\x16"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str],
             interval: float = 0.05) -> Any:
    """Poll until ``predicate`` returns something truthy; ``what`` (or its result) names it on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def queue_keys(name: str) -> list[str]:
    """Every key kombu's Redis transport writes for one queue (its priority lists and bindings)."""
    return [name, *(f"{name}{KOMBU_SEP}{step}" for step in range(1, 10)),
            f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}"]


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def airflow_env(home: Path, **asyncq: str) -> dict[str, str]:
    """Environment for an ``airflow`` subprocess: its own AIRFLOW_HOME, our [asyncq] settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW__ASYNCQ__", "AIRFLOW_HOME", "AIRFLOW_CONFIG"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({f"AIRFLOW__ASYNCQ__{k.upper()}": v for k, v in asyncq.items()})
    return env


def run_airflow(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout)


class WorkerProcess:
    """``airflow asyncq worker`` as a subprocess we started; stopped by its own pid."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([AIRFLOW, "asyncq", "worker", *args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # our own process group: the worker, its fork server and any forked workload
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
