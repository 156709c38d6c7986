"""Worker registry: each worker's heartbeat is a hash with a TTL. An expired hash is a lost worker.

``WorkerInfo`` is the schema of that hash; ``health`` reads one back into a verdict. The executor, the
CLI and the fleet page all read workers through here.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.state.translate import translated

if TYPE_CHECKING:
    import redis

# A consumer loop that has not ticked for this long is stuck, even if the heartbeat thread still runs.
STUCK_AFTER = 30.0


@dataclasses.dataclass(frozen=True)
class RunningTask:
    pid: int
    pss: int
    limit: int | None
    request: int = 0
    started_at: float = 0.0
    #: the workload key (dag_id, task_id, run_id, try_number, map_index), for a link to the task
    key: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """What one heartbeat says about a worker (docs/OPERATIONS.md, ``asyncq:worker:<node>``)."""

    queues: list[str]
    slots: int
    running: int
    version: str
    pid: int
    forkserver_pid: int | None
    started_at: float
    last_claim_at: float
    consumer_tick_at: float
    draining: bool
    memory_budget: int
    memory_reserved: int
    memory_in_use: int
    tasks: dict[str, RunningTask]
    native: dict[str, Any] | None = None

    def to_record(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["free"] = self.slots - self.running
        for name in ("started_at", "last_claim_at", "consumer_tick_at"):
            record[name] = f"{record[name]:.3f}"
        return record


@translated
def heartbeat(client: redis.Redis, keys: Keys, hostname: str, info: WorkerInfo | dict[str, Any],
              ttl: float) -> None:
    fields = info.to_record() if isinstance(info, WorkerInfo) else info
    record = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    record["hostname"] = hostname
    record["heartbeat_at"] = f"{time.time():.3f}"
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.worker(hostname), mapping=record)
    pipe.pexpire(keys.worker(hostname), int(ttl * 1000))
    pipe.sadd(keys.workers, hostname)
    pipe.execute()


@translated
def unregister(client: redis.Redis, keys: Keys, hostname: str) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.worker(hostname))
    pipe.srem(keys.workers, hostname)
    pipe.execute()


@translated
def alive(client: redis.Redis, keys: Keys, hostnames: list[str]) -> dict[str, bool]:
    """One round trip for any number of hostnames; the executor asks only for hosts it has tasks on."""
    pipe = client.pipeline(transaction=False)
    for name in hostnames:
        pipe.exists(keys.worker(name))
    return {name: bool(found) for name, found in zip(hostnames, pipe.execute(), strict=True)}


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a worker's latest heartbeat says to the executor's liveness check."""

    #: the ids of the tasks it runs (``tasks``)
    task_ids: set[str]
    #: when the process that wrote the heartbeat started, on that host's clock; 0.0 if not known
    started_at: float = 0.0
    pid: int | None = None

    def started_after(self, at: float) -> bool:
        """Whether this process started after ``at`` (the same host's clock): an earlier process of the
        same node name did whatever happened at ``at``, and it is gone."""
        return self.started_at > at


@translated
def running_on(client: redis.Redis, keys: Keys, hostnames: list[str]) -> dict[str, Listing | None]:
    """For each hostname, what its latest heartbeat lists as running (``tasks``) and which process
    wrote it (``started_at``, ``pid``), or None when its heartbeat has expired (a lost worker). One
    round trip for any number of hostnames."""
    pipe = client.pipeline(transaction=False)
    for name in hostnames:
        pipe.exists(keys.worker(name))
        pipe.hmget(keys.worker(name), ["tasks", "started_at", "pid"])
    replies = pipe.execute()
    return {name: _listing(*fields) if found else None
            for name, found, fields in zip(hostnames, replies[0::2], replies[1::2], strict=True)}


def _listing(tasks: str | None, started_at: str | None, pid: str | None) -> Listing:
    """A record written by an older version, or by hand, may lack a field or garble it."""
    try:
        started = float(started_at or 0)
    except ValueError:
        started = 0.0
    return Listing(_task_ids(tasks), started, int(pid) if pid and pid.isdigit() else None)


def _task_ids(tasks: str | None) -> set[str]:
    """The keys of a ``tasks`` field; a record without one (or a garbled one) lists nothing."""
    decoded = _decode(tasks) if tasks else None
    return set(decoded) if isinstance(decoded, dict) else set()


@translated
def live_workers(client: redis.Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """Every worker whose heartbeat has not expired, with its ``maintenance`` record (or None)."""
    names = sorted(client.smembers(keys.workers))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.worker(name))
        pipe.hgetall(keys.maintenance(name))
    # One unreadable key (a hand-written value of the wrong type) must not hide the whole fleet.
    replies = pipe.execute(raise_on_error=False)
    workers: dict[str, dict[str, Any]] = {}
    gone: list[str] = []
    for name, raw, maintenance in zip(names, replies[0::2], replies[1::2], strict=True):
        if isinstance(raw, Exception):
            workers[name] = {"unreadable": f"{keys.worker(name)}: {raw}"}
            continue
        if not raw:
            gone.append(name)
            continue
        workers[name] = {k: _decode(v) for k, v in raw.items()}
        workers[name]["maintenance"] = (
            {"comment": f"unreadable maintenance record {keys.maintenance(name)}: {maintenance}"}
            if isinstance(maintenance, Exception) else maintenance or None)
    if gone:
        client.srem(keys.workers, *gone)
    return workers


# ---------------------------------------------------------------------------------------- maintenance
@translated
def set_maintenance(client: redis.Redis, keys: Keys, hostname: str, on: bool, comment: str = "",
                    by: str = "") -> None:
    """A worker in maintenance takes no new work and finishes what it runs. The record has no TTL, so
    it survives the worker's restart; it is gone only when someone turns maintenance off."""
    if on:
        client.hset(keys.maintenance(hostname), mapping={"comment": comment, "by": by,
                                                          "at": f"{time.time():.3f}"})
    else:
        client.delete(keys.maintenance(hostname))


@translated
def maintenance(client: redis.Redis, keys: Keys, hostname: str) -> dict[str, str] | None:
    return client.hgetall(keys.maintenance(hostname)) or None


def known_worker(workers: dict[str, dict[str, Any]], hostname: str) -> bool:
    return hostname in workers


def health(info: dict[str, Any], now: float) -> str:
    """ok, draining, stuck, or maintenance: the registry proves the worker *consumes*, not merely that
    it lives. A stuck consumer shows even in maintenance: it will not take work when turned back on."""
    if info.get("draining") is True:
        return "draining"
    tick = float(info.get("consumer_tick_at") or 0)
    if tick and now - tick > STUCK_AFTER:
        return f"stuck consumer ({now - tick:.0f} s)"
    if info.get("maintenance"):
        return "maintenance"
    return "ok" if tick else "starting"


def is_stuck(verdict: str) -> bool:
    return verdict.startswith("stuck")


def largest_budget(workers: dict[str, dict[str, Any]], queue: str) -> int | None:
    """The largest memory budget of the live workers consuming ``queue``; None if there are none."""
    budgets = [int(w.get("memory_budget") or 0) for w in workers.values() if queue in (w.get("queues") or [])]
    return max(budgets) if budgets else None


def consumed_queues(workers: dict[str, dict[str, Any]]) -> set[str]:
    return {q for w in workers.values() for q in (w.get("queues") or [])}


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
