"""The event stream: workers append what happened, the executor reads what changed since last time.

Each event also updates the task's record in the same MULTI, so a reader that missed the stream (a
scheduler that restarted) still finds the latest state in the record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.state.records import STATE
from airflow_asyncq_provider.state.translate import translated

if TYPE_CHECKING:
    import redis

RECEIVED = "received"
STARTED = "started"
SUCCESS = "success"
FAILED = "failed"
DUPLICATE = "duplicate"
REVOKED = "revoked"
TOKEN_EXPIRED = "token_expired"
TERMINAL = frozenset({SUCCESS, FAILED, REVOKED})


@translated
def emit(
    client: redis.Redis,
    keys: Keys,
    task_id: str,
    kind: str,
    *,
    maxlen: int,
    ttl: int,
    **fields: Any,
) -> None:
    record = {STATE: kind, f"{kind}_at": f"{time.time():.3f}"}
    record.update({k: _flat(v) for k, v in fields.items() if v is not None})
    event = {"id": task_id, "kind": kind, "ts": record[f"{kind}_at"]}
    event.update({k: v for k, v in record.items() if k in fields})
    pipe = client.pipeline(transaction=True)
    if kind not in (DUPLICATE, TOKEN_EXPIRED):  # neither may overwrite the real run's record
        pipe.hset(keys.task(task_id), mapping=record)
        pipe.expire(keys.task(task_id), ttl)
    pipe.xadd(keys.events, event, maxlen=maxlen, approximate=True)
    pipe.execute()


def happened_at(record: Mapping[str, str], kind: str) -> float | None:
    """When the record's last ``kind`` event was written (``<kind>_at``, on the clock of the host that
    wrote it), or None if none was, or the field is garbled."""
    try:
        return float(record[f"{kind}_at"])
    except (KeyError, ValueError):
        return None


def _flat(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


@translated
def latest_id(client: redis.Redis, keys: Keys) -> str:
    """The id to read from so that only events written after this call are seen."""
    last = client.xrevrange(keys.events, count=1)
    return last[0][0] if last else "0-0"


@translated
def contains(client: redis.Redis, keys: Keys, stream_id: str) -> bool:
    """Whether the stream still holds ``stream_id``: after a Sentinel failover the promoted replica
    kept the stream, after a restart without persistence it is new."""
    return bool(client.xrange(keys.events, min=stream_id, max=stream_id, count=1))


@translated
def read_since(
    client: redis.Redis, keys: Keys, last_id: str, count: int, block_ms: int | None = None
) -> list[tuple[str, Mapping[str, str]]]:
    """``block_ms``: wait up to that long for the first new event (``XREAD BLOCK``); None returns at once."""
    reply = client.xread({keys.events: last_id}, count=count, block=block_ms)
    if not reply:
        return []
    return list(reply[0][1])
