"""``NativeResultTrigger``: waits on the triggerer for native tasks' results in Redis.

Celery's Redis result backend writes a finished task's JSON record with ``SETEX`` and ``PUBLISH``es it on a
channel named like the key. The trigger subscribes to those channels first, then reads the keys once (a
result written before the subscription is not missed), then sleeps on the subscription. There is no
polling loop: the keys are read again only after a reconnect and every ``RECHECK`` seconds as a safety
net for a publish lost while the connection was down.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)

READY_STATES = {"SUCCESS", "FAILURE", "REVOKED"}
RECHECK = 30.0


class NativeResultTrigger(BaseTrigger):
    """Fires once every task in ``task_ids`` has a result, or as soon as one of them failed.

    Event payload: ``{"status": "success", "results": [...]}`` (in ``task_ids`` order),
    ``{"status": "failed", "task_id", "task_name", "exc_type", "exc_module", "exc_message", "traceback"}``,
    or ``{"status": "too_large", "task_id", "task_name", "size", "limit"}``.
    """

    def __init__(self, task_ids: list[str], task_names: list[str], max_result_bytes: int) -> None:
        super().__init__()
        self.task_ids = list(task_ids)
        self.task_names = list(task_names)
        self.max_result_bytes = max_result_bytes

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("airflow_asyncq_provider.triggers.native_result.NativeResultTrigger",
                {"task_ids": self.task_ids, "task_names": self.task_names,
                 "max_result_bytes": self.max_result_bytes})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_asyncq_provider.settings import load_settings
        from airflow_asyncq_provider.state.keys import Keys

        settings = load_settings()
        keys = [Keys(settings.key_prefix).native_result(task_id) for task_id in self.task_ids]
        done: dict[int, dict[str, Any]] = {}
        import redis

        while True:
            try:
                event = await self._wait(settings, keys, done)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("Redis connection lost while waiting for %d native result(s) (%s); reconnecting",
                            len(keys) - len(done), type(exc).__name__)
                await asyncio.sleep(1)
                continue
            yield event
            return

    async def _wait(self, settings: Any, keys: list[str], done: dict[int, dict[str, Any]]) -> TriggerEvent:
        from airflow_asyncq_provider.state.client import make_async_redis

        client = make_async_redis(settings)
        index = {key: i for i, key in enumerate(keys)}
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pending = [k for i, k in enumerate(keys) if i not in done]
            await pubsub.subscribe(*pending)
            try:
                while True:
                    pending = [k for i, k in enumerate(keys) if i not in done]
                    for key, raw in zip(pending, await client.mget(pending), strict=True):
                        event = self._take(index[key], raw, done)
                        if event is not None:
                            return event
                    if len(done) == len(keys):
                        return self._success(done)
                    deadline = asyncio.get_running_loop().time() + RECHECK
                    while len(done) < len(keys):
                        left = deadline - asyncio.get_running_loop().time()
                        if left <= 0:
                            break  # safety net: read the keys again
                        message = await pubsub.get_message(timeout=min(left, RECHECK))
                        if message is None or message.get("type") != "message":
                            continue
                        event = self._take(index[message["channel"]], message["data"], done)
                        if event is not None:
                            return event
                    if len(done) == len(keys):
                        return self._success(done)
            finally:
                await pubsub.aclose()
        finally:
            await client.aclose()

    def _take(self, i: int, raw: str | None, done: dict[int, dict[str, Any]]) -> TriggerEvent | None:
        """Record one result; return an event when it ends the wait early (failure, too large)."""
        if raw is None or i in done:
            return None
        meta = json.loads(raw)
        status = meta.get("status")
        if status not in READY_STATES:
            return None  # PENDING / STARTED / RETRY: keep waiting
        name = self.task_names[i] if i < len(self.task_names) else ""
        if status != "SUCCESS":
            result = meta.get("result") or {}
            message = result.get("exc_message")
            if isinstance(message, list):
                message = ", ".join(str(m) for m in message)
            return TriggerEvent({
                "status": "failed", "task_id": self.task_ids[i], "task_name": name, "state": status,
                "exc_type": result.get("exc_type", status), "exc_module": result.get("exc_module", ""),
                "exc_message": str(message or ""), "traceback": meta.get("traceback") or "",
            })
        size = len(json.dumps(meta.get("result")))
        if size > self.max_result_bytes:
            return TriggerEvent({"status": "too_large", "task_id": self.task_ids[i], "task_name": name,
                                 "size": size, "limit": self.max_result_bytes})
        done[i] = meta
        return None

    def _success(self, done: dict[int, dict[str, Any]]) -> TriggerEvent:
        results = [done[i].get("result") for i in range(len(self.task_ids))]
        size = len(json.dumps(results))
        if size > self.max_result_bytes:
            return TriggerEvent({"status": "too_large", "task_id": ",".join(self.task_ids),
                                 "task_name": "the group's combined results", "size": size,
                                 "limit": self.max_result_bytes})
        return TriggerEvent({"status": "success", "task_ids": self.task_ids, "results": results})
