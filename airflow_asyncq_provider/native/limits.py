"""Time limits where signals cannot reach: threads, and coroutines that never yield.

Celery's prefork pool enforces ``soft_time_limit``/``time_limit`` with signals and by killing the child.
A lane has no child per task, so:

* ``def`` task on a thread: at the soft limit the watch raises ``SoftTimeLimitExceeded`` inside the
  thread (``PyThreadState_SetAsyncExc``), so the task can catch it and clean up as in Celery; at the hard
  limit it raises ``TimeLimitExceeded`` the same way. The exception lands at the next Python bytecode:
  a thread blocked inside C code (a socket read without timeout, ``time.sleep``) is interrupted only when
  that call returns. A thread cannot be killed, so that is the limit of what holds on a thread.
* ``async def`` task: ``asyncio.timeout`` (native/pool.py) handles every coroutine that awaits. A
  coroutine that never yields blocks the loop, so ``asyncio.timeout`` cannot fire; when the loop has
  not ticked for ``STALL`` seconds past such a task's hard limit, the watch raises ``TimeLimitExceeded``
  inside the loop thread, which fails that task and frees the loop for the others.

Exceptions are only raised while the job is inside the task body (a flag under a lock), never in
Celery's bookkeeping, and a job that ends with a raise still pending absorbs it (``absorb``).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, Terminated, TimeLimitExceeded

log = logging.getLogger(__name__)

INTERVAL = 0.1
STALL = 0.5  # seconds without a loop tick that count as "the loop is stuck in one coroutine"


def raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    return done == 1


class SyncJob:
    def __init__(self, soft: float | None, hard: float | None, timeout_callback: Any) -> None:
        now = time.monotonic()
        self.soft_at = now + soft if soft else None
        self.hard_at = now + hard if hard else None
        self.soft, self.hard = soft, hard
        self.timeout_callback = timeout_callback
        self.lock = threading.Lock()
        self.thread_id: int | None = None
        self.in_body = False
        self.raised = 0

    def enter_body(self) -> None:
        with self.lock:
            self.thread_id = threading.get_ident()
            self.in_body = True

    def leave_body(self) -> None:
        with self.lock:
            self.in_body = False

    def raise_in_body(self, exc_type: type[BaseException]) -> bool:
        """Raise ``exc_type`` in the task's thread if it is running task code now (never in Celery's)."""
        with self.lock:
            if not self.in_body or self.thread_id is None:
                return False
            self.raised += 1
            return raise_in_thread(self.thread_id, exc_type)

    def terminate(self) -> bool:
        """``revoke(terminate=True)``: raise ``Terminated`` in the task code, if it is running now."""
        return self.raise_in_body(Terminated)

    def absorb(self) -> None:
        """Swallow a limit raised just as the body ended (it is delivered at a later bytecode)."""
        if not self.raised:
            return
        try:
            for _ in range(1000):
                pass
        except (SoftTimeLimitExceeded, TimeLimitExceeded, Terminated):
            pass

    def check(self, now: float) -> None:
        for attr, exc_type, seconds, soft in (("soft_at", SoftTimeLimitExceeded, self.soft, True),
                                              ("hard_at", TimeLimitExceeded, self.hard, False)):
            due = getattr(self, attr)
            if due is None or now < due:
                continue
            if not self.raise_in_body(exc_type):
                continue
            setattr(self, attr, None)
            log.warning("%s time limit (%ss) exceeded on a sync thread; raised %s in the task",
                        "Soft" if soft else "Hard", seconds, exc_type.__name__)
            if soft and self.timeout_callback:
                self.timeout_callback(True, seconds)


class AsyncJob:
    def __init__(self, task: asyncio.Task[Any] | None, hard: float | None) -> None:
        self.task = task
        self.hard = hard
        self.hard_at = time.monotonic() + hard if hard else None


class LimitWatch:
    """One daemon thread that checks every running job's limits ``1 / INTERVAL`` times a second."""

    def __init__(self, loop_thread: Any) -> None:
        self.loop_thread = loop_thread
        self.jobs: set[Any] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="asyncq-limits", daemon=True)

    def add(self, job: Any) -> None:
        if getattr(job, "hard_at", None) is None and getattr(job, "soft_at", None) is None:
            return
        with self.lock:
            self.jobs.add(job)

    def discard(self, job: Any) -> None:
        with self.lock:
            self.jobs.discard(job)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.wait(INTERVAL):
            try:
                self.check(time.monotonic())
            except Exception:  # the watch must outlive any one bad job
                log.exception("time-limit watch failed on one pass")

    def check(self, now: float) -> None:
        with self.lock:
            jobs = list(self.jobs)
        stalled = now - self.loop_thread.tick > STALL
        for job in jobs:
            if isinstance(job, SyncJob):
                job.check(now)
            elif stalled and job.hard_at is not None and now > job.hard_at + STALL:
                self._interrupt_loop(job)

    def _interrupt_loop(self, job: AsyncJob) -> None:
        loop = self.loop_thread.loop
        if asyncio.current_task(loop) is not job.task:  # readable from another thread
            return
        ident = self.loop_thread.thread.ident
        if ident is not None and raise_in_thread(ident, TimeLimitExceeded):
            job.hard_at = None
            log.warning("A coroutine ran %ss past its time limit without yielding; raised TimeLimitExceeded "
                        "in it so the loop's other tasks can run", job.hard)
