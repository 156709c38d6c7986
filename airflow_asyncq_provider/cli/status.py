"""``airflow asyncq status``: the fleet as a table a person can read (or ``--json``)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from airflow_asyncq_provider.state.urls import mask_url

# A consumer loop that has not ticked for this long is stuck, even if the heartbeat thread still runs.
STUCK_AFTER = 30.0
MIB = 1024**2


def _mib(value: Any) -> int | None:
    return round(float(value) / MIB) if value not in (None, "") else None


def health(info: dict[str, Any], now: float) -> str:
    """ok, draining, or stuck: the registry proves the worker *consumes*, not merely that it lives."""
    if info.get("draining") is True:
        return "draining"
    tick = float(info.get("consumer_tick_at") or 0)
    if tick and now - tick > STUCK_AFTER:
        return f"stuck consumer ({now - tick:.0f} s)"
    return "ok" if tick else "starting"


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


def fleet_rows(workers: dict[str, dict[str, Any]], now: float) -> list[dict[str, Any]]:
    rows = []
    for name, info in sorted(workers.items()):
        beat = float(info.get("heartbeat_at") or 0)
        started = float(info.get("started_at") or 0)
        rows.append({
            "worker": name,
            "health": health(info, now),
            "queues": ",".join(info.get("queues") or []),
            "slots": info.get("slots"),
            "running": info.get("running"),
            "free": info.get("free"),
            "mem_budget_mib": _mib(info.get("memory_budget")),
            "mem_reserved_mib": _mib(info.get("memory_reserved")),
            "mem_in_use_mib": _mib(info.get("memory_in_use")),
            "heartbeat_age_s": round(now - beat, 1) if beat else None,
            "up_s": round(now - started) if started else None,
            "version": info.get("version"),
            "native": native_lane(info),
        })
    return rows


def task_rows(workers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, info in sorted(workers.items()):
        tasks = info.get("tasks") if isinstance(info.get("tasks"), dict) else {}
        for task_id, task in sorted(tasks.items()):
            rows.append({"worker": name, "task": task_id, "pid": task.get("pid"),
                         "pss_mib": _mib(task.get("pss")), "limit_mib": _mib(task.get("limit"))})
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no live workers"
    headers = list(rows[0])
    cells = [[("" if r[h] is None else str(r[h])) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def status(args: argparse.Namespace) -> None:
    from airflow_asyncq_provider.cli.connect import connect
    from airflow_asyncq_provider.state import registry

    settings, client, keys = connect("airflow asyncq status")
    workers = registry.live_workers(client, keys)
    rows, tasks = fleet_rows(workers, time.time()), task_rows(workers)
    if args.json:
        print(json.dumps({"broker": mask_url(settings.broker_url), "workers": rows, "tasks": tasks}, indent=2))
    else:
        print(f"broker: {mask_url(settings.broker_url)}")
        print(render_table(rows))
        if tasks:
            print("\nrunning tasks:")
            print(render_table(tasks))
