"""Fencing: a worker that can no longer renew its leases stops its own tasks before the executor can
declare them lost (DESIGN.md section 6).

The executor reports a worker lost when its registry record, written on every heartbeat with a TTL of
``worker_lost_timeout``, has expired. A worker cut off from Redis cannot see that happen, but it knows
when its last heartbeat got through. So it keeps that clock itself, and when no heartbeat (registry
record *and* lease renewal) has succeeded for ``worker_lost_timeout`` minus a margin, it stops every
running task: SIGTERM, a grace period, SIGKILL. By the time Airflow retries the task elsewhere, the
first copy is gone. While fenced, the consumer fetches nothing. The first heartbeat that gets through
again lifts the fence: the worker rejoins without a restart.

The times are derived, not configured (``fence_times``), from the options they must fit between:

- ``margin = max(2 * worker_heartbeat_interval, 0.25 * worker_lost_timeout)``: room for the stop (a
  grace period and one look at the clock), with time to spare for a loaded machine.
- ``fence_after = worker_lost_timeout - margin``: seconds since the start of the last heartbeat that
  got through. The start, not the end: Redis set the record's TTL after we sent it.
- ``grace = min(kill_grace_period, margin / 2)``: SIGTERM to SIGKILL, so every task process is gone
  by ``fence_after + grace + CHECK_EVERY``, before ``worker_lost_timeout``.
- ``fence_after`` is never below ``worker_heartbeat_interval + publish_timeout``, so one slow heartbeat
  cannot fence. When that floor leaves no time for the stop (``worker_lost_timeout`` close to twice the
  interval), the worker says so at start and names the option to raise.

A heartbeat's Redis calls are bounded by the client's socket timeout (``[asyncq] publish_timeout``, no
retries: state/client.py), so a stuck call delays the next heartbeat, never the fence, which has a
thread and a clock of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_asyncq_provider.settings import AsyncQSettings
    from airflow_asyncq_provider.worker.runner import WorkloadRunner

log = logging.getLogger("airflow_asyncq_provider.worker")

#: How often the fence thread looks at its clock, at most (seconds).
CHECK_EVERY = 0.5


@dataclasses.dataclass(frozen=True)
class FenceTimes:
    lost_timeout: float
    margin: float
    grace: float
    check_every: float
    #: The shortest silence that may fence: one heartbeat interval plus one beat at its socket timeout.
    floor: float

    @property
    def fence_after(self) -> float:
        return max(self.lost_timeout - self.margin, self.floor)

    @property
    def stopped_by(self) -> float:
        """Seconds after the last good heartbeat by which every task process is gone."""
        return self.fence_after + self.check_every + self.grace

    @property
    def holds(self) -> bool:
        """Whether these settings let a fence finish before the executor declares the worker lost."""
        return self.stopped_by < self.lost_timeout


def fence_times(settings: AsyncQSettings) -> FenceTimes:
    interval, lost = settings.worker_heartbeat_interval, settings.worker_lost_timeout
    margin = max(2 * interval, 0.25 * lost)
    return FenceTimes(lost_timeout=lost, margin=margin, grace=min(settings.kill_grace_period, margin / 2),
                      check_every=min(CHECK_EVERY, interval / 4), floor=interval + settings.publish_timeout)


class Fence(threading.Thread):
    """``renewed(started_at)`` after every heartbeat that got through; the thread fences and lifts the
    fence. ``clock`` is monotonic seconds (a fake in tests, which call ``check`` themselves)."""

    def __init__(self, settings: AsyncQSettings, hostname: str, runner: WorkloadRunner,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="asyncq-fence", daemon=True)
        self._settings = settings
        self.times = fence_times(settings)
        self.hostname = hostname
        self.runner = runner
        self._clock = clock
        self._lock = threading.Lock()
        self._renewed_at = clock()  # the worker connected to Redis just before it built this
        self._stop_event = threading.Event()
        self.fenced_at: float | None = None
        #: How many times this worker fenced itself, for logs and tests.
        self.fences = 0

    def renewed(self, started_at: float) -> None:
        """A heartbeat that began at ``started_at`` (this clock) renewed the record and every lease."""
        with self._lock:
            self._renewed_at = max(self._renewed_at, started_at)
        if self.fenced_at is not None:
            self._lift()

    def silent_for(self) -> float:
        with self._lock:
            return self._clock() - self._renewed_at

    def check(self) -> None:
        silent = self.silent_for()
        if self.fenced_at is None and silent > self.times.fence_after:
            self._fence(silent)

    def _fence(self, silent: float) -> None:
        self.fenced_at = self._clock()
        self.fences += 1
        reason = (f"fenced: worker {self.hostname} could not renew its leases for {silent:.0f} s (Redis "
                  f"unreachable); stopped before the scheduler declares it lost")
        self.runner.fenced = reason
        running = len(self.runner.running_entries())
        log.error("%s: stopping %d running task(s) (SIGKILL after %.1f s); taking no new work until a "
                  "heartbeat gets through", reason, running, self.times.grace)
        self.runner.stop_all(reason, grace=self.times.grace)

    def _lift(self) -> None:
        fenced_at = self.fenced_at
        if fenced_at is None:
            return
        self.fenced_at = None
        self.runner.fenced = None
        log.warning("Worker %s rejoined: a heartbeat got through %.0f s after it fenced itself; taking work "
                    "again", self.hostname, self._clock() - fenced_at)

    def start(self) -> None:
        """Start the clock with the heartbeat: the fork server may have taken a while to come up."""
        t = self.times
        if not t.holds:
            log.warning(
                "Fencing cannot stop tasks before the scheduler declares this worker lost: it fences after "
                "%.1f s without a heartbeat and needs %.1f s more, but [asyncq] worker_lost_timeout is %g s. "
                "Raise worker_lost_timeout to at least %g s (or lower worker_heartbeat_interval or "
                "publish_timeout)", t.fence_after, t.stopped_by - t.fence_after, t.lost_timeout,
                smallest_lost_timeout(self._settings))
        with self._lock:
            self._renewed_at = max(self._renewed_at, self._clock())
        super().start()

    def run(self) -> None:
        while not self._stop_event.wait(self.times.check_every):
            try:
                self.check()
            except Exception:  # never let the fence die: it is the worker's promise to the scheduler
                log.exception("Fence check failed")

    def stop(self) -> None:
        self._stop_event.set()


def smallest_lost_timeout(settings: AsyncQSettings) -> int:
    """The smallest whole ``worker_lost_timeout`` with which fencing holds, the rest unchanged."""
    start = int(settings.worker_lost_timeout)
    for lost in range(max(start, 1), max(start, 1) + 100_000):
        if fence_times(dataclasses.replace(settings, worker_lost_timeout=float(lost))).holds:
            return lost
    raise ValueError("no worker_lost_timeout makes fencing hold")  # unreachable: margin grows with it
