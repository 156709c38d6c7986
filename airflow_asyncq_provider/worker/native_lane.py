"""The native lane as a child process of ``airflow asyncq worker`` (started, restarted and stopped by it)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.state.keys import NATIVE_QUEUE

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
    from airflow_asyncq_provider.settings import parse_queue_list

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
    queues = parse_queue_list(native_queues or NATIVE_QUEUE, "airflow asyncq worker --native-queues")
    shared = sorted(set(queues) & set(airflow_queues))
    if shared and (values[0] or values[1]):
        raise ConfigError(
            f"airflow asyncq worker: queue(s) {', '.join(shared)} are both Airflow queues (-q) and native "
            "queues (--native-queues); a lane cannot run Airflow workloads, so give native tasks their own "
            f"queue (default {NATIVE_QUEUE!r})")
    return LaneSpec(values[0], values[1], queues)


# A lane that dies is restarted, but not in a crash loop: after this many restarts inside the window
# the worker stops trying and says so in its log and in `airflow asyncq status`.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0


class LaneProcess:
    def __init__(self, spec: LaneSpec, hostname: str, loglevel: str = "INFO") -> None:
        self.spec = spec
        self.hostname = f"{hostname}-native"
        self.loglevel = loglevel
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.gave_up = False
        self._recent: list[float] = []
        self._stopping = False
        self._lock = threading.Lock()

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

    def supervise(self) -> None:
        """Restart a lane that exited on its own; the worker's heartbeat thread calls this.

        Messages the dead lane had fetched but not started are unacknowledged and come back after
        ``visibility_timeout``; tasks it had started are lost with it (acks on start, see app.py).
        """
        with self._lock:
            if self.proc is None or self._stopping or self.gave_up or self.proc.poll() is None:
                return
            now = time.monotonic()
            self._recent = [t for t in self._recent if now - t < RESTART_WINDOW_S]
            if len(self._recent) >= MAX_RESTARTS:
                self.gave_up = True
                log.error("native lane %s exited with code %s and was restarted %d times in %.0f s; not "
                          "restarting it again. Its log lines above say why; restart the worker once fixed.",
                          self.hostname, self.proc.returncode, len(self._recent), RESTART_WINDOW_S)
                return
            log.error("native lane %s exited with code %s; restarting it", self.hostname,
                      self.proc.returncode)
            self._recent.append(now)
            self.restarts += 1
            self.start()

    def status(self) -> dict[str, Any]:
        """What the registry heartbeat publishes about this lane (shown by `airflow asyncq status`)."""
        return {"pid": self.pid, "alive": self.alive(), "restarts": self.restarts, "gave_up": self.gave_up,
                "loop_concurrency": self.spec.loop_concurrency, "sync_threads": self.spec.sync_threads,
                "queues": list(self.spec.queues)}

    def begin_stop(self) -> None:
        """SIGTERM now (Celery's warm shutdown: running tasks finish), so the lane drains alongside the
        worker instead of after it; ``stop`` then waits for it."""
        with self._lock:
            self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (unless ``begin_stop`` sent it), then SIGKILL after ``timeout``."""
        with self._lock:
            signalled, self._stopping = self._stopping, True
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if not signalled:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("native lane %s did not stop within %.0f s; killing it", self.hostname, timeout)
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
