"""Native tasks the integration tests run on a real lane (listed with --task-modules)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from airflow_asyncq_provider.native import fleet


@fleet.task(name="t.sleep")
async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@fleet.task(name="t.sync_sleep")
def sync_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@fleet.task(name="t.add")
def add(a: int, b: int) -> int:
    return a + b


@shared_task(name="t.shared_double")
async def shared_double(x: int) -> int:
    return 2 * x


@fleet.task(name="t.whoami", bind=True)
async def whoami(self: Any) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    info = self.request.delivery_info or {}
    return {"id": self.request.id, "retries": self.request.retries, "priority": info.get("priority"),
            "pid": os.getpid()}


@fleet.task(name="t.fail")
async def fail(message: str) -> None:
    raise ValueError(message)


@fleet.task(name="t.retry", bind=True, max_retries=2)
async def retry(self: Any, succeed_on: int) -> int:
    if self.request.retries < succeed_on:
        raise self.retry(countdown=0.2)
    return self.request.retries


@fleet.task(name="t.autoretry", bind=True, autoretry_for=(ConnectionError,), dont_autoretry_for=(ConnectionResetError,),
            retry_kwargs={"max_retries": 3, "countdown": 0.1})
async def autoretry(self: Any, fail_times: int, error: str = "ConnectionError") -> int:
    await asyncio.sleep(0)
    if self.request.retries < fail_times:
        raise {"ConnectionError": ConnectionError, "ConnectionResetError": ConnectionResetError}[error]("flaky")
    return self.request.retries


@fleet.task(name="t.autoretry_sync", bind=True, autoretry_for=(ConnectionError,), retry_backoff=True,
            retry_backoff_max=1, retry_jitter=False, max_retries=2)
def autoretry_sync(self: Any, fail_times: int) -> int:
    if self.request.retries < fail_times:
        raise ConnectionError("flaky")
    return self.request.retries


@fleet.task(name="t.async_soft", soft_time_limit=0.3)
async def async_soft(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "finished"


@fleet.task(name="t.async_hard", time_limit=0.3)
async def async_hard(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "finished"


@fleet.task(name="t.spin", time_limit=0.5)
async def spin(seconds: float) -> str:
    """A coroutine that never yields."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "spun"


@fleet.task(name="t.sync_soft", soft_time_limit=0.3)
def sync_soft(seconds: float) -> str:
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            pass
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@fleet.task(name="t.sync_hard", time_limit=0.3)
def sync_hard(seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "finished"


@fleet.task(name="t.stamp", rate_limit="5/s")
def stamp() -> float:
    return time.time()


@fleet.task(name="t.big")
def big(n: int) -> str:
    return "x" * n


def _mark(key: str) -> None:
    import redis

    redis.Redis(db=15).set(key, "finished", ex=60)


@fleet.task(name="t.mark_after")
async def mark_after(key: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    _mark(key)
    return "finished"


@fleet.task(name="t.sync_mark_after")
def sync_mark_after(key: str, seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)
    _mark(key)
    return "finished"
