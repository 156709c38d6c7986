"""Worker registry: each worker's heartbeat is a hash with a TTL. An expired hash is a lost worker."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from airflow_asyncq_provider.state.keys import Keys


def heartbeat(client: redis.Redis, keys: Keys, hostname: str, info: dict[str, Any], ttl: float) -> None:
    record = {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}
    record["hostname"] = hostname
    record["heartbeat_at"] = f"{time.time():.3f}"
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.worker(hostname), mapping=record)
    pipe.pexpire(keys.worker(hostname), int(ttl * 1000))
    pipe.sadd(keys.workers, hostname)
    pipe.execute()


def unregister(client: redis.Redis, keys: Keys, hostname: str) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.worker(hostname))
    pipe.srem(keys.workers, hostname)
    pipe.execute()


def alive(client: redis.Redis, keys: Keys, hostnames: list[str]) -> dict[str, bool]:
    """One round trip for any number of hostnames; the executor asks only for hosts it has tasks on."""
    pipe = client.pipeline(transaction=False)
    for name in hostnames:
        pipe.exists(keys.worker(name))
    return {name: bool(found) for name, found in zip(hostnames, pipe.execute(), strict=True)}


def live_workers(client: redis.Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    names = sorted(client.smembers(keys.workers))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.worker(name))
    workers: dict[str, dict[str, Any]] = {}
    gone: list[str] = []
    for name, raw in zip(names, pipe.execute(), strict=True):
        if not raw:
            gone.append(name)
            continue
        workers[name] = {k: _decode(v) for k, v in raw.items()}
    if gone:
        client.srem(keys.workers, *gone)
    return workers


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
