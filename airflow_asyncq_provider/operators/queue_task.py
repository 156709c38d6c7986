"""``QueueTaskOperator``: call a native queue task from a DAG and put its result into XCom.

It sends the task to the fleet (JSON, checked before sending), then defers on
``NativeResultTrigger``, which waits on the triggerer for the result in Redis without holding a worker
slot. ``QueueTaskGroupOperator`` sends several signatures at once and returns their results in order.
Nothing heavy is imported at DAG parse time: Celery and Redis load inside ``execute``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

DEFAULT_MAX_RESULT_BYTES = 1024 * 1024


class _NativeTaskBase(BaseOperator):
    def __init__(self, *, native_queue: str | None, deferrable: bool, wait_for_result: bool,
                 check_task_name: bool, max_result_bytes: int, airflow_queue: str | None,
                 **operator_kwargs: Any) -> None:
        if airflow_queue is not None:
            operator_kwargs["queue"] = airflow_queue
        super().__init__(**operator_kwargs)
        self.native_queue = native_queue
        self.deferrable = deferrable
        self.wait_for_result = wait_for_result
        self.check_task_name = check_task_name
        self.max_result_bytes = max_result_bytes

    # ------------------------------------------------------------------ subclass hook
    def signatures(self) -> list[Any]:
        raise NotImplementedError

    def shape(self, results: list[Any]) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ Airflow
    def execute(self, context: Any) -> Any:
        from airflow_asyncq_provider.native import client
        from airflow_asyncq_provider.settings import load_settings
        from airflow_asyncq_provider.state.client import make_redis

        sigs = self.signatures()
        for sig in sigs:
            client.check_arguments(sig)
        settings = load_settings()
        if self.check_task_name:
            client.check_registered(make_redis(settings), settings.key_prefix, [s.task_name for s in sigs])
        ti = context["ti"]
        base = f"{ti.dag_id}/{ti.task_id}/{ti.run_id}/{ti.map_index}/{ti.try_number}"
        task_ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"asyncq-native/{base}/{i}")) for i in range(len(sigs))]
        for sig, task_id in zip(sigs, task_ids, strict=True):
            client.send(sig, task_id, store_result=self.wait_for_result)
            self.log.info("Sent native task %s[%s] to queue %s (priority %s, countdown %s)", sig.task_name,
                          task_id, sig.queue or "native", sig.priority, sig.countdown)
        if not self.wait_for_result:
            return self.shape(task_ids)
        trigger = self._trigger(task_ids, [s.task_name for s in sigs])
        if self.deferrable:
            self.defer(trigger=trigger, method_name="execute_complete", timeout=self.execution_timeout)
        return self.execute_complete(context, _wait_here(trigger))

    def _trigger(self, task_ids: list[str], names: list[str]) -> Any:
        from airflow_asyncq_provider.triggers.native_result import NativeResultTrigger

        return NativeResultTrigger(task_ids, names, self.max_result_bytes)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from airflow_asyncq_provider.native.client import remote_error
        from airflow_asyncq_provider.native.errors import ResultTooLarge

        status = event.get("status")
        if status == "success":
            self.log.info("Native task(s) %s finished", ", ".join(event.get("task_ids", [])))
            return self.shape(event["results"])
        if status == "too_large":
            raise ResultTooLarge(
                f"native task {event['task_name']}[{event['task_id']}] returned {event['size']} bytes of "
                f"JSON, more than max_result_bytes={event['limit']} accepted into XCom; write the data to a "
                "file or object store in the task and return its path instead (or raise max_result_bytes)")
        error = remote_error(event)
        self.log.error("Native task %s[%s] failed remotely with %s: %s\nRemote traceback:\n%s",
                       event.get("task_name"), event.get("task_id"), error.remote_type,
                       event.get("exc_message"), error.remote_traceback)
        raise error


def _wait_here(trigger: Any) -> dict[str, Any]:
    """deferrable=False: run the trigger's wait in this worker slot."""
    import asyncio

    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise RuntimeError("the result trigger ended without an event")

    return asyncio.run(first())


class QueueTaskOperator(_NativeTaskBase):
    """Send one native queue task and return its JSON result as XCom ``return_value``.

    :param task_name: registered name of the native task, e.g. ``asyncq.examples.fetch_page`` (templated)
    :param args: positional arguments, JSON-serializable (templated)
    :param kwargs: keyword arguments, JSON-serializable (templated)
    :param queue: native queue to send to; default the fleet's ``native`` queue (templated). This is not
        the Airflow queue this operator itself runs on: use ``airflow_queue`` for that.
    :param priority: 0..9 on Redis, 0 is served first
    :param countdown: seconds before the task may start
    :param expires: seconds after which an unstarted task is revoked instead of run
    :param deferrable: wait on the triggerer (default) instead of holding a worker slot
    :param wait_for_result: False sends fire-and-forget (no result is stored); XCom is then the task id
    :param check_task_name: refuse a name no native lane registered, before sending
    :param max_result_bytes: largest JSON result accepted into XCom
    :param airflow_queue: the Airflow queue of this operator's own task instance
    """

    template_fields: Sequence[str] = ("task_name", "task_args", "task_kwargs", "native_queue")

    def __init__(self, *, task_name: str, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None,
                 queue: str | None = None, priority: int | None = None, countdown: float | None = None,
                 expires: float | None = None, deferrable: bool = True, wait_for_result: bool = True,
                 check_task_name: bool = True, max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
                 airflow_queue: str | None = None, **operator_kwargs: Any) -> None:
        super().__init__(native_queue=queue, deferrable=deferrable, wait_for_result=wait_for_result,
                         check_task_name=check_task_name, max_result_bytes=max_result_bytes,
                         airflow_queue=airflow_queue, **operator_kwargs)
        self.task_name = task_name
        self.task_args = list(args or [])
        self.task_kwargs = dict(kwargs or {})
        self.priority = priority
        self.countdown = countdown
        self.expires = expires

    def signatures(self) -> list[Any]:
        from airflow_asyncq_provider.native.client import Signature

        return [Signature(self.task_name, tuple(self.task_args), dict(self.task_kwargs), self.native_queue,
                          self.priority, self.countdown, self.expires)]

    def shape(self, results: list[Any]) -> Any:
        return results[0]


class QueueTaskGroupOperator(_NativeTaskBase):
    """Send several native tasks at once; XCom ``return_value`` is their results in the given order.

    :param signatures: list of task names or dicts ``{"task_name", "args", "kwargs", "queue", "priority",
        "countdown", "expires"}`` (templated). The first failure fails this task.
    :param queue: default native queue of signatures that name none (templated)

    The other parameters are those of :class:`QueueTaskOperator`; ``max_result_bytes`` bounds each
    result and their combined size.
    """

    template_fields: Sequence[str] = ("task_signatures", "native_queue")

    def __init__(self, *, signatures: Sequence[Any], queue: str | None = None, deferrable: bool = True,
                 wait_for_result: bool = True, check_task_name: bool = True,
                 max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES, airflow_queue: str | None = None,
                 **operator_kwargs: Any) -> None:
        super().__init__(native_queue=queue, deferrable=deferrable, wait_for_result=wait_for_result,
                         check_task_name=check_task_name, max_result_bytes=max_result_bytes,
                         airflow_queue=airflow_queue, **operator_kwargs)
        self.task_signatures = list(signatures)

    def signatures(self) -> list[Any]:
        from airflow_asyncq_provider.native.client import Signature

        if not self.task_signatures:
            raise ValueError(f"{self.task_id}: signatures is empty; give at least one native task")
        return [Signature.of(spec, queue=self.native_queue) for spec in self.task_signatures]

    def shape(self, results: list[Any]) -> Any:
        return list(results)


__all__ = ["DEFAULT_MAX_RESULT_BYTES", "QueueTaskGroupOperator", "QueueTaskOperator"]
