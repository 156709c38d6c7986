"""What the executor publishes for one workload, built from Airflow's workload object.

The fields are fixed before publishing: the message id is the pre-assigned ``external_executor_id``,
the queue is the task's, and the memory request and limit come from its ``executor_config``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_asyncq_provider.settings import AsyncQSettings


@dataclasses.dataclass(frozen=True, slots=True)
class Outgoing:
    key: Any
    task_id: str
    queue: str
    priority: int
    #: The workload as JSON: all the executor keeps of it until a worker starts it, to publish it again.
    #: Airflow's pydantic object would cost about 4.6 KiB a workload, its JSON about 1 KiB.
    payload: str
    meta: dict[str, Any]
    #: The workload key carried by the record, the events and the message's ``argsrepr``, as JSON.
    key_json: str

    @property
    def label(self) -> dict[str, Any]:
        return json.loads(self.key_json)

    def with_fresh_token(self, jwt_generator: Any) -> Outgoing:
        """The same workload with a newly minted token (its old one expired while it waited); the
        token's subject is the task instance's id, or the callback's, as Airflow mints it."""
        from airflow.executors.workloads import ExecuteTask

        data = json.loads(self.payload)
        owner = data.get("ti") or data.get("callback") or {}
        data["token"] = ExecuteTask.generate_token(str(owner["id"]), jwt_generator)
        return dataclasses.replace(self, payload=json.dumps(data))


def outgoing_for(workload: Any, settings: AsyncQSettings) -> Outgoing:
    """Raises ``ConfigError`` for a bad ``executor_config`` (it fails only that task)."""
    from airflow.executors.workloads import ExecuteCallback, ExecuteTask

    from airflow_asyncq_provider.broker.config import priority_step
    from airflow_asyncq_provider.broker.messages import callback_key, ti_key
    from airflow_asyncq_provider.memory.requests import memory_spec

    if isinstance(workload, ExecuteTask):
        ti = workload.ti
        task_id = ti.external_executor_id or str(ti.id)
        key_json = json.dumps(ti_key(ti.dag_id, ti.task_id, ti.run_id, ti.try_number, ti.map_index))
        spec = memory_spec(ti.executor_config, f"{ti.dag_id}.{ti.task_id}",
                           settings.default_memory_request, settings.default_memory_limit)
        return Outgoing(ti.key, task_id, ti.queue or settings.default_queue,
                        priority_step(ti.priority_weight), workload.model_dump_json(), spec.as_meta(), key_json)
    if isinstance(workload, ExecuteCallback):
        data = workload.callback.data if isinstance(workload.callback.data, dict) else {}
        queue = data.get("queue") or settings.default_queue
        meta = {"memory_request": settings.default_memory_request,
                "memory_limit": settings.default_memory_limit}
        return Outgoing(workload.callback.key, str(workload.callback.id), queue, 0, workload.model_dump_json(),
                        meta, json.dumps(callback_key(str(workload.callback.id))))
    raise ValueError(f"AsyncQExecutor cannot run workloads of type {type(workload).__name__}")
