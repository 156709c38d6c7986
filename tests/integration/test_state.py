"""state.events and state.registry against a real Redis (DB 14, a unique prefix per test)."""

from __future__ import annotations

import json
import time

import pytest

from airflow_asyncq_provider.state import events, registry
from airflow_asyncq_provider.state.keys import Keys

from ._support import wait_for

pytestmark = pytest.mark.integration

TTL = 60
MAXLEN = 10_000


@pytest.fixture
def keys(key_prefix):
    return Keys(key_prefix)


def test_keys_all_live_under_the_prefix(keys, key_prefix):
    for key in (keys.events, keys.task("t"), keys.worker("w"), keys.workers, keys.dead_letters):
        assert key.startswith(f"{key_prefix}:")


# ------------------------------------------------------------------------------------------ events
def test_latest_id_of_an_empty_stream(redis_client, keys):
    assert events.latest_id(redis_client, keys) == "0-0"
    assert events.read_since(redis_client, keys, "0-0", 10) == []


def test_emit_and_read_round_trip(redis_client, keys):
    start = events.latest_id(redis_client, keys)
    events.emit(redis_client, keys, "task-1", events.STARTED, maxlen=MAXLEN, ttl=TTL,
                hostname="w1@h", pid=4321, key={"dag_id": "d", "map_index": -1}, ignored=None)
    ((stream_id, event),) = events.read_since(redis_client, keys, start, 10)
    assert event["id"] == "task-1" and event["kind"] == events.STARTED
    assert event["hostname"] == "w1@h"
    assert event["pid"] == "4321"
    assert json.loads(event["key"]) == {"dag_id": "d", "map_index": -1}
    assert "ignored" not in event  # None fields are left out
    assert abs(float(event["ts"]) - time.time()) < 60
    assert events.latest_id(redis_client, keys) == stream_id

    record = redis_client.hgetall(keys.task("task-1"))
    assert record["state"] == events.STARTED
    assert record["started_at"] == event["ts"]
    assert record["hostname"] == "w1@h" and record["pid"] == "4321"
    assert 0 < redis_client.ttl(keys.task("task-1")) <= TTL


def test_events_keep_their_order(redis_client, keys):
    kinds = [events.RECEIVED, events.STARTED, events.SUCCESS]
    for i in range(30):
        events.emit(redis_client, keys, f"t{i}", kinds[i % 3], maxlen=MAXLEN, ttl=TTL)
    read = events.read_since(redis_client, keys, "0-0", 100)
    assert [e["id"] for _sid, e in read] == [f"t{i}" for i in range(30)]
    ids = [sid for sid, _e in read]
    assert ids == sorted(ids, key=lambda s: tuple(map(int, s.split("-"))))


def test_count_limits_a_read_and_the_rest_comes_next(redis_client, keys):
    for i in range(7):
        events.emit(redis_client, keys, f"t{i}", events.RECEIVED, maxlen=MAXLEN, ttl=TTL)
    first = events.read_since(redis_client, keys, "0-0", 3)
    assert [e["id"] for _s, e in first] == ["t0", "t1", "t2"]
    second = events.read_since(redis_client, keys, first[-1][0], 3)
    assert [e["id"] for _s, e in second] == ["t3", "t4", "t5"]
    third = events.read_since(redis_client, keys, second[-1][0], 3)
    assert [e["id"] for _s, e in third] == ["t6"]
    assert events.read_since(redis_client, keys, third[-1][0], 3) == []


def test_latest_id_hides_older_events(redis_client, keys):
    events.emit(redis_client, keys, "old", events.SUCCESS, maxlen=MAXLEN, ttl=TTL)
    mark = events.latest_id(redis_client, keys)
    events.emit(redis_client, keys, "new", events.SUCCESS, maxlen=MAXLEN, ttl=TTL)
    assert [e["id"] for _s, e in events.read_since(redis_client, keys, mark, 10)] == ["new"]


def test_a_later_event_updates_the_record(redis_client, keys):
    events.emit(redis_client, keys, "t", events.STARTED, maxlen=MAXLEN, ttl=TTL, hostname="w")
    events.emit(redis_client, keys, "t", events.FAILED, maxlen=MAXLEN, ttl=TTL, reason="boom")
    record = redis_client.hgetall(keys.task("t"))
    assert record["state"] == events.FAILED and record["reason"] == "boom"
    assert "started_at" in record and "failed_at" in record and record["hostname"] == "w"


def test_duplicate_does_not_touch_the_record(redis_client, keys):
    events.emit(redis_client, keys, "t", events.STARTED, maxlen=MAXLEN, ttl=TTL, hostname="w1")
    before = redis_client.hgetall(keys.task("t"))
    events.emit(redis_client, keys, "t", events.DUPLICATE, maxlen=MAXLEN, ttl=TTL, hostname="w2",
                reason="already claimed by w1")
    assert redis_client.hgetall(keys.task("t")) == before
    last = events.read_since(redis_client, keys, "0-0", 10)[-1][1]
    assert last["kind"] == events.DUPLICATE and last["hostname"] == "w2"


def test_stream_is_trimmed_near_maxlen(redis_client, keys):
    for i in range(3000):
        events.emit(redis_client, keys, f"t{i}", events.RECEIVED, maxlen=1000, ttl=TTL)
    # approximate trimming keeps at least maxlen and not much more
    assert 1000 <= redis_client.xlen(keys.events) < 1500


# ------------------------------------------------------------------------------------------ registry
def test_heartbeat_registers_and_decodes(redis_client, keys):
    registry.heartbeat(redis_client, keys, "w1@h", {"queues": ["a", "b"], "slots": 4, "version": "0.1.0"},
                       ttl=10)
    workers = registry.live_workers(redis_client, keys)
    assert list(workers) == ["w1@h"]
    info = workers["w1@h"]
    assert info["queues"] == ["a", "b"] and info["slots"] == 4 and info["hostname"] == "w1@h"
    assert abs(info["heartbeat_at"] - time.time()) < 60
    assert 0 < redis_client.pttl(keys.worker("w1@h")) <= 10_000
    assert registry.alive(redis_client, keys, ["w1@h", "ghost"]) == {"w1@h": True, "ghost": False}


def test_alive_of_no_hosts(redis_client, keys):
    assert registry.alive(redis_client, keys, []) == {}


def test_heartbeat_expiry_means_lost(redis_client, keys):
    registry.heartbeat(redis_client, keys, "short@h", {"slots": 1}, ttl=0.3)
    registry.heartbeat(redis_client, keys, "long@h", {"slots": 1}, ttl=30)
    assert registry.alive(redis_client, keys, ["short@h", "long@h"]) == {"short@h": True, "long@h": True}
    wait_for(lambda: not registry.alive(redis_client, keys, ["short@h"])["short@h"], 5,
             "the short heartbeat to expire")
    assert registry.alive(redis_client, keys, ["long@h"]) == {"long@h": True}
    # live_workers leaves out the expired worker and prunes it from the set
    assert list(registry.live_workers(redis_client, keys)) == ["long@h"]
    assert redis_client.smembers(keys.workers) == {"long@h"}


def test_renewed_heartbeat_stays_alive(redis_client, keys):
    for _ in range(4):
        registry.heartbeat(redis_client, keys, "w@h", {"slots": 1}, ttl=0.5)
        time.sleep(0.2)
    assert registry.alive(redis_client, keys, ["w@h"]) == {"w@h": True}


def test_unregister(redis_client, keys):
    registry.heartbeat(redis_client, keys, "w@h", {"slots": 1}, ttl=30)
    registry.unregister(redis_client, keys, "w@h")
    assert registry.live_workers(redis_client, keys) == {}
    assert not redis_client.exists(keys.worker("w@h"), keys.workers)
