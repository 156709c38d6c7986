"""Redis keys of native queue tasks. They live under the fleet's ``[asyncq] key_prefix`` like every key
in ``state/keys.py``; Celery's queue lists (``native`` by default) are unprefixed as everywhere else."""

from __future__ import annotations

import dataclasses

#: Default queue the native lane consumes and the QueueTaskOperator sends to. It must differ from every
#: queue that carries Airflow workloads: a lane cannot run an ``asyncq.execute_workload`` message.
NATIVE_QUEUE = "native"


@dataclasses.dataclass(frozen=True)
class NativeKeys:
    prefix: str = "asyncq"

    @property
    def tasks(self) -> str:
        """Hash: task name -> JSON {kind, queues, hostname, at}. Lanes write it at start and every minute;
        the operator reads it to refuse an unknown task name before sending."""
        return f"{self.prefix}:native:tasks"

    @property
    def result_prefix(self) -> str:
        """``global_keyprefix`` of Celery's Redis result backend: results are
        ``<prefix>:native:celery-task-meta-<id>`` and published on a channel of the same name."""
        return f"{self.prefix}:native:"

    def result(self, task_id: str) -> str:
        return f"{self.result_prefix}celery-task-meta-{task_id}"
