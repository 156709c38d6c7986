"""The message contract between the executor and the fleet: what one workload message holds, the
checks a worker makes before it trusts one, and the one function every publisher sends it with.

A message is the Celery task ``asyncq.execute_workload`` with ``args = (payload, meta)``:

* ``payload``: the Airflow workload as JSON (``workload.model_dump_json()``), holding a short-lived token;
* ``meta``: ``{"memory_request": bytes, "memory_limit": bytes | None}`` from the task's executor_config;
* the Celery task id is the workload's pre-assigned ``external_executor_id``, so a republish of the same
  workload is claimed once.

The message is written as Celery's ``send_task`` and kombu's Redis transport write it (Celery's task
protocol 2 inside kombu's JSON envelope, pushed onto the queue's priority list), but built here and
pushed with plain ``LPUSH``: the executor then publishes a batch together with its task records in one
MULTI, without kombu's per-message publish path (about 130 µs a message, most of 1,000 workloads'
190 ms). ``tests/integration/test_messages.py`` checks it field by field against what ``send_task``
writes; the worker tests (``test_maintenance.py``) and every system test run such messages.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider.errors import MalformedMessage
from airflow_asyncq_provider.state.queues import PRIORITY_STEPS, list_name

if TYPE_CHECKING:
    import redis

EXECUTE_WORKLOAD = "asyncq.execute_workload"
WORKLOAD_TYPES = ("ExecuteTask", "ExecuteCallback")
_TI_KEY_FIELDS = ("dag_id", "task_id", "run_id", "try_number", "map_index")
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}  # protocol 2's third element


def encode_workload(*, task_id: str, payload: str, meta: dict[str, Any] | None, queue: str,
                    key: dict[str, Any] | None = None, priority: int | None = None) -> tuple[str, str]:
    """(the Redis list, the raw message) of one workload message. What Celery logs and Flower show is
    ``argsrepr``, never the payload: the payload holds a token."""
    step = min(max(int(priority or 0), PRIORITY_STEPS[0]), PRIORITY_STEPS[-1])
    label = json.dumps(key, separators=(", ", ": ")) if key else task_id
    body = json.dumps([[payload, meta], {}, _EMBED])
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": EXECUTE_WORKLOAD, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": f"(<workload {label}>)", "kwargsrepr": "{}",
            "origin": f"gen{os.getpid()}@{socket.gethostname()}",  # Celery's anon_nodename()
            "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,  # persistent
            # The default exchange routes by queue name alone, as Celery's send_task does here.
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": step,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),  # the key of kombu's unacked hash while a worker holds it
        },
    }
    return list_name(queue, step), json.dumps(message)


def send_workload(client: redis.Redis, **message: Any) -> None:
    """Publish one workload message (``encode_workload``'s arguments) on its own."""
    client.lpush(*encode_workload(**message))


def check_payload(payload: Any) -> dict[str, Any]:
    """Cheap shape check in the worker process; full validation happens in the fork server."""
    if not isinstance(payload, str):
        raise MalformedMessage(f"payload is {type(payload).__name__}, expected a JSON string")
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise MalformedMessage(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("type") not in WORKLOAD_TYPES:
        kind = data.get("type") if isinstance(data, dict) else None
        raise MalformedMessage(f"payload is not an Airflow workload (type={kind!r})")
    if not isinstance(data.get("token"), str) or not data["token"]:
        raise MalformedMessage("payload has no token")
    return data


def check_meta(meta: Any, default_request: int) -> tuple[int, int | None]:
    """(request, limit) in bytes from the executor's message metadata."""
    if meta is None:
        return default_request, None
    if not isinstance(meta, dict):
        raise MalformedMessage(f"message metadata is {type(meta).__name__}, expected an object")
    request, limit = meta.get("memory_request", default_request), meta.get("memory_limit")
    if not isinstance(request, int) or request <= 0 or (limit is not None and
                                                        (not isinstance(limit, int) or limit <= 0)):
        raise MalformedMessage(f"message metadata has an invalid memory request/limit: {meta!r}")
    return request, limit


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the api-server verifies)."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        return float(claims["exp"])
    except (IndexError, KeyError, TypeError, ValueError):
        return None


def ti_key(dag_id: str, task_id: str, run_id: str, try_number: int, map_index: int) -> dict[str, Any]:
    """The workload key of a task instance: what events and records carry to name it."""
    return dict(zip(_TI_KEY_FIELDS, (dag_id, task_id, run_id, try_number, map_index), strict=True))


def callback_key(callback_id: str) -> dict[str, Any]:
    return {"callback_id": callback_id}


def workload_key(data: dict[str, Any]) -> dict[str, Any] | None:
    """The key of a decoded payload (``check_payload``'s result)."""
    ti = data.get("ti")
    if isinstance(ti, dict):
        return {k: ti.get(k) for k in _TI_KEY_FIELDS}
    callback = data.get("callback")
    if isinstance(callback, dict):
        return callback_key(callback.get("id"))
    return None
