"""What happened to the fleet, for people: a worker lost, a memory kill, a republished workload, a dead
letter. The executor and the workers append; the fleet page and ``airflow asyncq status`` read the
newest. Outcomes of tasks are not here: they are in the event stream (``events.py``)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.state.translate import translated

if TYPE_CHECKING:
    import redis

    from airflow_asyncq_provider.state.keys import Keys

WORKER_LOST = "worker_lost"
LEASE_EXPIRED = "lease_expired"
MEMORY_KILL = "memory_kill"
REPUBLISHED = "republished"
DEAD_LETTER = "dead_letter"
FLEET_EVENTS_MAXLEN = 1000


@translated
def record(client: redis.Redis, keys: Keys, kind: str, **fields: Any) -> None:
    entry = {"kind": kind, "at": f"{time.time():.3f}"}
    entry.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if v is not None})
    client.xadd(keys.fleet_events, entry, maxlen=FLEET_EVENTS_MAXLEN, approximate=True)


@translated
def recent(client: redis.Redis, keys: Keys, count: int = 50) -> list[dict[str, str]]:
    """Newest first."""
    return [dict(fields, id=stream_id) for stream_id, fields in client.xrevrange(keys.fleet_events, count=count)]
