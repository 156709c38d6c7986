"""``airflow asyncq dlq list|show|replay|purge``: inspect, replay and clear dead letters.

Payloads hold short-lived tokens, so ``show`` prints them with the token masked.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from airflow_asyncq_provider.cli.status import render_table

_TOKEN = re.compile(r'("token"\s*:\s*")[^"]*(")')


def _pick(records: list[dict[str, Any]], index: int) -> dict[str, Any]:
    if not 0 <= index < len(records):
        print(f"error: no dead letter #{index}; `airflow asyncq dlq list` shows {len(records)}", file=sys.stderr)
        raise SystemExit(2)
    return records[index]


def mask_payload(payload: str) -> str:
    return _TOKEN.sub(r"\1***\2", payload)


def dlq(args: argparse.Namespace) -> None:
    from airflow_asyncq_provider.cli.connect import connect
    from airflow_asyncq_provider.state import dlq as store

    settings, client, keys = connect("airflow asyncq dlq")
    records = store.entries(client, keys)
    action = args.action
    if action == "list":
        rows = [{"#": r["index"], "id": r.get("id"), "queue": r.get("queue") or "",
                 "at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(r.get("at") or 0))),
                 "worker": r.get("hostname"), "error": str(r.get("error"))[:80]} for r in records]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(render_table(rows) if rows else "the dead-letter list is empty")
    elif action == "show":
        record = dict(_pick(records, args.index))
        record["payload"] = mask_payload(str(record.get("payload", "")))
        print(json.dumps(record, indent=2))
    elif action == "replay":
        record = _pick(records, args.index)
        queue = args.queue or record.get("queue") or settings.default_queue
        from airflow_asyncq_provider.celery_app import EXECUTE_WORKLOAD, make_celery_app

        app = make_celery_app(settings)
        task_id = record.get("id")
        if task_id:
            client.hdel(keys.task(task_id), "deliveries")  # a replay starts its delivery count afresh
        app.send_task(EXECUTE_WORKLOAD, args=(record.get("payload"), record.get("meta")), task_id=task_id,
                      queue=queue, argsrepr=f"(<replayed workload {task_id}>)", kwargsrepr="{}")
        store.remove(client, keys, record)
        print(f"replayed #{args.index} ({task_id}) to queue {queue!r}")
    elif action == "purge":
        if not args.yes:
            print("error: purge deletes every dead letter; add --yes to confirm", file=sys.stderr)
            raise SystemExit(2)
        print(f"purged {store.purge(client, keys)} dead letter(s)")
