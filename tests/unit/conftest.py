"""Unit-tier fixtures: a stub config source, a small in-memory Redis, workload and executor factories.

Nothing here opens a socket. The fake Redis implements only the commands the code under test uses, and
records every command so tests can assert what the executor asked Redis for.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state.keys import Keys


class StubConf:
    """Stands in for Airflow's config: ``get(section, key, fallback=...)`` over dicts.

    Keyword arguments are ``[asyncq]`` options; ``sections`` holds any other section's values.
    """

    def __init__(self, sections: dict[str, dict[str, Any]] | None = None, **values: Any) -> None:
        self.sections = {**(sections or {}), "asyncq": values}
        self.values = values
        self.asked: list[tuple[str, str]] = []

    def get(self, section: str, key: str, fallback: Any = None) -> Any:
        self.asked.append((section, key))
        return self.sections.get(section, {}).get(key, fallback)


def workload_messages(fake: FakeRedis) -> list[dict[str, Any]]:
    """The workload messages in the fake's lists, decoded as a worker would, oldest first in each list."""
    found = []
    for name, items in fake.lists.items():
        for raw in reversed(items):
            message = json.loads(raw)
            if not isinstance(message, dict) or "headers" not in message:
                continue  # a dead letter, not a message
            args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            found.append({"list": name, "task_id": message["headers"]["id"], "args": args, "kwargs": kwargs,
                          "argsrepr": message["headers"]["argsrepr"],
                          "priority": message["properties"]["priority"]})
    return found


class FakePipeline:
    """Queues calls and runs them against the fake on ``execute`` (no real transaction semantics)."""

    def __init__(self, redis: FakeRedis) -> None:
        self._redis = redis
        self._ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        if not hasattr(self._redis, name) or name.startswith("_"):
            raise AttributeError(name)

        def queue(*args: Any, **kwargs: Any) -> FakePipeline:
            self._ops.append((name, args, kwargs))
            return self

        return queue

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self._redis.pipelines_executed += 1
        if self._redis.fail_with is not None:
            raise self._redis.fail_with
        ops, self._ops = self._ops, []
        return [getattr(self._redis, name)(*args, **kwargs) for name, args, kwargs in ops]


class FakeRedis:
    """Just enough of redis.Redis (decode_responses=True) for the executor's and the runner's calls."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.ttls: dict[str, int] = {}
        self.stream: list[tuple[str, dict[str, str]]] = []  # the event stream (``<prefix>:events``)
        self.other_streams: dict[str, list[tuple[str, dict[str, str]]]] = {}  # fleet events and the like
        self.lists: dict[str, list[str]] = {}
        self.strings: dict[str, str] = {}
        self.sets: dict[str, set[str]] = {}
        self.run_id = "fake-run-1"
        self.commands: list[str] = []
        self.pipelines_executed = 0
        self.fail_with: BaseException | None = None
        self.closed = False

    def _cmd(self, name: str) -> None:
        self.commands.append(name)
        if self.fail_with is not None:
            raise self.fail_with

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    def hset(self, key: str, field: str | None = None, value: Any = None,
             mapping: dict[str, Any] | None = None) -> int:
        self._cmd("HSET")
        record = self.hashes.setdefault(key, {})
        items = dict(mapping or {})
        if field is not None:
            items[field] = value
        added = sum(1 for k in items if k not in record)
        record.update({k: str(v) for k, v in items.items()})
        return added

    def hsetnx(self, key: str, field: str, value: Any) -> bool:
        self._cmd("HSETNX")
        record = self.hashes.setdefault(key, {})
        if field in record:
            return False
        record[field] = str(value)
        return True

    def hget(self, key: str, field: str) -> str | None:
        self._cmd("HGET")
        return self.hashes.get(key, {}).get(field)

    def hmget(self, key: str, fields: list[str], *more: str) -> list[str | None]:
        self._cmd("HMGET")
        return [self.hashes.get(key, {}).get(field) for field in [*fields, *more]]

    def hgetall(self, key: str) -> dict[str, str]:
        self._cmd("HGETALL")
        return dict(self.hashes.get(key, {}))

    def hincrby(self, key: str, field: str, amount: int = 1) -> int:
        self._cmd("HINCRBY")
        record = self.hashes.setdefault(key, {})
        record[field] = str(int(record.get(field, 0)) + amount)
        return int(record[field])

    def set(self, key: str, value: Any, px: int | None = None, **_: Any) -> bool:
        self._cmd("SET")
        self.strings[key] = str(value)
        if px is not None:
            self.ttls[key] = px
        return True

    def smembers(self, key: str) -> set[str]:
        self._cmd("SMEMBERS")
        return set(self.sets.get(key, set()))

    def sadd(self, key: str, *members: str) -> int:
        self._cmd("SADD")
        found = self.sets.setdefault(key, set())
        added = len(set(members) - found)
        found.update(members)
        return added

    def info(self, section: str | None = None) -> dict[str, Any]:
        self._cmd("INFO")
        return {"run_id": self.run_id}

    def expire(self, key: str, seconds: int) -> bool:
        self._cmd("EXPIRE")
        self.ttls[key] = int(seconds)
        return key in self.hashes

    def exists(self, key: str) -> int:
        self._cmd("EXISTS")
        return int(key in self.hashes or key in self.strings)

    def lpush(self, key: str, *values: Any) -> int:
        self._cmd("LPUSH")
        items = self.lists.setdefault(key, [])
        for value in values:
            items.insert(0, str(value))
        return len(items)

    def _stream(self, name: str) -> list[tuple[str, dict[str, str]]]:
        return self.stream if name.endswith(":events") else self.other_streams.setdefault(name, [])

    def xadd(self, name: str, fields: dict[str, Any], **_: Any) -> str:
        self._cmd("XADD")
        stream = self._stream(name)
        stream_id = f"{len(stream) + 1}-0"
        stream.append((stream_id, {k: str(v) for k, v in fields.items()}))
        return stream_id

    def xread(self, streams: dict[str, str], count: int | None = None, block: int | None = None) -> list[Any]:
        self._cmd("XREAD" if block is None else f"XREAD BLOCK {block}")  # never blocks: a test is single-threaded
        ((name, last),) = streams.items()
        newer = [(i, f) for i, f in self.stream if _sid(i) > _sid(last)][:count]
        return [[name, newer]] if newer else []

    def xrange(self, name: str, min: str = "-", max: str = "+", count: int | None = None) -> list[Any]:
        self._cmd("XRANGE")
        lo = (0, 0) if min == "-" else _sid(min)
        hi = (2**63, 0) if max == "+" else _sid(max)
        return [(i, f) for i, f in self._stream(name) if lo <= _sid(i) <= hi][:count]

    def xrevrange(self, name: str, count: int | None = None) -> list[Any]:
        self._cmd("XREVRANGE")
        return list(reversed(self._stream(name)))[:count]

    def close(self) -> None:
        self.closed = True


def _sid(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@pytest.fixture
def stub_conf() -> type[StubConf]:
    return StubConf


@pytest.fixture
def fake_redis() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def make_ti_dto():
    from airflow.executors.workloads import TaskInstanceDTO

    def make(**overrides: Any) -> Any:
        fields: dict[str, Any] = {
            "id": uuid.uuid4(), "task_id": "t", "dag_id": "d", "run_id": "r", "try_number": 1,
            "dag_version_id": uuid.uuid4(), "map_index": -1, "pool_slots": 1, "priority_weight": 1,
            "queue": "default", "external_executor_id": str(uuid.uuid4()),
        }
        fields.update(overrides)
        return TaskInstanceDTO(**fields)

    return make


@pytest.fixture
def make_workload(make_ti_dto):
    """A valid ExecuteTask; ``token`` is non-empty, as the scheduler's always is."""
    from airflow.executors.workloads import BundleInfo, ExecuteTask

    def make(**ti_fields: Any) -> Any:
        return ExecuteTask(ti=make_ti_dto(**ti_fields), dag_rel_path=Path("dag.py"), token="tok",
                           log_path="dag_id=d/run_id=r/task_id=t/attempt=1.log",
                           bundle_info=BundleInfo(name="dags-folder"))

    return make


@pytest.fixture
def executor(fake_redis):
    """An AsyncQExecutor wired to the fake Redis as if ``start()`` had run (no Celery app)."""
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    ex = AsyncQExecutor()
    ex.settings = AsyncQSettings(broker_url="redis://:hunter2@fake-redis:6379/0", key_prefix="unit",
                                 default_queue="fallback_q", publish_max_retries=2)
    ex.keys = Keys("unit")
    ex._redis = fake_redis
    return ex
