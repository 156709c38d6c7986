"""The worker's heartbeat thread: every ``worker_heartbeat_interval`` it writes the worker's record to
the registry and runs the duties that must happen as often (renewing leases, restarting the lane)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from airflow_asyncq_provider import metrics
from airflow_asyncq_provider.state import registry

if TYPE_CHECKING:
    import redis

    from airflow_asyncq_provider.settings import AsyncQSettings
    from airflow_asyncq_provider.state.keys import Keys
    from airflow_asyncq_provider.state.registry import WorkerInfo

log = logging.getLogger("airflow_asyncq_provider.worker")


class Heartbeat(threading.Thread):
    """``info()`` builds what the registry shows; ``renew()`` renews the leases of running tasks right
    after the record is written; each of ``duties`` then runs on its own (a failing one is logged).

    One failed beat (Redis restarting) is logged and the next one tries again: the thread never dies of
    a Redis error, or the worker would look lost while it still runs tasks.
    """

    def __init__(self, settings: AsyncQSettings, client: redis.Redis, keys: Keys, hostname: str,
                 info: Callable[[], WorkerInfo], renew: Callable[[], None] | None = None,
                 duties: Sequence[Callable[[], None]] = (),
                 renewed: Callable[[float], None] | None = None) -> None:
        super().__init__(name="asyncq-heartbeat", daemon=True)
        self._settings = settings
        self._client = client
        self._keys = keys
        self._hostname = hostname
        self._info = info
        self._renew = renew
        self._duties = list(duties)
        self._renewed = renewed  # told the (monotonic) start of every beat that wrote all it had to
        self._stop_event = threading.Event()

    def beat(self) -> None:
        started = time.monotonic()  # before the record is sent: Redis starts its TTL later than this
        info = self._info()
        self._gauges(info)  # first: the gauges keep coming while Redis is away
        registry.heartbeat(self._client, self._keys, self._hostname, info,
                           ttl=self._settings.worker_lost_timeout)
        if self._renew is not None:
            self._renew()
        if self._renewed is not None:  # the record and every lease got through
            self._renewed(started)
        for duty in self._duties:  # best effort, each on its own: none may stop the leases above
            try:
                duty()
            except Exception as exc:
                log.warning("Heartbeat duty %s failed (%s: %s); it runs again next beat",
                            getattr(duty, "__name__", duty), type(exc).__name__, exc)

    def _gauges(self, info: WorkerInfo) -> None:
        tags = {"worker": self._hostname}
        metrics.gauge("asyncq.worker.slots_busy", info.running, tags)
        metrics.gauge("asyncq.worker.slots_free", max(info.slots - info.running, 0), tags)
        metrics.gauge("asyncq.worker.memory_budget", info.memory_budget, tags)
        metrics.gauge("asyncq.worker.memory_budget_used", info.memory_reserved, tags)
        metrics.gauge("asyncq.worker.memory_in_use", info.memory_in_use, tags)

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.beat()
            except Exception as exc:  # Redis restarting must not kill the heartbeat thread
                log.warning("Heartbeat to Redis failed (%s); retrying in %.0f s",
                            type(exc).__name__, self._settings.worker_heartbeat_interval)
            self._stop_event.wait(self._settings.worker_heartbeat_interval)

    def stop(self) -> None:
        self._stop_event.set()
