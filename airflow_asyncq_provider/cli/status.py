"""``airflow asyncq status``: the fleet as tables a person can read (or ``--json``).

The data comes from ``state.overview.snapshot``, the same function the fleet page in the Airflow UI
reads; this module only turns its values into columns.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from airflow_asyncq_provider.redaction import mask_url
from airflow_asyncq_provider.sizes import MIB
from airflow_asyncq_provider.state import overview


def _mib(value: Any) -> int | None:
    return round(float(value) / MIB) if value not in (None, "") else None


def _maintenance(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    return f"on: {record.get('comment')}" if record.get("comment") else "on"


def fleet_rows(workers: dict[str, dict[str, Any]], now: float) -> list[dict[str, Any]]:
    return [{
        "worker": row["worker"], "health": row["health"], "queues": ",".join(row["queues"]),
        "slots": row["slots"], "running": row["running"], "free": row["free"],
        "mem_budget_mib": _mib(row["memory_budget"]), "mem_reserved_mib": _mib(row["memory_reserved"]),
        "mem_in_use_mib": _mib(row["memory_in_use"]), "heartbeat_age_s": row["heartbeat_age_s"],
        "up_s": row["up_s"], "version": row["version"], "native": row["native"],
        "maintenance": _maintenance(row["maintenance"]),
    } for row in overview.worker_rows(workers, now)]


def task_rows(workers: dict[str, dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    now = time.time() if now is None else now
    return [{"worker": row["worker"], "task": row["task"], "pid": row["pid"], "pss_mib": _mib(row["pss"]),
             "limit_mib": _mib(row["limit"])} for row in overview.task_rows(workers, now)]


def queue_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"queue": r["queue"], "depth": r["depth"],
             "by_priority": " ".join(f"{step}:{n}" for step, n in sorted(r["by_step"].items())) or "-",
             "oldest_s": r["oldest_age_s"], "consumers": len(r["consumers"]),
             "warning": "no live worker consumes it" if r["unconsumed"] else ""} for r in rows]


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
    now = time.time()
    workers = registry.live_workers(client, keys)
    rows, tasks = fleet_rows(workers, now), task_rows(workers, now)
    queues = queue_rows(overview.queue_rows(client, keys, workers, now))
    if args.json:
        print(json.dumps({"broker": mask_url(settings.broker_url), "workers": rows, "tasks": tasks,
                          "queues": queues}, indent=2))
        return
    print(f"broker: {mask_url(settings.broker_url)}")
    print(render_table(rows))
    if tasks:
        print("\nrunning tasks:")
        print(render_table(tasks))
    if queues:
        print("\nqueues:")
        print(render_table(queues))
