"""The workloads one worker runs, and how it stops them: with a reason in the task's own log, SIGTERM,
then SIGKILL after a grace period, and the supervisor's whole group if it hangs.

``WorkloadRunner`` (runner.py) starts workloads and reports their outcome; this part is what the
watchdog, the drain, the fence and a revoke share, whoever asks for the stop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.memory.processes import signal_tree

if TYPE_CHECKING:
    from airflow_asyncq_provider.settings import AsyncQSettings

log = logging.getLogger("airflow_asyncq_provider.worker.runner")


class Running:
    """One forked workload as the worker tracks it."""

    def __init__(self, pid: int, limit: int | None, log_path: str | None, request: int = 0,
                 key: dict[str, Any] | None = None, queue: str | None = None) -> None:
        self.pid = pid
        self.limit = limit
        self.log_path = log_path
        self.request = request
        self.key = key
        self.queue = queue  # the queue it came from, for metrics
        self.started_at = time.time()
        self.stop_reason: str | None = None  # set when the worker itself stops the workload


class RunningTasks:
    """The running table (task id -> ``Running``) behind one lock, and every way to stop an entry."""

    settings: AsyncQSettings
    log_folder: str | None
    running: dict[str, Running]
    _lock: threading.Lock

    def stop(self, task_id: str, reason: str, kill_now: bool = False, grace: float | None = None) -> None:
        """Stop one workload's task process(es) and let its supervisor report and flush the log.

        The supervisor is left alive on purpose: it sees its task die, marks the try failed or
        up_for_retry through the Execution API and flushes the log. The task gets SIGTERM first
        (``kill_now``: SIGKILL at once, as for a memory overrun), SIGKILL after the grace period, and
        the whole group gets SIGKILL after twice the grace period if the supervisor hangs. ``grace``
        defaults to ``kill_grace_period`` (a fence uses less: it must finish before the scheduler acts).
        """
        with self._lock:
            entry = self.running.get(task_id)
        if entry is None or (entry.stop_reason and not kill_now):
            return
        entry.stop_reason = entry.stop_reason or reason
        log.warning("Stopping workload %s (pid %s): %s", task_id, entry.pid, reason)
        self._append_task_log(entry.log_path, f"asyncq: {reason}", "error")
        _signal_task_processes(entry.pid, signal.SIGKILL if kill_now else signal.SIGTERM)
        grace = self.settings.kill_grace_period if grace is None else grace
        for delay, action in ((grace, _signal_task_processes), (2 * grace, _kill_group)):
            timer = threading.Timer(delay, self._if_still_running, (task_id, entry, action))
            timer.daemon = True
            timer.start()

    def _if_still_running(self, task_id: str, entry: Running, action: Callable[[int, int], None]) -> None:
        with self._lock:
            current = self.running.get(task_id)
        if current is entry:
            action(entry.pid, signal.SIGKILL)

    def stop_all(self, reason: str, kill_now: bool = False, grace: float | None = None) -> None:
        with self._lock:
            task_ids = list(self.running)
        for task_id in task_ids:
            self.stop(task_id, reason, kill_now=kill_now, grace=grace)

    def watch_list(self) -> list[tuple[str, int, int | None]]:
        with self._lock:
            return [(task_id, e.pid, e.limit) for task_id, e in self.running.items()]

    def running_entries(self) -> dict[str, Running]:
        with self._lock:
            return dict(self.running)

    def _append_task_log(self, log_path: str | None, message: str, level: str) -> None:
        """Put the worker's verdict where the user looks: the task's own log in the Airflow UI."""
        if not log_path or not self.log_folder:
            return
        path = Path(self.log_folder, log_path)
        line = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "event": message,
                "level": level, "logger": "airflow_asyncq_provider.worker"}
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(line) + "\n")
        except OSError as exc:
            log.warning("Could not append to task log %s: %s", path, exc)


def _signal_task_processes(supervisor_pid: int, sig: int) -> None:
    """Signal every descendant of the supervisor (the task process and anything it started)."""
    signal_tree(supervisor_pid, sig, include_root=False)


def _kill_group(pid: int, sig: int) -> None:
    """The supervisor's group and every descendant (the task process runs in a group of its own)."""
    _signal_task_processes(pid, sig)
    try:
        os.killpg(pid, sig)
    except OSError:
        pass
