"""The memory watchdog: samples every running task's process tree and stops the ones over their limit.

The tree is the forked supervisor, the task process and any grandchildren they start. It is measured
by PSS, so pages still shared with the warm fork parent count once across the fleet, not once per task.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psutil

log = logging.getLogger(__name__)


def tree_pss(pid: int) -> int:
    """Bytes of PSS of ``pid`` and all its descendants; processes that vanish mid-sample are skipped."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            continue
    return total


class Watchdog(threading.Thread):
    """``running()`` yields (task_id, pid, limit); ``over_limit(task_id, used, limit)`` stops one."""

    def __init__(self, interval: float, running: Callable[[], list[tuple[str, int, int | None]]],
                 over_limit: Callable[[str, int, int], None]) -> None:
        super().__init__(name="asyncq-watchdog", daemon=True)
        self.interval = interval
        self._running = running
        self._over_limit = over_limit
        self.peaks: dict[str, int] = {}
        self.current: dict[str, int] = {}
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def sample_once(self) -> None:
        seen = set()
        for task_id, pid, limit in self._running():
            seen.add(task_id)
            used = tree_pss(pid)
            self.current[task_id] = used
            if used > self.peaks.get(task_id, 0):
                self.peaks[task_id] = used
            if limit is not None and used > limit:
                self._over_limit(task_id, used, limit)
        for task_id in list(self.current):
            if task_id not in seen:
                self.current.pop(task_id, None)

    def pop_peak(self, task_id: str) -> int:
        self.current.pop(task_id, None)
        return self.peaks.pop(task_id, 0)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.sample_once()
            except Exception:  # the watchdog must outlive any one odd process
                log.exception("Memory watchdog sample failed")

    def in_use(self) -> int:
        return sum(self.current.values())

    def snapshot(self) -> dict[str, Any]:
        return {task_id: used for task_id, used in self.current.items()}
