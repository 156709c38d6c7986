"""The native task-name registry: lanes publish the names they can run, the operator refuses unknown
ones before sending."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.state.translate import translated

if TYPE_CHECKING:
    import redis


@translated
def publish_tasks(client: redis.Redis, keys: Keys, kinds: Mapping[str, str], queues: list[str],
                  hostname: str) -> int:
    """``kinds``: task name -> "async" or "sync"."""
    if kinds:
        now = round(time.time(), 3)
        client.hset(keys.native_tasks, mapping={
            name: json.dumps({"kind": kind, "queues": queues, "hostname": hostname, "at": now})
            for name, kind in kinds.items()
        })
    return len(kinds)


@translated
def lookup_task(client: redis.Redis, keys: Keys, name: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(record of ``name`` or None, the names that are registered when it is not)."""
    raw = client.hget(keys.native_tasks, name)
    if raw:
        return json.loads(raw), []
    return None, sorted(client.hkeys(keys.native_tasks))
