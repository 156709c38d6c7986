"""Every Redis key the fleet writes, in one place (the arq habit). docs/OPERATIONS.md's table of keys
is checked against this module by tests/unit/test_docs_consistency.py.

Celery's own queue lists (one per queue, plus ``<queue>\\x06\\x16<step>`` per priority step) and its
``unacked`` hash are not prefixed: kombu names them.
"""

from __future__ import annotations

import dataclasses

#: Default queue the native lane consumes and the QueueTaskOperator sends to. It must differ from every
#: queue that carries Airflow workloads: a lane cannot run an ``asyncq.execute_workload`` message.
NATIVE_QUEUE = "native"


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
    def queues(self) -> str:
        """Set of every queue the executor published a workload to: what the fleet page and
        ``airflow asyncq status`` list, without scanning the keyspace."""
        return f"{self.prefix}:queues"

    @property
    def dead_letters(self) -> str:
        """List of JSON records for messages that could not be run, with the error."""
        return f"{self.prefix}:dlq"

    def maintenance(self, hostname: str) -> str:
        """Hash without a TTL: ``comment``, ``at``, ``by`` while a worker is in maintenance (it takes no
        new work). Kept across the worker's restarts; ``airflow asyncq maintenance NODE off`` deletes it."""
        return f"{self.prefix}:maintenance:{hostname}"

    @property
    def fleet_events(self) -> str:
        """Stream of what happened to the fleet (a worker lost, a memory kill, a republished workload,
        a dead letter) for the fleet page. Trimmed to about ``FLEET_EVENTS_MAXLEN`` entries."""
        return f"{self.prefix}:fleet-events"

    @property
    def native_tasks(self) -> str:
        """Hash: native task name -> JSON {kind, queues, hostname, at}. Lanes write it at start and every
        minute; the operator reads it to refuse an unknown task name before sending."""
        return f"{self.prefix}:native:tasks"

    @property
    def native_result_prefix(self) -> str:
        """``global_keyprefix`` of Celery's Redis result backend for native tasks: results are
        ``<prefix>:native:celery-task-meta-<id>`` and published on a channel of the same name."""
        return f"{self.prefix}:native:"

    def native_result(self, task_id: str) -> str:
        """String with a TTL (``[asyncq] result_expires``): a native task's Celery result record."""
        return f"{self.native_result_prefix}celery-task-meta-{task_id}"
