"""The memory watchdog: samples every running task's process tree and stops the ones over their limit.

The tree is the supervisor, the task process and any grandchildren they start. It is measured by PSS,
so pages still shared with the warm fork parent count once across the fleet, not once per task.

Reading PSS costs about 6 ms of kernel time per process (the kernel walks every mapping), twice a
second for every process of every running tree: most of what the worker's main process spent per
task (docs/BENCHMARKS.md, "CPU per task"). So every sample reads each process' RSS (``statm``,
0.05 ms), and its PSS only when that can change a decision or a figure:

- the tree's RSS is above its limit. RSS is never below PSS, so under the limit by RSS is under it by
  PSS: the limit is enforced exactly as if PSS were read every time;
- the process is ``PSS_MIN_AGE`` old and not read yet, its RSS moved by more than ``PSS_ON_CHANGE``
  since its last PSS read, or that read is ``PSS_EVERY`` seconds old: peaks and the figures the fleet
  page shows stay current. A supervisor host that runs one workload after another is read again only
  then, not per workload. A task process that ends younger than ``PSS_MIN_AGE`` is not in its tree's
  peak (unless the tree was over its limit by RSS): a trivial task no longer pays 6 ms to report it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import psutil

from airflow_asyncq_provider.memory.processes import pss_of, rss_of, tree

log = logging.getLogger(__name__)

#: Seconds after which a process' PSS is read again although its RSS has not moved.
PSS_EVERY = 5.0
#: Seconds a process lives before its first PSS read, unless its tree is over its limit by RSS.
PSS_MIN_AGE = 1.0
#: An RSS change (bytes, or that fraction of the RSS if larger) that makes the next sample read PSS.
PSS_ON_CHANGE = (16 * 1024**2, 0.1)


class _Read(NamedTuple):
    """A process' last PSS read: the PSS, the RSS at that time and when (monotonic)."""

    pss: int
    rss: int
    at: float


class Watchdog(threading.Thread):
    """``running()`` yields (task_id, pid, limit); ``over_limit(task_id, used, limit)`` stops one.

    ``current`` and ``peaks`` are written by this thread and read by the slot threads (``pop_peak``) and
    the heartbeat thread (``in_use``, ``usage``), so every access holds ``_lock``.
    """

    def __init__(self, interval: float, running: Callable[[], list[tuple[str, int, int | None]]],
                 over_limit: Callable[[str, int, int], None]) -> None:
        super().__init__(name="asyncq-watchdog", daemon=True)
        self.interval = interval
        self._running = running
        self._over_limit = over_limit
        self._peaks: dict[str, int] = {}
        self._current: dict[str, int] = {}
        self._reads: dict[tuple[int, float], _Read] = {}  # by (pid, start time); only this thread
        #: PSS reads made, for tests and benchmarks.
        self.pss_reads = 0
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def sample_once(self) -> None:
        over = []
        now, wall, seen = time.monotonic(), time.time(), set()
        sampled = {task_id: (self._measure(pid, limit, now, wall, seen), limit)
                   for task_id, pid, limit in self._running()}
        for gone in self._reads.keys() - seen:
            del self._reads[gone]
        with self._lock:
            self._current = {task_id: used for task_id, (used, _limit) in sampled.items()}
            for task_id, (used, limit) in sampled.items():
                if used > self._peaks.get(task_id, 0):
                    self._peaks[task_id] = used
                if limit is not None and used > limit:
                    over.append((task_id, used, limit))
        for task_id, used, limit in over:  # outside the lock: stopping a task takes the runner's lock
            self._over_limit(task_id, used, limit)

    def _measure(self, pid: int, limit: int | None, now: float, wall: float,
                 seen: set[tuple[int, float]]) -> int:
        """The tree's PSS: each process read now, or its last read while its RSS says it cannot matter."""
        sizes = [(proc, _identity(proc), rss_of([proc])) for proc in tree(pid)]
        exact = limit is not None and sum(rss for _proc, _key, rss in sizes) > limit
        total = 0
        for proc, key, rss in sizes:
            seen.add(key)
            last = self._reads.get(key)
            if last is None and not exact and wall - key[1] < PSS_MIN_AGE:
                continue
            if (exact or last is None or now - last.at >= PSS_EVERY
                    or abs(rss - last.rss) > max(PSS_ON_CHANGE[0], PSS_ON_CHANGE[1] * last.rss)):
                last = self._reads[key] = _Read(pss_of([proc]), rss, now)
                self.pss_reads += 1
            total += last.pss
        return total

    def pop_peak(self, task_id: str) -> int:
        with self._lock:
            self._current.pop(task_id, None)
            return self._peaks.pop(task_id, 0)

    def usage(self, task_id: str) -> int:
        """Bytes the task's tree used at the last sample (0 before the first)."""
        with self._lock:
            return self._current.get(task_id, 0)

    def in_use(self) -> int:
        with self._lock:
            return sum(self._current.values())

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.sample_once()
            except Exception:  # the watchdog must outlive any one odd process
                log.exception("Memory watchdog sample failed")


def _identity(proc: psutil.Process) -> tuple[int, float]:
    """A pid is reused; a pid and its start time are not."""
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return proc.pid, 0.0
