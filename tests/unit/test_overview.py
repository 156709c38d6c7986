"""state.overview (worker, task and queue rows, the snapshot), state.queues.depths and state.fleet_events
against an in-memory Redis.

tests/unit/conftest.py's FakeRedis lacks the list and scan commands these read (LLEN, LINDEX, LRANGE,
SCAN, SREM), so ``OverviewRedis`` below adds them for this file only. Queue messages are shaped as
kombu writes them (a JSON body whose ``headers.id`` is the Celery task id), LPUSHed so the oldest is at
the tail.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any

import pytest

from airflow_asyncq_provider.state import dlq, fleet_events, overview, queues, registry
from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.state.records import PUBLISHED_AT

from .conftest import FakeRedis

NOW = 1_000_000.0
KEYS = Keys("unit")


class OverviewRedis(FakeRedis):
    """FakeRedis plus what the overview reads: lists by index, key scans, set removal."""

    def __init__(self) -> None:
        super().__init__()
        self.xadd_options: list[dict[str, Any]] = []

    def llen(self, key: str) -> int:
        self._cmd("LLEN")
        return len(self.lists.get(key, []))

    def lindex(self, key: str, index: int) -> str | None:
        self._cmd("LINDEX")
        items = self.lists.get(key, [])
        return items[index] if -len(items) <= index < len(items) else None

    def lrange(self, key: str, start: int, end: int) -> list[str]:
        self._cmd("LRANGE")
        items = self.lists.get(key, [])
        return items[start:] if end == -1 else items[start:end + 1]

    def scan_iter(self, match: str = "*", count: int | None = None) -> Any:
        self._cmd("SCAN")
        names = [*self.hashes, *self.lists, *self.strings, *self.sets, *self.other_streams]
        return iter([n for n in names if fnmatch.fnmatchcase(n, match)])

    def srem(self, key: str, *members: str) -> int:
        self._cmd("SREM")
        found = self.sets.get(key, set())
        removed = len(found & set(members))
        found.difference_update(members)
        return removed

    def xadd(self, name: str, fields: dict[str, Any], **options: Any) -> str:
        self.xadd_options.append(options)
        return super().xadd(name, fields)


@pytest.fixture
def fake() -> OverviewRedis:
    return OverviewRedis()


def _message(task_id: str) -> str:
    """A queue message as kombu's Redis transport stores it (the fields depths reads)."""
    return json.dumps({"body": "e30=", "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": {"id": task_id, "task": "asyncq.execute_workload"},
                       "properties": {"priority": 0, "delivery_tag": task_id}})


def _enqueue(fake: OverviewRedis, queue: str, step: int, task_id: str, published_at: float | None) -> None:
    fake.lpush(queues.list_name(queue, step), _message(task_id))
    if published_at is not None:
        fake.hset(KEYS.task(task_id), mapping={PUBLISHED_AT: f"{published_at:.3f}"})


def _bind(fake: OverviewRedis, queue: str) -> None:
    """What records.publish does for every queue the executor publishes to."""
    fake.sets.setdefault(KEYS.queues, set()).add(queue)


def _worker(**overrides: Any) -> dict[str, Any]:
    """A live worker's registry record as ``registry.live_workers`` returns it (decoded)."""
    info: dict[str, Any] = {
        "queues": ["default"], "slots": 8, "running": 1, "free": 7, "memory_budget": 8 * 1024**3,
        "memory_reserved": 256 * 1024**2, "memory_in_use": 100 * 1024**2, "heartbeat_at": NOW - 2.04,
        "started_at": NOW - 600.4, "consumer_tick_at": NOW - 1, "version": "0.1.0", "draining": False,
        "maintenance": None,
        "tasks": {"t1": {"pid": 41, "pss": 90 * 1024**2, "request": 256 * 1024**2, "limit": None,
                         "started_at": NOW - 12.34, "key": {"dag_id": "d", "task_id": "t"}}},
    }
    info.update(overrides)
    return info


# ------------------------------------------------------------------------------------------ worker rows
def test_worker_rows_are_sorted_and_derived():
    rows = overview.worker_rows({"b@h": _worker(), "a@h": _worker(queues=["x", "y"])}, NOW)
    assert [r["worker"] for r in rows] == ["a@h", "b@h"]
    assert rows[1] == {
        "worker": "b@h", "health": "ok", "maintenance": None, "queues": ["default"], "slots": 8,
        "running": 1, "free": 7, "memory_budget": 8 * 1024**3, "memory_reserved": 256 * 1024**2,
        "memory_in_use": 100 * 1024**2, "heartbeat_age_s": 2.0, "up_s": 600, "version": "0.1.0",
        "native": "-",
    }
    assert rows[0]["queues"] == ["x", "y"]


def test_worker_rows_tolerate_a_record_without_fields():
    (row,) = overview.worker_rows({"w": {}}, NOW)
    assert row["health"] == "starting"
    assert (row["heartbeat_age_s"], row["up_s"], row["queues"], row["maintenance"]) == (None, None, [], None)


def test_a_worker_in_maintenance_shows_its_record():
    record = {"comment": "kernel upgrade", "by": "cli:ops", "at": f"{NOW - 60:.3f}"}
    (row,) = overview.worker_rows({"w": _worker(maintenance=record)}, NOW)
    assert row["health"] == "maintenance"
    assert row["maintenance"] == record


def test_an_empty_maintenance_record_is_no_maintenance():
    (row,) = overview.worker_rows({"w": _worker(maintenance={})}, NOW)
    assert (row["health"], row["maintenance"]) == ("ok", None)


def test_draining_wins_over_maintenance():
    """A worker in maintenance that got SIGTERM is on its way out: that is what the operator needs."""
    (row,) = overview.worker_rows({"w": _worker(draining=True, maintenance={"comment": "x"})}, NOW)
    assert row["health"] == "draining"


def test_a_consumer_that_stopped_ticking_is_stuck():
    (row,) = overview.worker_rows({"w": _worker(consumer_tick_at=NOW - registry.STUCK_AFTER - 5)}, NOW)
    assert row["health"] == f"stuck consumer ({registry.STUCK_AFTER + 5:.0f} s)"


def test_a_stuck_consumer_shows_even_in_maintenance():
    info = _worker(maintenance={"comment": "x"}, consumer_tick_at=NOW - registry.STUCK_AFTER - 5)
    (row,) = overview.worker_rows({"w": info}, NOW)
    assert registry.is_stuck(row["health"])


@pytest.mark.parametrize(("lane", "shown"), [
    (None, "-"),
    ({"alive": True, "loop_concurrency": 50, "sync_threads": 2}, "ok 50+2"),
    ({"alive": False, "loop_concurrency": 50, "sync_threads": 2, "restarts": 1}, "down 50+2, 1 restart(s)"),
    ({"alive": False, "gave_up": True, "restarts": 5}, "down, gave up, 5 restart(s)"),
])
def test_worker_rows_describe_the_native_lane(lane, shown):
    (row,) = overview.worker_rows({"w": _worker(native=lane)}, NOW)
    assert row["native"] == shown


# ------------------------------------------------------------------------------------------ task rows
def test_task_rows_flatten_every_workers_tasks_in_order():
    b_tasks = {"t2": {"pid": 2, "started_at": NOW - 1.26}, "t1": {"pid": 1, "started_at": 0}}
    rows = overview.task_rows({"b@h": _worker(tasks=b_tasks), "a@h": _worker()}, NOW)
    assert [(r["worker"], r["task"]) for r in rows] == [("a@h", "t1"), ("b@h", "t1"), ("b@h", "t2")]
    assert rows[0] == {"worker": "a@h", "task": "t1", "key": {"dag_id": "d", "task_id": "t"}, "pid": 41,
                       "runtime_s": 12.3, "pss": 90 * 1024**2, "request": 256 * 1024**2, "limit": None}
    assert rows[1]["runtime_s"] is None  # no start time recorded
    assert rows[2]["runtime_s"] == 1.3 and rows[2]["key"] is None


@pytest.mark.parametrize("tasks", [None, [], "garbage", {}])
def test_task_rows_skip_a_worker_without_a_task_mapping(tasks):
    assert overview.task_rows({"w": _worker(tasks=tasks)}, NOW) == []


# ------------------------------------------------------------------------------------------ depths
def test_depths_count_every_priority_step_and_age_the_oldest(fake):
    _enqueue(fake, "q", 0, "urgent", NOW - 5)
    _enqueue(fake, "q", 9, "old", NOW - 40.04)  # first in, so at the tail
    _enqueue(fake, "q", 9, "new", NOW - 1)
    _enqueue(fake, "q", 3, "unrecorded", None)
    (depth,) = queues.depths(fake, KEYS, ["q"], NOW)
    assert depth.queue == "q"
    assert depth.by_step == {0: 1, 1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 0, 7: 0, 8: 0, 9: 2}
    assert depth.depth == 4
    assert depth.oldest_age == 40.0  # the tails are "urgent", "old" and "unrecorded"; "old" is oldest


def test_depths_of_an_empty_and_an_unknown_queue(fake):
    fake.lists["busy"] = [_message("x")]
    empty, busy = queues.depths(fake, KEYS, ["nothing", "busy"], NOW)
    assert (empty.queue, empty.depth, empty.oldest_age) == ("nothing", 0, None)
    assert set(empty.by_step) == set(queues.PRIORITY_STEPS)
    assert (busy.depth, busy.oldest_age) == (1, None)  # a message without a record has no age


def test_depths_of_no_queues(fake):
    assert queues.depths(fake, KEYS, [], NOW) == []


@pytest.mark.parametrize("raw", ["not json", json.dumps({"headers": {}}), json.dumps([1, 2]), "null"])
def test_depths_count_a_message_they_cannot_read(fake, raw):
    fake.lists[queues.list_name("q", 4)] = [raw]
    (depth,) = queues.depths(fake, KEYS, ["q"], NOW)
    assert (depth.by_step[4], depth.oldest_age) == (1, None)


def test_depths_cost_the_same_round_trips_for_any_number_of_queues(fake):
    names = [f"q{i}" for i in range(20)]
    for i, name in enumerate(names):
        _enqueue(fake, name, i % 10, f"t{i}", NOW - i)
    fake.commands.clear()
    found = queues.depths(fake, KEYS, names, NOW)
    assert [d.depth for d in found] == [1] * 20
    assert found[7].oldest_age == 7.0
    assert fake.pipelines_executed == 3  # the lengths, the tails, the records: never per queue
    assert set(fake.commands) == {"LLEN", "LINDEX", "HGET"}


def test_list_names_are_kombus_names():
    assert queues.list_name("default", 0) == "default"
    assert [queues.list_name("q", s) for s in (1, 9)] == ["q\x06\x161", "q\x06\x169"]
    assert queues.PRIORITY_STEPS == list(range(10))


# ------------------------------------------------------------------------------------------ queue rows
def test_queue_rows_join_depths_with_their_consumers(fake):
    _bind(fake, "default")
    _bind(fake, "orphan")
    _enqueue(fake, "default", 9, "a", NOW - 3)
    _enqueue(fake, "default", 2, "b", NOW - 1)
    _enqueue(fake, "orphan", 5, "c", NOW - 90)
    workers = {"w2@h": _worker(queues=["default", "idle"]), "w1@h": _worker(queues=["default"])}
    rows = {r["queue"]: r for r in overview.queue_rows(fake, KEYS, workers, NOW)}
    assert list(rows) == ["default", "idle", "orphan"]  # sorted: bound or consumed
    assert rows["default"] == {"queue": "default", "depth": 2, "by_step": {"2": 1, "9": 1},
                               "oldest_age_s": 3.0, "consumers": ["w1@h", "w2@h"], "unconsumed": False}
    assert rows["idle"] == {"queue": "idle", "depth": 0, "by_step": {}, "oldest_age_s": None,
                            "consumers": ["w2@h"], "unconsumed": False}
    assert rows["orphan"]["unconsumed"] is True and rows["orphan"]["consumers"] == []
    assert rows["orphan"]["oldest_age_s"] == 90.0


def test_an_empty_queue_without_consumers_is_not_flagged(fake):
    _bind(fake, "gone")
    (row,) = overview.queue_rows(fake, KEYS, {}, NOW)
    assert (row["queue"], row["depth"], row["unconsumed"]) == ("gone", 0, False)


def test_known_queues_read_one_set_and_never_scan(fake):
    _bind(fake, "default")
    assert overview.known_queues(fake, KEYS, {"w": _worker(queues=["idle"])}) == ["default", "idle"]
    assert "SCAN" not in fake.commands


def test_a_user_queue_whose_name_starts_with_celery_is_listed(fake):
    _bind(fake, "celery_heavy")
    assert overview.known_queues(fake, KEYS, {"w": _worker(queues=["celery_heavy"])}) == ["celery_heavy"]


def test_known_queues_stop_at_the_cap(fake, monkeypatch):
    monkeypatch.setattr(overview, "MAX_QUEUES", 5)
    for i in range(12):
        _bind(fake, f"q{i:02d}")
    assert len(overview.known_queues(fake, KEYS, {})) == 5


# ------------------------------------------------------------------------------------------ fleet events
def test_fleet_events_keep_strings_encode_the_rest_and_drop_none(fake, monkeypatch):
    monkeypatch.setattr(fleet_events.time, "time", lambda: NOW)
    fleet_events.record(fake, KEYS, fleet_events.MEMORY_KILL, task="t1", worker="w@h",
                        key={"dag_id": "d"}, used=3 * 1024**2, limit=None)
    (stream_id, fields), = fake.other_streams[KEYS.fleet_events]
    assert fields == {"kind": "memory_kill", "at": f"{NOW:.3f}", "task": "t1", "worker": "w@h",
                      "key": '{"dag_id": "d"}', "used": str(3 * 1024**2)}
    assert fake.xadd_options == [{"maxlen": fleet_events.FLEET_EVENTS_MAXLEN, "approximate": True}]


def test_recent_fleet_events_are_newest_first_with_their_ids(fake):
    for kind in (fleet_events.WORKER_LOST, fleet_events.REPUBLISHED, fleet_events.DEAD_LETTER):
        fleet_events.record(fake, KEYS, kind, worker="w@h")
    recent = fleet_events.recent(fake, KEYS, count=2)
    assert [e["kind"] for e in recent] == ["dead_letter", "republished"]
    assert [e["id"] for e in recent] == ["3-0", "2-0"]
    assert fleet_events.recent(fake, KEYS) == fleet_events.recent(fake, KEYS, count=50)
    assert len(fleet_events.recent(fake, KEYS)) == 3


def test_no_fleet_events_yet(fake):
    assert fleet_events.recent(fake, KEYS) == []


# ------------------------------------------------------------------------------------------ snapshot
def _live(fake: OverviewRedis, name: str, maintenance: dict[str, str] | None = None, **fields: Any) -> None:
    """A worker as its heartbeat leaves it in Redis (JSON-encoded fields)."""
    info = {k: v for k, v in _worker(**fields).items() if k != "maintenance"}
    fake.hset(KEYS.worker(name), mapping={k: json.dumps(v) for k, v in info.items()})
    fake.sets.setdefault(KEYS.workers, set()).add(name)
    if maintenance:
        fake.hset(KEYS.maintenance(name), mapping=maintenance)


def test_snapshot_reads_the_whole_fleet(fake):
    _live(fake, "w1@h", maintenance={"comment": "disk", "by": "cli:ops", "at": "1.0"})
    _live(fake, "w2@h", queues=["default", "high_mem"])
    fake.sets[KEYS.workers].add("expired@h")  # its heartbeat hash is gone
    _bind(fake, "default")
    _enqueue(fake, "default", 9, "waiting", NOW - 4)
    for i in range(3):
        dlq.push(fake, KEYS, f"dead{i}", "payload is not JSON", f"payload {i}", "w2@h", "default")
    fleet_events.record(fake, KEYS, fleet_events.WORKER_LOST, worker="gone@h")

    snap = overview.snapshot(fake, KEYS, NOW, dead_letters=2, events=10)
    assert snap["at"] == NOW
    assert [(w["worker"], w["health"]) for w in snap["workers"]] == [("w1@h", "maintenance"), ("w2@h", "ok")]
    assert snap["workers"][0]["maintenance"]["comment"] == "disk"
    assert "expired@h" not in fake.sets[KEYS.workers]  # pruned on read
    assert [(t["worker"], t["task"]) for t in snap["tasks"]] == [("w1@h", "t1"), ("w2@h", "t1")]
    assert [(q["queue"], q["depth"], q["consumers"]) for q in snap["queues"]] == [
        ("default", 1, ["w1@h", "w2@h"]), ("high_mem", 0, ["w2@h"])]
    assert snap["dead_letter_count"] == 3
    assert [d["id"] for d in snap["dead_letters"]] == ["dead1", "dead2"]  # the newest two, oldest first
    assert all("payload" not in d for d in snap["dead_letters"])  # payloads hold tokens
    assert [e["kind"] for e in snap["events"]] == ["worker_lost"]


def test_snapshot_without_queues_or_events_reads_neither(fake):
    _live(fake, "w@h")
    _bind(fake, "default")
    fleet_events.record(fake, KEYS, fleet_events.WORKER_LOST, worker="gone@h")
    fake.commands.clear()
    snap = overview.snapshot(fake, KEYS, NOW, with_queues=False, events=0)
    assert (snap["queues"], snap["events"]) == ([], [])
    assert not {"SCAN", "LLEN", "XREVRANGE"} & set(fake.commands)


def test_snapshot_with_no_dead_letters_asked_shows_none(fake):
    dlq.push(fake, KEYS, "dead", "error", "payload", "w@h", "default")
    snap = overview.snapshot(fake, KEYS, NOW, dead_letters=0)
    assert snap["dead_letters"] == [] and snap["dead_letter_count"] == 1
