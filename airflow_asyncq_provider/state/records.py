"""The task record: one Redis hash per workload, from publish to finish, and every operation on it.

Only this module (and ``events``, which writes the latest state into the record in the same MULTI as
the stream entry) names the record's fields. The executor writes ``key``, ``queue`` and
``published_at``, and ``sent_at`` with the message, in the same MULTI; a worker counts
``deliveries``, claims it (``claimed_by``) and renews its lease; the executor or the CLI revokes it
(``revoked``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.state.translate import translated

if TYPE_CHECKING:
    import redis

# Field names of the record hash (docs/OPERATIONS.md, "Redis keys").
KEY = "key"
QUEUE = "queue"
PUBLISHED_AT = "published_at"
SENT_AT = "sent_at"  # the message left for the broker; absent: the publisher may have died before sending
STATE = "state"
CLAIMED_BY = "claimed_by"
DELIVERIES = "deliveries"
HOSTNAME = "hostname"
REVOKED = "revoked"
REASON = "reason"

PUBLISHED = "published"  # the state of a record no worker has touched yet
STARTED = "started"


@dataclasses.dataclass(frozen=True)
class NewRecord:
    task_id: str
    key_json: str
    queue: str
    #: ``(list, raw message)`` from ``broker.messages.encode_workload``: pushed in the record's MULTI.
    message: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Claim:
    won: bool
    owner: str | None
    revoked: bool


@translated
def publish(client: redis.Redis, keys: Keys, records: Sequence[NewRecord], ttl: int) -> None:
    """One round trip and one MULTI for a batch: each record, its message and its ``sent_at`` land
    together or not at all, so a record never says "sent" for a message that is not in the queue, and
    a message never runs without its record. ``state`` is set only if no worker wrote one already (a
    republish)."""
    pipe = client.pipeline(transaction=True)
    now = f"{time.time():.3f}"
    pushes: dict[str, list[str]] = {}
    for record in records:
        name = keys.task(record.task_id)
        fields = {KEY: record.key_json, QUEUE: record.queue, PUBLISHED_AT: now}
        if record.message is not None:
            fields[SENT_AT] = now
            pushes.setdefault(record.message[0], []).append(record.message[1])
        pipe.hset(name, mapping=fields)
        pipe.hsetnx(name, STATE, PUBLISHED)
        pipe.expire(name, ttl)
    for queue_list, raws in pushes.items():
        pipe.lpush(queue_list, *raws)  # one LPUSH keeps their order: the first pushed is popped first
    if records:
        pipe.sadd(keys.queues, *{record.queue for record in records})
    pipe.execute()


@translated
def count_delivery(client: redis.Redis, keys: Keys, task_id: str, by: int = 1) -> tuple[int, str | None]:
    """(deliveries so far, who claimed it). ``by=-1`` undoes a count: a hand-back is not a delivery."""
    pipe = client.pipeline(transaction=True)
    pipe.hincrby(keys.task(task_id), DELIVERIES, by)
    pipe.hget(keys.task(task_id), CLAIMED_BY)
    deliveries, owner = pipe.execute()
    return int(deliveries), owner


@translated
def reset_deliveries(client: redis.Redis, keys: Keys, task_id: str) -> None:
    """A replayed dead letter starts its delivery count afresh."""
    client.hdel(keys.task(task_id), DELIVERIES)


@translated
def claim(client: redis.Redis, keys: Keys, task_id: str, hostname: str, ttl: int) -> Claim:
    """Atomic: the first worker to set ``claimed_by`` runs it; any later delivery is a duplicate."""
    name = keys.task(task_id)
    pipe = client.pipeline(transaction=True)
    pipe.hsetnx(name, CLAIMED_BY, hostname)
    pipe.hget(name, CLAIMED_BY)
    pipe.hget(name, REVOKED)
    pipe.expire(name, ttl)
    won, owner, revoked, _ = pipe.execute()
    return Claim(bool(won), owner, bool(revoked))


@translated
def take_lease(client: redis.Redis, keys: Keys, task_id: str, hostname: str, lease_ms: int) -> None:
    client.set(keys.lease(task_id), hostname, px=lease_ms)


@translated
def renew(client: redis.Redis, keys: Keys, task_ids: Sequence[str], hostname: str, lease_ms: int,
          ttl: int) -> set[str]:
    """Renew the leases of running tasks and re-assert their claims (a restarted Redis forgot both), in
    one round trip. Returns the ids the scheduler revoked meanwhile."""
    if not task_ids:
        return set()
    pipe = client.pipeline(transaction=False)
    for task_id in task_ids:
        name = keys.task(task_id)
        pipe.set(keys.lease(task_id), hostname, px=lease_ms)
        pipe.hsetnx(name, CLAIMED_BY, hostname)
        pipe.hsetnx(name, STATE, STARTED)
        pipe.hsetnx(name, HOSTNAME, hostname)
        pipe.expire(name, ttl)
        pipe.hget(name, REVOKED)
    replies = pipe.execute()
    return {task_id for task_id, revoked in zip(task_ids, replies[5::6], strict=True) if revoked}


@translated
def revoke(client: redis.Redis, keys: Keys, task_id: str, ttl: int) -> None:
    """Workers drop a revoked message before claiming it, and stop it within a heartbeat if running."""
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.task(task_id), REVOKED, f"{time.time():.3f}")
    pipe.expire(keys.task(task_id), ttl)
    pipe.execute()


@translated
def is_revoked(client: redis.Redis, keys: Keys, task_id: str) -> bool:
    return bool(client.hget(keys.task(task_id), REVOKED))


@translated
def read(client: redis.Redis, keys: Keys, task_ids: Iterable[str]) -> list[dict[str, str]]:
    """Whole records in one round trip; an unknown id reads as ``{}``."""
    pipe = client.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.hgetall(keys.task(task_id))
    return list(pipe.execute())


@translated
def claimants(client: redis.Redis, keys: Keys, task_ids: Iterable[str]) -> list[str | None]:
    pipe = client.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.hget(keys.task(task_id), CLAIMED_BY)
    return list(pipe.execute())


@translated
def with_leases(client: redis.Redis, keys: Keys,
                task_ids: Sequence[str]) -> list[tuple[bool, dict[str, str]]]:
    """(lease present, record) for each id, in one round trip: what the executor's liveness check reads."""
    pipe = client.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.exists(keys.lease(task_id))
        pipe.hgetall(keys.task(task_id))
    replies = pipe.execute()
    return [(bool(lease), record) for lease, record in zip(replies[0::2], replies[1::2], strict=True)]


def owner_of(record: dict[str, str]) -> str | None:
    """The node that runs (or ran) the task, as far as the record knows."""
    return record.get(HOSTNAME) or record.get(CLAIMED_BY)


def is_claimed(record: dict[str, str]) -> bool:
    return CLAIMED_BY in record


def never_sent(record: dict[str, str]) -> bool:
    """Nothing shows that its message ever left the publisher: no sent mark, and no worker touched it
    (no claim, no delivery counted, not even one a hand-back undid, no event). A record an older version
    wrote has no sent mark either, and reads the same."""
    return (SENT_AT not in record and CLAIMED_BY not in record and DELIVERIES not in record
            and record.get(STATE, PUBLISHED) == PUBLISHED)
