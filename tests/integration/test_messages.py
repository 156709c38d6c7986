"""The workload message as ``broker.messages`` writes it, against what Celery's ``send_task`` and kombu's
Redis transport write for the same workload, on a real Redis; and kombu reading ours back.

A real worker running such a message: every test of ``test_maintenance.py`` publishes this way, and so
does the executor in every system test.
"""

from __future__ import annotations

import json

import pytest

from airflow_asyncq_provider.broker.config import make_celery_app
from airflow_asyncq_provider.broker.messages import EXECUTE_WORKLOAD, encode_workload, send_workload
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state.queues import list_name

from ._support import REDIS_URL

pytestmark = pytest.mark.integration

#: What differs between two publishes of the same workload whoever writes them.
PER_MESSAGE = {"delivery_tag"}
#: Celery's extras, which no worker reads: the reply queue of its RPC result backend (we have none), and
#: a copy of argsrepr/kwargsrepr in the properties (the worker and Flower read the headers' copy).
CELERY_ONLY = {"reply_to", "argsrepr", "kwargsrepr"}


def _by_celery(queue: str, **fields) -> str:
    app = make_celery_app(AsyncQSettings(broker_url=REDIS_URL))
    try:
        label = json.dumps(fields["key"], separators=(", ", ": "))
        app.send_task(EXECUTE_WORKLOAD, args=(fields["payload"], fields["meta"]), task_id=fields["task_id"],
                      queue=queue, priority=fields["priority"], argsrepr=f"(<workload {label}>)",
                      kwargsrepr="{}")
    finally:
        app.close()
    return list_name(queue, fields["priority"])


@pytest.mark.parametrize("priority", [0, 3, 9])
def test_the_message_is_the_one_celery_writes(redis_client, new_queue, priority):
    fields = {"task_id": f"it-msg-{priority}", "payload": '{"type": "ExecuteTask", "token": "t"}',
              "meta": {"memory_request": 1024, "memory_limit": None}, "key": {"dag_id": "d", "map_index": -1},
              "priority": priority}
    theirs_list = _by_celery(celery_queue := new_queue(), **fields)
    ours_list, raw = encode_workload(queue=(our_queue := new_queue()), **fields)
    assert ours_list == list_name(our_queue, priority) and theirs_list == list_name(celery_queue, priority)

    (theirs,) = [json.loads(m) for m in redis_client.lrange(theirs_list, 0, -1)]
    ours = json.loads(raw)
    theirs["properties"]["delivery_info"]["routing_key"] = our_queue  # the one intended difference
    assert ours["headers"] == theirs["headers"]
    assert ours["body"] == theirs["body"]
    assert {k: v for k, v in ours.items() if k not in ("headers", "properties")} == \
           {k: v for k, v in theirs.items() if k not in ("headers", "properties")}
    drop = PER_MESSAGE | CELERY_ONLY
    assert {k: v for k, v in ours["properties"].items() if k not in drop} == \
           {k: v for k, v in theirs["properties"].items() if k not in drop}
    assert set(ours["properties"]) - set(theirs["properties"]) == set()


def test_kombu_reads_it_back_in_publish_order_and_priority_first(redis_client, new_queue):
    queue = new_queue()
    for task_id, priority in (("late-1", 9), ("urgent", 0), ("late-2", 9)):
        send_workload(redis_client, task_id=task_id, payload='{"type": "ExecuteTask"}', meta=None, queue=queue,
                      priority=priority)
    app = make_celery_app(AsyncQSettings(broker_url=REDIS_URL))
    try:
        with app.connection_for_read() as connection:
            simple = connection.SimpleQueue(queue)
            try:
                got = []
                for _ in range(3):
                    message = simple.get(timeout=10)
                    assert message.headers["task"] == EXECUTE_WORKLOAD
                    assert message.payload[0] == ['{"type": "ExecuteTask"}', None]
                    got.append(message.headers["id"])
                    message.ack()
            finally:
                simple.close()
    finally:
        app.close()
    assert got == ["urgent", "late-1", "late-2"]
