"""Integration-tier fixtures: a real Redis (DB 14 only), unique key prefixes and queues.

A missing Redis fails the test that needs it; nothing in this tier skips. Each test deletes only the
keys it created: ``<prefix>:*`` for the fleet's state, and its own queue's lists and kombu bindings.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ._support import REDIS_DB, REDIS_HOST, REDIS_PORT, REDIS_URL, delete_prefix, queue_keys


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, decode_responses=True,
                         socket_timeout=5, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"the integration tier needs Redis at {REDIS_URL} ({exc}); start Redis there",
                    pytrace=False)
    return client


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"it-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_prefix(redis_client, prefix)


@pytest.fixture
def new_queue(redis_client: redis.Redis) -> Iterator[Callable[[], str]]:
    """Makes unique queue names; every one made is deleted (lists and bindings) afterwards."""
    made: list[str] = []

    def make() -> str:
        made.append(f"itq_{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield make
    for name in made:
        redis_client.delete(*queue_keys(name))


@pytest.fixture
def queue_name(new_queue: Callable[[], str]) -> str:
    return new_queue()


@pytest.fixture
def make_workload():
    """A valid ExecuteTask (token non-empty), as the scheduler would queue it."""
    from airflow.executors.workloads import BundleInfo, ExecuteTask, TaskInstanceDTO

    def make(**ti_fields: Any) -> Any:
        fields: dict[str, Any] = {
            "id": uuid.uuid4(), "task_id": "t", "dag_id": "it_dag", "run_id": "manual__1",
            "try_number": 1, "dag_version_id": uuid.uuid4(), "map_index": -1, "pool_slots": 1,
            "priority_weight": 1, "queue": "default", "external_executor_id": str(uuid.uuid4()),
        }
        fields.update(ti_fields)
        return ExecuteTask(ti=TaskInstanceDTO(**fields), dag_rel_path=Path("it_dag.py"), token="it-token",
                           log_path="dag_id=it_dag/attempt=1.log", bundle_info=BundleInfo(name="dags-folder"))

    return make
