"""Admission by memory: a worker starts a task only if its request fits the budget still free.

The Celery consumer asks ``can_consume`` before it fetches a message, so a worker without room leaves
the message in Redis for a worker that has room, instead of holding it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import psutil

from airflow_asyncq_provider.sizes import format_size

log = logging.getLogger(__name__)

# A request that did not fit keeps smaller work from jumping the queue this long, so it can't starve.
HOLD_FOR_LARGE_REQUEST = 60.0


def machine_memory() -> tuple[int, str]:
    """(bytes, source): the cgroup limit if there is one, else system memory."""
    total = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            return int(raw), f"cgroup limit ({path})"
    return total, "system memory"


def detect_budget(configured: int | None, fraction: float) -> int:
    machine, source = machine_memory()
    if configured is None:
        budget = int(machine * fraction)
        log.info("Memory budget %s = %.0f%% of %s %s", format_size(budget), fraction * 100, source,
                 format_size(machine))
        return budget
    if configured > machine:
        log.warning("Memory budget %s is larger than the %s of %s; capping it to %s",
                    format_size(configured), source, format_size(machine), format_size(machine))
        return machine
    return configured


class Admission:
    def __init__(self, budget: int, default_request: int) -> None:
        self.budget = budget
        self.default_request = default_request
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        self._waiting_for = 0
        self._waiting_since = 0.0

    @property
    def used(self) -> int:
        with self._lock:
            return sum(self._held.values())

    @property
    def free(self) -> int:
        return self.budget - self.used

    def fits_at_all(self, request: int) -> bool:
        return request <= self.budget

    def try_acquire(self, task_id: str, request: int) -> bool:
        with self._lock:
            free = self.budget - sum(self._held.values())
            if request <= free:
                self._held[task_id] = request
                if request >= self._waiting_for:
                    self._waiting_for = 0
                return True
            if request > self._waiting_for or time.monotonic() - self._waiting_since > HOLD_FOR_LARGE_REQUEST:
                self._waiting_for = request
                self._waiting_since = time.monotonic()
            return False

    def release(self, task_id: str) -> None:
        with self._lock:
            self._held.pop(task_id, None)

    def can_consume(self) -> bool:
        """Fetch another message only if the next one could plausibly start here."""
        need = self.default_request
        with self._lock:
            if self._waiting_for and time.monotonic() - self._waiting_since < HOLD_FOR_LARGE_REQUEST:
                need = max(need, self._waiting_for)
            free = self.budget - sum(self._held.values())
        return free >= need
