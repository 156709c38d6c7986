"""What waits in the broker: each queue's depth per priority step and its oldest waiting workload.

kombu's Redis transport names the lists, not us: a queue ``q`` is the list ``q`` for priority step 0
and ``q\\x06\\x16<step>`` for steps 1-9 (kombu/transport/redis.py, ``_q_for_pri``; ``sep``), each
LPUSHed and BRPOPed, so the oldest message is at the tail. A message fetched but not yet acknowledged
sits in the ``unacked`` hash instead. KEDA's redis-lists scaler reads the same list names.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from airflow_asyncq_provider.state.records import PUBLISHED_AT
from airflow_asyncq_provider.state.translate import translated

if TYPE_CHECKING:
    import redis

    from airflow_asyncq_provider.state.keys import Keys

# kombu's Redis transport keeps one list per priority step and pops the lowest step first
# (kombu/transport/redis.py: `_q_for_pri`, BRPOP key order), so step 0 is the most urgent.
PRIORITY_STEPS = list(range(10))
#: kombu's separator between a queue's name and its priority step.
PRIORITY_SEP = "\x06\x16"


def list_name(queue: str, step: int) -> str:
    """The Redis list that holds ``queue``'s messages of priority ``step`` (0 is served first)."""
    return queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"


@dataclasses.dataclass(frozen=True)
class QueueDepth:
    queue: str
    by_step: dict[int, int]
    #: seconds the oldest waiting workload has waited (from its record's ``published_at``), if known
    oldest_age: float | None

    @property
    def depth(self) -> int:
        return sum(self.by_step.values())


@translated
def depths(client: redis.Redis, keys: Keys, queues: Sequence[str], now: float | None = None) -> list[QueueDepth]:
    """Three round trips for any number of queues: the lengths, the tail of each non-empty list, and
    the records of those oldest messages."""
    now = time.time() if now is None else now
    names = [(queue, step, list_name(queue, step)) for queue in queues for step in PRIORITY_STEPS]
    pipe = client.pipeline(transaction=False)
    for _queue, _step, name in names:
        pipe.llen(name)
    lengths = pipe.execute()
    busy = [name for (_q, _s, name), length in zip(names, lengths, strict=True) if length]
    pipe = client.pipeline(transaction=False)
    for name in busy:
        pipe.lindex(name, -1)
    oldest_ids = {name: _message_id(raw) for name, raw in zip(busy, pipe.execute(), strict=True)}
    pipe = client.pipeline(transaction=False)
    for task_id in oldest_ids.values():
        pipe.hget(keys.task(task_id or "-"), PUBLISHED_AT)
    published = dict(zip(oldest_ids, pipe.execute(), strict=True)) if oldest_ids else {}
    out = []
    for queue in queues:
        by_step = {step: int(length) for (q, step, _n), length in zip(names, lengths, strict=True) if q == queue}
        times = [float(published[list_name(queue, s)]) for s in PRIORITY_STEPS
                 if published.get(list_name(queue, s))]
        out.append(QueueDepth(queue, by_step, round(now - min(times), 1) if times else None))
    return out


def _message_id(raw: str | None) -> str | None:
    """The Celery task id of a raw kombu message (its ``headers.id``)."""
    try:
        return str(json.loads(raw or "")["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return None
