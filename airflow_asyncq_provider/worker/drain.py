"""SIGTERM on a worker: stop taking work, let running tasks finish within the drain timeout, then
terminate them with a reason. A second SIGTERM kills them at once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider import exitcodes

if TYPE_CHECKING:
    from airflow_asyncq_provider.settings import AsyncQSettings
    from airflow_asyncq_provider.worker.runner import WorkloadRunner

log = logging.getLogger("airflow_asyncq_provider.worker")


class Drain:
    def __init__(self, runner: WorkloadRunner, settings: AsyncQSettings, hostname: str,
                 on_first_signal: Callable[[], None] | None = None) -> None:
        self.runner = runner
        self._on_first_signal = on_first_signal
        self.settings = settings
        self.hostname = hostname
        self.signals = 0
        self.exit_code = exitcodes.OK

    def on_shutdown(self, sig: Any = None, **_: Any) -> None:
        """Celery's ``worker_shutting_down`` signal: the first one drains, the second one kills."""
        self.signals += 1
        self.runner.draining = True
        if self.signals == 1:
            log.warning("%s: draining %d running task(s), up to %.0f s ([asyncq] worker_drain_timeout)",
                        sig, len(self.runner.running), self.settings.worker_drain_timeout)
            threading.Thread(target=self._wait_then_terminate, name="asyncq-drain", daemon=True).start()
            if self._on_first_signal is not None:  # the native lane drains alongside, not after
                self._on_first_signal()
        else:
            self.exit_code = exitcodes.FORCED
            log.warning("%s again: killing %d running task(s) now", sig, len(self.runner.running))
            self.runner.stop_all(f"worker {self.hostname} was stopped by a second SIGTERM", kill_now=True)

    def _wait_then_terminate(self) -> None:
        deadline = time.monotonic() + self.settings.worker_drain_timeout
        while self.runner.running and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.runner.running and self.exit_code == exitcodes.OK:
            self.exit_code = exitcodes.DRAIN_TIMEOUT
            self.runner.stop_all(f"worker {self.hostname} drained: [asyncq] worker_drain_timeout of "
                                 f"{self.settings.worker_drain_timeout:g} s ran out")
