"""``airflow asyncq dlq list|show|replay|purge``: inspect, replay and clear dead letters.

Payloads hold short-lived tokens, so ``show`` prints them with the token masked.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from airflow_asyncq_provider import exitcodes
from airflow_asyncq_provider.cli.connect import fail
from airflow_asyncq_provider.cli.status import render_table
from airflow_asyncq_provider.redaction import mask_payload


def _pick(records: list[dict[str, Any]], index: int) -> dict[str, Any]:
    if not 0 <= index < len(records):
        fail(f"no dead letter #{index}; `airflow asyncq dlq list` shows {len(records)}", exitcodes.CONFIG)
    return records[index]


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
        from airflow_asyncq_provider.broker.messages import send_workload
        from airflow_asyncq_provider.state import records

        task_id = record.get("id")
        if task_id:
            records.reset_deliveries(client, keys, task_id)  # a replay starts its delivery count afresh
        send_workload(client, task_id=task_id, payload=record.get("payload"),
                      meta=record.get("meta"), queue=queue)
        store.remove(client, keys, record)
        print(f"replayed #{args.index} ({task_id}) to queue {queue!r}")
    elif action == "purge":
        if not args.yes:
            fail("purge deletes every dead letter; add --yes to confirm", exitcodes.CONFIG)
        print(f"purged {store.purge(client, keys)} dead letter(s)")
