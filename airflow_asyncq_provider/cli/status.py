"""``airflow asyncq status``: the fleet as a table a person can read (or ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from airflow_asyncq_provider.errors import BrokerUnavailable, ConfigError
from airflow_asyncq_provider.state.urls import mask_url


def fleet_rows(workers: dict[str, dict[str, Any]], now: float) -> list[dict[str, Any]]:
    rows = []
    for name, info in sorted(workers.items()):
        beat = float(info.get("heartbeat_at") or 0)
        started = float(info.get("started_at") or 0)
        rows.append({
            "worker": name,
            "queues": ",".join(info.get("queues") or []),
            "slots": info.get("slots"),
            "running": info.get("running"),
            "free": info.get("free"),
            "heartbeat_age_s": round(now - beat, 1) if beat else None,
            "up_s": round(now - started) if started else None,
            "version": info.get("version"),
        })
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
    from airflow_asyncq_provider.settings import load_settings
    from airflow_asyncq_provider.state import registry
    from airflow_asyncq_provider.state.client import make_redis, ping_or_raise
    from airflow_asyncq_provider.state.keys import Keys

    try:
        settings = load_settings()
        client = make_redis(settings)
        ping_or_raise(client, settings, "airflow asyncq status")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    rows = fleet_rows(registry.live_workers(client, Keys(settings.key_prefix)), time.time())
    if args.json:
        print(json.dumps({"broker": mask_url(settings.broker_url), "workers": rows}, indent=2))
    else:
        print(f"broker: {mask_url(settings.broker_url)}")
        print(render_table(rows))
