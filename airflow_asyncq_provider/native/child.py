"""The native lane as a child process of ``airflow asyncq worker`` (started and stopped by it)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.native.keys import NATIVE_QUEUE

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LaneSpec:
    loop_concurrency: int
    sync_threads: int
    queues: tuple[str, ...] = (NATIVE_QUEUE,)

    @property
    def enabled(self) -> bool:
        return self.loop_concurrency > 0 or self.sync_threads > 0


def lane_spec(loop_concurrency: int | None, sync_threads: int | None, native_queues: str | None,
              settings_loop: int, settings_threads: int, airflow_queues: list[str]) -> LaneSpec:
    """Resolve the worker's native-lane arguments against ``[asyncq]`` and check them."""
    from airflow_asyncq_provider.settings import validate_queue_name

    values = []
    for flag, raw, default in (("--loop-concurrency", loop_concurrency, settings_loop),
                               ("--sync-threads", sync_threads, settings_threads)):
        try:
            value = default if raw is None else int(raw)
        except (TypeError, ValueError):
            value = -1
        if value < 0:
            raise ConfigError(f"airflow asyncq worker {flag} must be an integer >= 0, got {raw!r}")
        values.append(value)
    queues = tuple(validate_queue_name(q, "airflow asyncq worker --native-queues")
                   for q in (native_queues or NATIVE_QUEUE).split(","))
    shared = sorted(set(queues) & set(airflow_queues))
    if shared and (values[0] or values[1]):
        raise ConfigError(
            f"airflow asyncq worker: queue(s) {', '.join(shared)} are both Airflow queues (-q) and native "
            "queues (--native-queues); a lane cannot run Airflow workloads, so give native tasks their own "
            f"queue (default {NATIVE_QUEUE!r})")
    return LaneSpec(values[0], values[1], queues)


class LaneProcess:
    def __init__(self, spec: LaneSpec, hostname: str, loglevel: str = "INFO") -> None:
        self.spec = spec
        self.hostname = f"{hostname}-native"
        self.loglevel = loglevel
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "airflow_asyncq_provider.native.lane",
               "--loop-concurrency", str(self.spec.loop_concurrency),
               "--sync-threads", str(self.spec.sync_threads), "--queues", ",".join(self.spec.queues),
               "--hostname", self.hostname, "--loglevel", self.loglevel]
        # Same stdout/stderr as the worker, so the lane's log lines land in the worker's log.
        self.proc = subprocess.Popen(cmd, env=os.environ.copy())
        log.info("native lane %s started (pid %d): %d coroutine slot(s), %d sync thread(s), queues %s",
                 self.hostname, self.proc.pid, self.spec.loop_concurrency, self.spec.sync_threads,
                 ",".join(self.spec.queues))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (Celery's warm shutdown: running tasks finish), then SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("native lane %s did not stop within %.0f s; killing it", self.hostname, timeout)
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
