"""``NativeTask``: the base class of every task on the fleet app.

It adds three things to Celery's ``Task`` and changes nothing else:

* ``is_coroutine`` tells the lane whether a task is ``async def``.
* ``self.request`` also resolves from a context variable, so many coroutines interleaving on one thread
  each see their own request (Celery's request stack is per thread, not per coroutine).
* ``__call__`` hands a result computed by the lane to Celery's tracer (see ``native/pool.py``), runs an
  ``async def`` task to completion under ``task_always_eager``, and marks the body of a ``def`` task so
  the lane's time-limit watch only interrupts task code.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from typing import Any

from celery import Task

# (task name, Context) of the coroutine running in the current asyncio task.
CURRENT_REQUEST: contextvars.ContextVar[tuple[str, Any] | None] = contextvars.ContextVar(
    "asyncq_native_request", default=None)


class Handoff(threading.local):
    """Per finisher thread: the outcome of a coroutine, waiting for the tracer to ask for it."""

    task_id: str | None = None
    value: Any = None
    error: BaseException | None = None
    job: Any = None  # per sync thread: the lane's job record (time-limit watch)


HANDOFF = Handoff()


def is_coroutine_task(task: Any) -> bool:
    run = getattr(task, "_orig_run", None) or task.run  # _orig_run: autoretry_for wraps run
    return inspect.iscoroutinefunction(inspect.unwrap(run))


class NativeTask(Task):
    """Base of tasks defined with ``@fleet.task`` or ``shared_task`` on the fleet app."""

    @property
    def is_coroutine(self) -> bool:
        return is_coroutine_task(self)

    def _get_request(self) -> Any:
        current = CURRENT_REQUEST.get()
        if current is not None and current[0] == self.name:
            return current[1]
        return super()._get_request()

    request = property(_get_request)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if HANDOFF.task_id is not None and HANDOFF.task_id == self.request.id:
            value, error = HANDOFF.value, HANDOFF.error
            HANDOFF.task_id = HANDOFF.value = HANDOFF.error = None
            if error is not None:
                raise error
            return value
        if self.is_coroutine:
            if self.request.is_eager:
                return _run_eagerly(self, args, kwargs)
            return super().__call__(*args, **kwargs)  # a direct call: a coroutine for the caller to await
        job = HANDOFF.job
        if job is None:
            return super().__call__(*args, **kwargs)
        job.enter_body()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            job.leave_body()


async def await_body(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Await an ``async def`` task's body, honouring ``autoretry_for`` and ``retry_backoff``.

    Celery's autoretry wrapper (celery/app/autoretry.py) is synchronous: around a coroutine function it
    only sees the coroutine being created, never the exception raised when it is awaited. So the
    wrapped body (``_orig_run``) is awaited here and the wrapper's rules are applied to what it
    raises. The decorator's options are class attributes of the task, which is where they are read.
    """
    from celery.exceptions import Ignore, Retry
    from celery.utils.time import get_exponential_backoff_interval

    body = getattr(task, "_orig_run", None)
    if body is None:
        return await task.run(*args, **kwargs)
    try:
        return await body(*args, **kwargs)
    except (Ignore, Retry):
        raise
    except Exception as exc:
        if (not isinstance(exc, tuple(getattr(task, "autoretry_for", ()) or ()))
                or isinstance(exc, tuple(getattr(task, "dont_autoretry_for", ()) or ()))):
            raise
        options = dict(getattr(task, "retry_kwargs", None) or {})
        backoff = float(getattr(task, "retry_backoff", False) or 0)
        if backoff:
            options["countdown"] = get_exponential_backoff_interval(
                factor=int(max(1.0, backoff)), retries=task.request.retries,
                maximum=int(getattr(task, "retry_backoff_max", 600)),
                full_jitter=getattr(task, "retry_jitter", True))
        raise task.retry(exc=exc, **options) from exc


def _run_eagerly(task: NativeTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``task_always_eager`` / ``task.apply()``: run the coroutine to completion on a fresh loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        request = task.request

        async def main() -> Any:
            CURRENT_REQUEST.set((task.name, request))
            return await await_body(task, args, kwargs)

        return asyncio.run(main())
    raise RuntimeError(
        f"{task.name} is async def and was applied eagerly inside a running event loop; "
        f"await {task.name.rsplit('.', 1)[-1]}(...) directly in async tests instead")
