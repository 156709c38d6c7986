"""The fleet at a glance: workers, running tasks, queues, dead letters and recent fleet events.

``airflow asyncq status`` and the fleet page in the Airflow UI both read the fleet through
``snapshot``, so the terminal and the browser never disagree. Values are plain JSON (sizes in bytes,
ages in seconds); each reader formats them its own way.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.state import dlq, fleet_events, queues, registry
from airflow_asyncq_provider.state.translate import translated

if TYPE_CHECKING:
    import redis

    from airflow_asyncq_provider.state.keys import Keys

MAX_QUEUES = 200


def native_lane(info: dict[str, Any]) -> str:
    """The worker's native lane in a word or three: "-" when it runs none."""
    lane = info.get("native")
    if not isinstance(lane, dict):
        return "-"
    restarts = int(lane.get("restarts") or 0)
    suffix = f", {restarts} restart(s)" if restarts else ""
    if lane.get("gave_up"):
        return f"down, gave up{suffix}"
    state = "ok" if lane.get("alive") else "down"
    return f"{state} {lane.get('loop_concurrency', 0)}+{lane.get('sync_threads', 0)}{suffix}"


def worker_rows(workers: dict[str, dict[str, Any]], now: float) -> list[dict[str, Any]]:
    rows = []
    for name, info in sorted(workers.items()):
        beat = float(info.get("heartbeat_at") or 0)
        started = float(info.get("started_at") or 0)
        maintenance = info.get("maintenance") or None
        rows.append({
            "worker": name,
            "health": registry.health(info, now),
            "maintenance": maintenance,
            "queues": list(info.get("queues") or []),
            "slots": info.get("slots"),
            "running": info.get("running"),
            "free": info.get("free"),
            "memory_budget": info.get("memory_budget"),
            "memory_reserved": info.get("memory_reserved"),
            "memory_in_use": info.get("memory_in_use"),
            "heartbeat_age_s": round(now - beat, 1) if beat else None,
            "up_s": round(now - started) if started else None,
            "version": info.get("version"),
            "native": native_lane(info),
        })
    return rows


def task_rows(workers: dict[str, dict[str, Any]], now: float) -> list[dict[str, Any]]:
    rows = []
    for name, info in sorted(workers.items()):
        tasks = info.get("tasks") if isinstance(info.get("tasks"), dict) else {}
        for task_id, task in sorted(tasks.items()):
            started = float(task.get("started_at") or 0)
            rows.append({"worker": name, "task": task_id, "key": task.get("key"), "pid": task.get("pid"),
                         "runtime_s": round(now - started, 1) if started else None,
                         "pss": task.get("pss"), "request": task.get("request"), "limit": task.get("limit")})
    return rows


@translated
def known_queues(client: redis.Redis, keys: Keys, workers: dict[str, dict[str, Any]]) -> list[str]:
    """Queues a live worker consumes, plus every queue the executor published to (``keys.queues``),
    at most ``MAX_QUEUES`` of them: one SMEMBERS, whatever the size of the keyspace."""
    found = set(registry.consumed_queues(workers)) | set(client.smembers(keys.queues))
    return sorted(q for q in found if q)[:MAX_QUEUES]


def queue_rows(client: redis.Redis, keys: Keys, workers: dict[str, dict[str, Any]],
               now: float) -> list[dict[str, Any]]:
    names = known_queues(client, keys, workers)
    consumers: dict[str, list[str]] = {q: [] for q in names}
    for worker, info in sorted(workers.items()):
        for queue in info.get("queues") or []:
            consumers.setdefault(queue, []).append(worker)
    rows = []
    for depth in queues.depths(client, keys, names, now):
        rows.append({"queue": depth.queue, "depth": depth.depth,
                     "by_step": {str(k): v for k, v in depth.by_step.items() if v},
                     "oldest_age_s": depth.oldest_age, "consumers": consumers.get(depth.queue, []),
                     "unconsumed": depth.depth > 0 and not consumers.get(depth.queue)})
    return rows


def snapshot(client: redis.Redis, keys: Keys, now: float | None = None, *, with_queues: bool = True,
             dead_letters: int = 50, events: int = 50) -> dict[str, Any]:
    now = time.time() if now is None else now
    workers = registry.live_workers(client, keys)
    letters = dlq.entries(client, keys)
    return {
        "at": now,
        "workers": worker_rows(workers, now),
        "tasks": task_rows(workers, now),
        "queues": queue_rows(client, keys, workers, now) if with_queues else [],
        "dead_letters": [{k: v for k, v in r.items() if k != "payload"}
                         for r in (letters[-dead_letters:] if dead_letters > 0 else [])],
        "dead_letter_count": len(letters),
        "events": fleet_events.recent(client, keys, events) if events else [],
    }
