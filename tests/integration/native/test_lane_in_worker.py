"""The native lane as `airflow asyncq worker` runs it: killed, it is restarted and serves again, and
`airflow asyncq status` says so. Real worker, real Redis (DB 14); missing Redis fails."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery import Celery

from airflow_asyncq_provider.broker.config import native_config
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import registry
from airflow_asyncq_provider.state.keys import Keys
from tests.integration._support import (
    REDIS_URL,
    WorkerProcess,
    airflow_env,
    delete_prefix,
    queue_keys,
    run_airflow,
    wait_for,
)

pytestmark = [pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture()
def worker(tmp_path: Path, redis_client: redis.Redis) -> Iterator[Any]:
    from celery.utils.nodenames import host_format

    uid = uuid.uuid4().hex[:8]
    prefix, queue, native_queue = f"it-lane-{uid}", f"itq_{uid}", f"itn_{uid}"
    env = airflow_env(tmp_path, broker_url=REDIS_URL, key_prefix=prefix, worker_heartbeat_interval="1",
                      worker_lost_timeout="10", task_modules="tests.integration.native.tasks")
    env["PYTHONPATH"] = str(ROOT)
    proc = WorkerProcess(["-q", queue, "-c", "1", "--hostname", f"{uid}@%h", "--skip-serve-logs",
                          "--loop-concurrency", "5", "--sync-threads", "1", "--native-queues", native_queue],
                         env, tmp_path / "worker.log")
    keys, hostname = Keys(prefix), host_format(f"{uid}@%h")
    try:
        yield proc, keys, hostname, native_queue, env, prefix
    finally:
        code = proc.stop()
        delete_prefix(redis_client, prefix)
        redis_client.delete(*queue_keys(queue), *queue_keys(native_queue))
        assert code == 0, proc.output()[-3000:]


def lane_of(client: redis.Redis, keys: Keys, hostname: str) -> dict[str, Any]:
    return (registry.live_workers(client, keys).get(hostname) or {}).get("native") or {}


def test_a_killed_lane_is_restarted_and_serves_again(worker: Any, redis_client: redis.Redis) -> None:
    proc, keys, hostname, native_queue, env, prefix = worker
    first = wait_for(lambda: lane_of(redis_client, keys, hostname).get("alive") and
                     lane_of(redis_client, keys, hostname), 90, lambda: f"a live lane\n{proc.output()[-3000:]}")
    assert first["restarts"] == 0 and first["loop_concurrency"] == 5 and first["queues"] == [native_queue]
    psutil.Process(first["pid"]).send_signal(signal.SIGKILL)
    again = wait_for(lambda: (lane := lane_of(redis_client, keys, hostname)).get("restarts") == 1
                     and lane.get("alive") and lane, 30, lambda: f"a restarted lane\n{proc.output()[-3000:]}")
    assert again["pid"] != first["pid"]
    assert "exited with code -9; restarting it" in proc.output()

    app = Celery("it-lane-sender", set_as_current=False)
    app.conf.update(native_config(AsyncQSettings(broker_url=REDIS_URL, key_prefix=prefix)))
    try:
        assert app.send_task("t.add", args=[2, 3], queue=native_queue).get(timeout=60) == 5
    finally:
        app.close()

    status = run_airflow(["asyncq", "status", "--json"], env)
    assert status.returncode == 0, status.stderr
    (row,) = [w for w in json.loads(status.stdout)["workers"] if w["worker"] == hostname]
    assert row["native"] == "ok 5+1, 1 restart(s)"
    assert proc.alive()
