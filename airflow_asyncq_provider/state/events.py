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
    record = {"state": kind, f"{kind}_at": f"{time.time():.3f}"}
    record.update({k: _flat(v) for k, v in fields.items() if v is not None})
    event = {"id": task_id, "kind": kind, "ts": record[f"{kind}_at"]}
    event.update({k: v for k, v in record.items() if k in fields})
    pipe = client.pipeline(transaction=True)
    if kind not in (DUPLICATE, TOKEN_EXPIRED):  # neither may overwrite the real run's record
        pipe.hset(keys.task(task_id), mapping=record)
        pipe.expire(keys.task(task_id), ttl)
    pipe.xadd(keys.events, event, maxlen=maxlen, approximate=True)
    pipe.execute()


def _flat(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def latest_id(client: redis.Redis, keys: Keys) -> str:
    """The id to read from so that only events written after this call are seen."""
    last = client.xrevrange(keys.events, count=1)
    return last[0][0] if last else "0-0"


def read_since(
    client: redis.Redis, keys: Keys, last_id: str, count: int
) -> list[tuple[str, Mapping[str, str]]]:
    reply = client.xread({keys.events: last_id}, count=count)
    if not reply:
        return []
    return list(reply[0][1])
