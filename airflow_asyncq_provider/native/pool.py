"""``NativePool``: the Celery execution pool of the native lane.

Celery's consumer, strategies and tracer stay as they are: countdown/eta (the consumer's timer),
expires and revokes (the request), rate_limit (the consumer's token buckets), priority (the Redis
transport), results, retries and signals (the tracer). The pool only decides *where* a task body runs:

* ``async def`` tasks run on one asyncio loop (uvloop when installed) in a dedicated thread, at most
  ``loop_concurrency`` at a time (an ``asyncio.Semaphore``).
* ``def`` tasks run on a thread pool of ``sync_threads`` threads.

A coroutine's outcome is handed to Celery's own tracer on a small "finisher" thread pool: the tracer
calls ``NativeTask.__call__``, which returns (or raises) the outcome, and then stores the result,
handles ``Retry``, runs ``on_success``/``on_failure`` and the signals exactly as for any task. Blocking
result writes therefore never run on the loop.

Acknowledgement: a message is acknowledged when its task *starts* (the accept callback), so messages
waiting for a slot stay unacknowledged and Celery's prefetch window (``-c`` = loop_concurrency +
sync_threads, multiplier 1) bounds how many a lane holds: up to ``loop_concurrency`` coroutines in flight
at once plus one window of waiting messages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.concurrency.base import BasePool, apply_target
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from kombu.serialization import loads, prepare_accept_content

from airflow_asyncq_provider.native.limits import AsyncJob, LimitWatch, SyncJob
from airflow_asyncq_provider.native.task import CURRENT_REQUEST, HANDOFF, await_body, is_coroutine_task

log = logging.getLogger(__name__)

FINISHER_THREADS = 4


class ApplyResult:
    """What Celery's request keeps (a weak reference) to terminate one running job on a revoke.

    ``revoke(terminate=True)`` ends here through ``Request.terminate``: a coroutine is cancelled at its
    next ``await``; a ``def`` task gets ``Terminated`` raised in its thread while it runs task code.
    Celery has already recorded the task as revoked by then.
    """

    def __init__(self, future: Future[Any], job: SyncJob | None = None) -> None:
        self.f = future
        self.job = job

    def terminate(self, signum: int | None = None) -> None:
        if self.job is not None:
            self.job.terminate()
        else:
            self.f.cancel()  # run_coroutine_threadsafe's future: cancels the asyncio task

    def get(self, timeout: float | None = None) -> Any:
        return self.f.result(timeout)

    def wait(self, timeout: float | None = None) -> None:
        try:
            self.f.result(timeout)
        except Exception:  # the outcome went to the callbacks already
            pass


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """One asyncio loop in its own thread, with a tick the limit watch reads to see a stalled loop."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.tick = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="asyncq-loop", daemon=True)

    def _beat(self) -> None:
        self.tick = time.monotonic()
        self.loop.call_later(0.1, self._beat)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._beat)
        while not self.loop.is_closed():
            try:
                self.loop.run_forever()
                return
            except (SoftTimeLimitExceeded, TimeLimitExceeded):
                # A limit aimed at a coroutine that yielded just before it landed: keep the loop.
                log.warning("A time limit interrupted the event loop itself; the loop continues")

    def start(self) -> None:
        self.thread.start()

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class NativePool(BasePool):
    """Coroutines on an event loop, plain functions on threads; see the module docstring."""

    signal_safe = False
    body_can_be_buffer = False
    task_join_will_block = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conf = self.app.conf
        self.loop_concurrency = max(1, int(conf.get("asyncq_loop_concurrency") or 1))
        self.sync_threads = max(1, int(conf.get("asyncq_sync_threads") or 1))
        self.accept = prepare_accept_content(conf.accept_content)
        self.loop_thread = LoopThread()
        self.threads = ThreadPoolExecutor(self.sync_threads, thread_name_prefix="asyncq-sync")
        self.finishers = ThreadPoolExecutor(FINISHER_THREADS, thread_name_prefix="asyncq-finish")
        self.watch = LimitWatch(self.loop_thread)
        self.slots: asyncio.Semaphore | None = None
        self.in_flight = 0
        self.idle = threading.Event()
        self.idle.set()
        self._lock = threading.Lock()
        self._running: set[ApplyResult] = set()

    # ---------------------------------------------------------------- lifecycle
    def on_start(self) -> None:
        self.loop_thread.start()

        async def make_slots() -> asyncio.Semaphore:
            return asyncio.Semaphore(self.loop_concurrency)

        self.slots = self.loop_thread.submit(make_slots()).result(10)
        self.watch.start()
        log.info("native lane pool: %d coroutine slot(s) on %s, %d sync thread(s)", self.loop_concurrency,
                 type(self.loop_thread.loop).__module__.split(".")[0], self.sync_threads)

    def on_stop(self) -> None:
        """Warm shutdown: the consumer stopped fetching; let every running task finish."""
        self.idle.wait()
        self.threads.shutdown(wait=True)
        self.finishers.shutdown(wait=True)
        self.watch.stop()
        self.loop_thread.stop()

    def on_terminate(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        self.finishers.shutdown(wait=False, cancel_futures=True)
        self.watch.stop()
        self.loop_thread.stop()

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        info.update({"loop-concurrency": self.loop_concurrency, "sync-threads": self.sync_threads,
                     "in-flight": self.in_flight})
        return info

    def _started(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.idle.clear()

    def _ended(self) -> None:
        with self._lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    # ---------------------------------------------------------------- dispatch
    def on_apply(self, target: Any, args: Any = None, kwargs: Any = None, callback: Any = None,
                 accept_callback: Any = None, timeout_callback: Any = None, soft_timeout: float | None = None,
                 timeout: float | None = None, **_: Any) -> ApplyResult:
        task = self.app.tasks.get(args[0])
        self._started()
        if task is not None and is_coroutine_task(task):
            future = self.loop_thread.submit(self._run_coroutine(
                task, target, args, kwargs, callback, accept_callback, timeout_callback, soft_timeout, timeout))
            result = ApplyResult(future)
        else:
            job = SyncJob(soft_timeout, timeout, timeout_callback)
            future = self.threads.submit(self._run_sync, job, target, args, kwargs, callback, accept_callback)
            result = ApplyResult(future, job)
        # Celery's request holds the result weakly: keep it alive while the job runs.
        self._running.add(result)
        future.add_done_callback(lambda _f: self._running.discard(result))
        return result

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        """Celery calls this with the lane's own pid, which names no job; ``ApplyResult.terminate``
        (called by the same revoke) stops the right one."""

    def _run_sync(self, job: SyncJob, target: Any, args: Any, kwargs: Any, callback: Any,
                  accept_callback: Any) -> None:
        HANDOFF.job = job
        self.watch.add(job)
        try:
            apply_target(target, args, kwargs, callback, accept_callback)
        finally:
            self.watch.discard(job)
            HANDOFF.job = None
            job.absorb()
            self._ended()

    def _decode(self, args: Any) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
        _name, _task_id, _request, body, content_type, content_encoding = args[:6]
        if content_type:
            t_args, t_kwargs, embed = loads(body, content_type, content_encoding, accept=self.accept)
        else:
            t_args, t_kwargs, embed = body
        return tuple(t_args), dict(t_kwargs), embed or {}

    async def _run_coroutine(self, task: Any, target: Any, args: Any, kwargs: Any, callback: Any,
                             accept_callback: Any, timeout_callback: Any, soft: float | None,
                             hard: float | None) -> None:
        from celery.app.task import Context

        assert self.slots is not None
        value: Any = None
        error: BaseException | None = None
        try:
            async with self.slots:
                accept_callback(os.getpid(), time.monotonic())
                try:
                    t_args, t_kwargs, embed = self._decode(args)
                    request = Context(args[2], args=list(t_args), kwargs=t_kwargs, called_directly=False,
                                      is_eager=False, hostname=self.app.conf.get("asyncq_hostname"),
                                      **embed)
                    CURRENT_REQUEST.set((task.name, request))
                    value = await self._limited(task, t_args, t_kwargs, soft, hard, timeout_callback)
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # handed to Celery's tracer, which records it
                    error = exc
        except asyncio.CancelledError:  # cold shutdown
            self._ended()
            raise
        self.finishers.submit(self._finish, args[1], value, error, target, args, kwargs, callback)

    async def _limited(self, task: Any, t_args: tuple[Any, ...], t_kwargs: dict[str, Any],
                       soft: float | None, hard: float | None, timeout_callback: Any) -> Any:
        """Run the body under ``asyncio.timeout``: the soft limit cancels it and fails the task with
        ``SoftTimeLimitExceeded``; the hard limit does the same with ``TimeLimitExceeded``, and the
        limit watch interrupts a coroutine that never yields (see native/limits.py)."""
        job = AsyncJob(asyncio.current_task(), hard)
        self.watch.add(job)
        try:
            outer = asyncio.timeout(hard)
            try:
                async with outer:
                    inner = asyncio.timeout(soft)
                    try:
                        async with inner:
                            return await await_body(task, t_args, t_kwargs)
                    except TimeoutError as exc:
                        if inner.expired():
                            if timeout_callback:
                                timeout_callback(True, soft)
                            raise SoftTimeLimitExceeded(soft) from exc
                        raise
            except TimeoutError as exc:
                if outer.expired():
                    raise TimeLimitExceeded(hard) from exc
                raise
        finally:
            self.watch.discard(job)

    def _finish(self, task_id: str, value: Any, error: BaseException | None, target: Any, args: Any,
                kwargs: Any, callback: Any) -> None:
        """On a finisher thread: let Celery's tracer record the outcome (result, retry, failure)."""
        HANDOFF.task_id, HANDOFF.value, HANDOFF.error = task_id, value, error
        try:
            apply_target(target, args, kwargs, callback)
        except Exception:
            log.exception("Recording the outcome of native task %s failed", task_id)
            if callback:
                callback((1, ExceptionInfo(), 0))
        finally:
            HANDOFF.task_id = HANDOFF.value = HANDOFF.error = None
            self._ended()
