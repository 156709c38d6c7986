"""The benchmark's native task (the lane imports it with --task-modules bench.native.tasks)."""

from __future__ import annotations

import asyncio

from airflow_asyncq_provider.native import fleet


@fleet.task(name="bench.sleep")
async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds
