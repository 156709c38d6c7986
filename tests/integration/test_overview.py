"""state.overview against a real Redis (DB 14, own key prefix and queues), fed the way the fleet feeds
it: records and messages through ``records.publish`` as the executor writes them, heartbeats through
``registry.heartbeat``. What the unit tier's fake cannot show: that the real lists are the ones
``depths`` counts, and that a real stream trims fleet events.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from airflow_asyncq_provider.broker.messages import encode_workload
from airflow_asyncq_provider.state import dlq, fleet_events, overview, queues, records, registry
from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.state.registry import RunningTask, WorkerInfo

pytestmark = pytest.mark.integration


def _info(queues: list[str], tasks: dict[str, RunningTask] | None = None) -> WorkerInfo:
    now = time.time()
    return WorkerInfo(queues=queues, slots=4, running=len(tasks or {}), version="0.1.0", pid=1,
                      forkserver_pid=2, started_at=now - 30, last_claim_at=0.0, consumer_tick_at=now,
                      draining=False, memory_budget=2 * 1024**3, memory_reserved=0, memory_in_use=0,
                      tasks=tasks or {})


def _publish(client, keys: Keys, queue: str, priority: int) -> str:
    task_id = f"it-{uuid.uuid4()}"
    message = encode_workload(task_id=task_id, payload='{"type": "ExecuteTask"}', meta=None, queue=queue,
                              priority=priority)
    records.publish(client, keys, [records.NewRecord(task_id, json.dumps({"dag_id": "d"}), queue, message)],
                    ttl=600)
    return task_id


def test_snapshot_of_a_fleet_fed_through_its_own_writers(redis_client, key_prefix, new_queue):
    keys = Keys(key_prefix)
    served, orphan = new_queue(), new_queue()
    _publish(redis_client, keys, served, 9)
    _publish(redis_client, keys, served, 2)
    _publish(redis_client, keys, served, 9)
    _publish(redis_client, keys, orphan, 0)
    started = time.time() - 5
    registry.heartbeat(redis_client, keys, "w1@it", _info([served], {
        "run-1": RunningTask(pid=9, pss=1024, limit=None, request=1, started_at=started)}), ttl=60)
    registry.heartbeat(redis_client, keys, "w2@it", _info([served]), ttl=60)
    registry.set_maintenance(redis_client, keys, "w2@it", True, comment="disk swap", by="it")
    dlq.push(redis_client, keys, "dead-1", "payload is not JSON", "secret payload", "w1@it", served)
    fleet_events.record(redis_client, keys, fleet_events.REPUBLISHED, task="x", worker="gone@it")

    snap = overview.snapshot(redis_client, keys)

    workers = {w["worker"]: w for w in snap["workers"]}
    assert set(workers) == {"w1@it", "w2@it"}
    assert workers["w1@it"]["health"] == "ok" and workers["w1@it"]["maintenance"] is None
    assert workers["w2@it"]["health"] == "maintenance"
    assert workers["w2@it"]["maintenance"]["comment"] == "disk swap"
    assert workers["w2@it"]["maintenance"]["by"] == "it"
    (task,) = snap["tasks"]
    assert (task["worker"], task["task"], task["pid"]) == ("w1@it", "run-1", 9)
    assert 4 <= task["runtime_s"] < 60

    rows = {q["queue"]: q for q in snap["queues"]}
    # publishing made both queues known (keys.queues), though only one is consumed
    assert {served, orphan} <= set(rows)
    assert (rows[served]["depth"], rows[served]["by_step"]) == (3, {"2": 1, "9": 2})
    assert rows[served]["consumers"] == ["w1@it", "w2@it"] and not rows[served]["unconsumed"]
    assert 0 <= rows[served]["oldest_age_s"] < 60
    assert (rows[orphan]["depth"], rows[orphan]["consumers"], rows[orphan]["unconsumed"]) == (1, [], True)

    assert snap["dead_letter_count"] == 1
    assert snap["dead_letters"][0]["id"] == "dead-1" and "payload" not in snap["dead_letters"][0]
    (event,) = snap["events"]
    assert (event["kind"], event["task"], event["worker"]) == ("republished", "x", "gone@it")


def test_oldest_age_is_the_first_published(redis_client, key_prefix, new_queue):
    """The oldest waiting workload is at the tail of its list: its record's published_at gives the age."""
    keys = Keys(key_prefix)
    queue = new_queue()
    first = _publish(redis_client, keys, queue, 5)
    _publish(redis_client, keys, queue, 5)
    redis_client.hset(keys.task(first), records.PUBLISHED_AT, f"{time.time() - 120:.3f}")
    (depth,) = queues.depths(redis_client, keys, [queue])
    assert depth.depth == 2 and 119 <= depth.oldest_age < 130


def test_fleet_events_are_trimmed_near_their_cap(redis_client, key_prefix):
    keys = Keys(key_prefix)
    for i in range(fleet_events.FLEET_EVENTS_MAXLEN + 300):
        fleet_events.record(redis_client, keys, fleet_events.WORKER_LOST, worker=f"w{i}")
    # approximate trimming removes whole stream nodes (100 entries by default), never the newest
    assert fleet_events.FLEET_EVENTS_MAXLEN <= redis_client.xlen(keys.fleet_events) \
        < fleet_events.FLEET_EVENTS_MAXLEN + 200
    newest = fleet_events.recent(redis_client, keys, count=3)
    assert [e["worker"] for e in newest] == [f"w{fleet_events.FLEET_EVENTS_MAXLEN + 300 - n}" for n in (1, 2, 3)]
