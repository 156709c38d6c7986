"""The dead-letter list: messages the fleet refused to run, each with the error that refused it."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.state.translate import translated

if TYPE_CHECKING:
    import redis

#: Bytes of a non-string payload kept in a dead letter (a repr of whatever Celery handed us).
MAX_PAYLOAD_REPR = 100_000


@translated
def push(client: redis.Redis, keys: Keys, task_id: str, error: str, payload: Any, hostname: str,
         queue: str | None = None, meta: Any = None) -> None:
    record = {"id": task_id, "error": error, "hostname": hostname, "at": time.time(), "queue": queue,
              "meta": meta, "payload": payload if isinstance(payload, str) else repr(payload)[:MAX_PAYLOAD_REPR]}
    client.lpush(keys.dead_letters, json.dumps(record))


@translated
def entries(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Oldest first, each with its ``index`` for show/replay."""
    raw = client.lrange(keys.dead_letters, 0, -1)
    out = []
    for index, item in enumerate(reversed(raw)):
        try:
            record = json.loads(item)
        except ValueError:
            record = {"error": "unreadable dead-letter record", "payload": item}
        record["index"] = index
        out.append(record)
    return out


@translated
def remove(client: redis.Redis, keys: Keys, record: dict[str, Any]) -> None:
    raw = {k: v for k, v in record.items() if k != "index"}
    # LREM needs the exact stored string; find it again to avoid re-serialisation differences.
    for item in client.lrange(keys.dead_letters, 0, -1):
        try:
            if json.loads(item) == raw:
                client.lrem(keys.dead_letters, 1, item)
                return
        except ValueError:
            continue


@translated
def purge(client: redis.Redis, keys: Keys) -> int:
    count = client.llen(keys.dead_letters)
    client.delete(keys.dead_letters)
    return int(count)
