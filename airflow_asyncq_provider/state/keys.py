"""Every Redis key the fleet writes, in one place (the arq habit)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Keys:
    prefix: str = "asyncq"

    @property
    def events(self) -> str:
        """Stream of worker-written events (received, started, finished...)."""
        return f"{self.prefix}:events"

    def task(self, task_id: str) -> str:
        """Hash: one task's record from publish to finish; the claim is a field in it."""
        return f"{self.prefix}:task:{task_id}"

    def lease(self, task_id: str) -> str:
        """String with a TTL, renewed by the worker running the task. Gone means nobody runs it."""
        return f"{self.prefix}:lease:{task_id}"

    def worker(self, hostname: str) -> str:
        """Hash with a TTL: a worker's heartbeat. Gone means the worker is lost."""
        return f"{self.prefix}:worker:{hostname}"

    @property
    def workers(self) -> str:
        """Set of every hostname that ever registered (entries whose heartbeat expired are pruned)."""
        return f"{self.prefix}:workers"

    @property
    def dead_letters(self) -> str:
        """List of JSON records for messages that could not be run, with the error."""
        return f"{self.prefix}:dlq"
