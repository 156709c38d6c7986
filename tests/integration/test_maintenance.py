"""Maintenance mode against a real ``airflow asyncq worker``: no new work, running work finishes, the
state survives a restart, and the CLI's answers.

No api-server runs in this tier, so Airflow's supervisor would fail every workload at once. The fork
server therefore preloads a stand-in for it (written to a temporary directory and named in
``[asyncq] fork_preload_modules``): ``BaseExecutor.run_workload`` sleeps for the seconds named in the
task id (``sleep_<seconds>``) and returns exit code 0. Everything else is the real worker: Celery's
consumer, the admission gate, the claim, the fork, the events. The real supervisor is the system tier's.

The worker heartbeats (and re-reads its maintenance record) every second. The tests wait on what the
worker does: its log lines, its heartbeats, its records and events, each with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from airflow_asyncq_provider.broker.config import make_celery_app
from airflow_asyncq_provider.broker.messages import encode_workload, ti_key
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import events, records, registry
from airflow_asyncq_provider.state.keys import Keys

from ._support import REDIS_URL, WorkerProcess, airflow_env, delete_prefix, queue_keys, run_airflow, wait_for
from .test_worker import HEARTBEAT, Fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STANDIN_MODULE = "asyncq_it_supervisor_standin"
STANDIN = '''"""Stands in for Airflow's supervisor in the fork server (tests/integration/test_maintenance.py)."""
import time

from airflow.executors.base_executor import BaseExecutor


def _run_workload(workload, **_):
    time.sleep(float(workload.ti.task_id.rpartition("_")[2]))  # the workload's run time
    return 0


BaseExecutor.run_workload = staticmethod(_run_workload)
'''
#: How soon a worker must take work once maintenance is off: one heartbeat to read the record, then
#: the consumer's next poll.
TAKES_WORK_WITHIN = 5.0


# ------------------------------------------------------------------------------------------ the worker
def _env(home: Path, prefix: str) -> dict[str, str]:
    standin = home / "standin"
    standin.mkdir(exist_ok=True)
    (standin / f"{STANDIN_MODULE}.py").write_text(STANDIN)
    env = airflow_env(home, broker_url=REDIS_URL, key_prefix=prefix, worker_heartbeat_interval=str(HEARTBEAT),
                      worker_lost_timeout=str(5 * HEARTBEAT), fork_preload_modules=STANDIN_MODULE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(standin), os.environ.get("PYTHONPATH")) if p)
    return env


def _start(fleet_args: dict[str, Any], log_name: str) -> WorkerProcess:
    """Start ``airflow asyncq worker`` and wait until it heartbeats and Celery says it is ready."""
    client, keys, hostname = fleet_args["redis"], fleet_args["keys"], fleet_args["hostname"]
    worker = WorkerProcess(["-q", fleet_args["queue"], "-c", "2", "--hostname", fleet_args["node"],
                            "--skip-serve-logs"], fleet_args["env"], fleet_args["home"] / log_name)
    fleet_args["worker"] = worker  # stopped by _maintenance_fleet whatever happens next
    wait_for(lambda: not worker.alive() or registry.alive(client, keys, [hostname])[hostname], 90,
             "the worker's first heartbeat")
    wait_for(lambda: not worker.alive() or f"{hostname} ready." in worker.output(), 60,
             "Celery to report the worker ready")
    assert worker.alive(), f"the worker exited with {worker.proc.returncode}:\n{worker.output()}"
    assert "could not preload" not in worker.output(), worker.output()
    fleet_args["worker"] = worker
    return worker


@contextlib.contextmanager
def _maintenance_fleet(redis_client: redis.Redis, home: Path) -> Iterator[tuple[Fleet, dict[str, Any]]]:
    """A worker of its own (queue, key prefix, node name); the second value restarts it (``_restart``)."""
    from celery.utils.nodenames import host_format

    uid = os.urandom(5).hex()
    prefix, queue, node = f"it-{uid}", f"itq_{uid}", f"it-{uid}@%h"
    args = {"redis": redis_client, "keys": Keys(prefix), "hostname": host_format(node), "node": node,
            "queue": queue, "env": _env(home, prefix), "home": home, "starts": 1}
    app = make_celery_app(AsyncQSettings(broker_url=REDIS_URL, key_prefix=prefix, default_queue=queue))
    try:
        worker = _start(args, "worker-1.log")
        yield Fleet(worker, args["hostname"], queue, args["keys"], args["env"], app, redis_client), args
    finally:
        worker = args.get("worker")  # the current one: a test may have restarted it
        code = worker.stop() if worker is not None else 0
        app.close()
        delete_prefix(redis_client, prefix)
        redis_client.delete(*queue_keys(queue))
        # a warm shutdown with nothing running exits 0
        assert code == 0, f"worker exit code {code}:\n{worker.output()[-3000:] if worker else ''}"


def _restart(fleet: Fleet, args: dict[str, Any]) -> int | None:
    """SIGTERM the worker, then start it again with the same node name; returns the first exit code."""
    code = fleet.worker.stop()
    args["starts"] += 1
    fleet.worker = _start(args, f"worker-{args['starts']}.log")
    return code


@pytest.fixture(scope="module")
def module_fleet(redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with _maintenance_fleet(redis_client, tmp_path_factory.mktemp("maintenance_home")) as (fleet, _args):
        yield fleet


@pytest.fixture
def fleet(module_fleet: Fleet) -> Iterator[Fleet]:
    """The module's worker, back out of maintenance after each test."""
    yield module_fleet
    registry.set_maintenance(module_fleet.redis, module_fleet.keys, module_fleet.hostname, False)
    wait_for(lambda: not _in_maintenance(module_fleet), 5 * HEARTBEAT, "the worker to leave maintenance")


# ------------------------------------------------------------------------------------------ helpers
def _log_count(fleet: Fleet, state: str) -> int:
    return fleet.worker.output().count(f"Maintenance {state} for {fleet.hostname}")


def _in_maintenance(fleet: Fleet) -> bool:
    """What the worker itself believes: it logs each change of its maintenance state."""
    return _log_count(fleet, "on") > _log_count(fleet, "off")


def _wait_worker_sees(fleet: Fleet, on: bool) -> None:
    wait_for(lambda: fleet._check_alive() or _in_maintenance(fleet) == on, 5 * HEARTBEAT,
             lambda: f"the worker to log maintenance {'on' if on else 'off'}\n{fleet.worker.output()[-3000:]}")


def _heartbeat_at(fleet: Fleet) -> float:
    info = registry.live_workers(fleet.redis, fleet.keys).get(fleet.hostname) or {}
    return float(info.get("heartbeat_at") or 0)


def _over_heartbeats(fleet: Fleet, beats: int, check: Any = None) -> None:
    """Poll until the worker has written ``beats`` newer heartbeats, running ``check`` at every poll."""
    seen: set[float] = set()
    first = _heartbeat_at(fleet)

    def done() -> bool:
        fleet._check_alive()
        if check is not None:
            check()
        beat = _heartbeat_at(fleet)
        if beat > first:
            seen.add(beat)
        return len(seen) >= beats

    wait_for(done, (beats + 3) * HEARTBEAT, f"{beats} heartbeats of {fleet.hostname}", interval=0.1)


def _publish(fleet: Fleet, make_workload: Any, seconds: float) -> str:
    """A workload as the executor publishes it: its record and its message in one MULTI."""
    w = make_workload(queue=fleet.queue, task_id=f"sleep_{seconds:g}")
    task_id = w.ti.external_executor_id
    key = ti_key(w.ti.dag_id, w.ti.task_id, w.ti.run_id, w.ti.try_number, w.ti.map_index)
    message = encode_workload(task_id=task_id, payload=w.model_dump_json(), meta=None, queue=fleet.queue,
                              key=key, priority=9)
    records.publish(fleet.redis, fleet.keys, [records.NewRecord(task_id, json.dumps(key), fleet.queue, message)],
                    600)
    return task_id


def _queued_ids(fleet: Fleet) -> list[str]:
    ids = []
    for name in queue_keys(fleet.queue)[:10]:  # the ten priority lists
        ids += [json.loads(raw)["headers"]["id"] for raw in fleet.redis.lrange(name, 0, -1)]
    return ids


def _assert_waiting(fleet: Fleet, task_id: str) -> None:
    record = fleet.redis.hgetall(fleet.keys.task(task_id))
    assert records.CLAIMED_BY not in record, f"claimed while in maintenance: {record}"
    assert record.get(records.STATE) == records.PUBLISHED, record
    assert _queued_ids(fleet) == [task_id], "the workload left the queue"


def _claimed_by(fleet: Fleet, task_id: str) -> str | None:
    return fleet.redis.hget(fleet.keys.task(task_id), records.CLAIMED_BY)


def _settle(fleet: Fleet) -> None:
    """Maintenance is on and the worker has read it. Its consumer may still hold one BRPOP it sent
    before (kombu's brpop_timeout is 1 s); after two more heartbeats it has lapsed, and the gate
    keeps the consumer from sending another."""
    _wait_worker_sees(fleet, True)
    _over_heartbeats(fleet, 2)


def _expect_no_new_work(fleet: Fleet, task_id: str) -> None:
    """The heart of maintenance: for two heartbeats the workload stays in the queue, unclaimed, and
    the worker never even fetched it (no hand-back)."""
    _over_heartbeats(fleet, 2, check=lambda: _assert_waiting(fleet, task_id))
    assert task_id not in fleet.worker.output(), "the worker fetched the workload while in maintenance"
    assert fleet.kinds(task_id) == []


def _expect_taken_and_run(fleet: Fleet, task_id: str) -> None:
    off = time.monotonic()
    wait_for(lambda: fleet._check_alive() or _claimed_by(fleet, task_id), TAKES_WORK_WITHIN,
             lambda: f"the worker to take {task_id} after maintenance off\n{fleet.worker.output()[-3000:]}")
    assert _claimed_by(fleet, task_id) == fleet.hostname
    assert time.monotonic() - off <= TAKES_WORK_WITHIN
    success = fleet.wait_event(task_id, events.SUCCESS)
    assert success["reason"] == "exit code 0" and success["hostname"] == fleet.hostname
    assert fleet.kinds(task_id) == [events.RECEIVED, events.STARTED, events.SUCCESS]


def _status_row(fleet: Fleet) -> dict[str, Any]:
    result = run_airflow(["asyncq", "status", "--json"], fleet.env)
    assert result.returncode == 0, result.stderr
    (row,) = [w for w in json.loads(result.stdout)["workers"] if w["worker"] == fleet.hostname]
    return row


# ------------------------------------------------------------------------------------------ the tests
def test_a_worker_in_maintenance_takes_no_new_work(fleet, make_workload):
    result = run_airflow(["asyncq", "maintenance", fleet.hostname, "on", "--comment", "it: no new work"],
                         fleet.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"{fleet.hostname}: maintenance on (it: no new work); it takes no new "
                                     "work and finishes what it runs")
    record = registry.maintenance(fleet.redis, fleet.keys, fleet.hostname)
    assert record is not None and record["comment"] == "it: no new work"
    assert record["by"].startswith("cli") and float(record["at"]) > 0
    assert fleet.redis.ttl(fleet.keys.maintenance(fleet.hostname)) == -1  # no TTL: it outlives restarts
    _settle(fleet)

    task_id = _publish(fleet, make_workload, 0)
    _expect_no_new_work(fleet, task_id)

    registry.set_maintenance(fleet.redis, fleet.keys, fleet.hostname, False)
    _expect_taken_and_run(fleet, task_id)
    assert not _in_maintenance(fleet)


def test_a_running_workload_finishes_when_maintenance_starts(fleet, make_workload):
    task_id = _publish(fleet, make_workload, 6)
    started = fleet.wait_event(task_id, events.STARTED)

    registry.set_maintenance(fleet.redis, fleet.keys, fleet.hostname, True, comment="it: finish", by="it")
    _wait_worker_sees(fleet, True)
    assert events.SUCCESS not in fleet.kinds(task_id), "the workload ended before maintenance began"

    def shows_it_running() -> dict[str, Any] | None:
        fleet._check_alive()
        (row,) = [r for r in _worker_rows(fleet) if r["worker"] == fleet.hostname]
        return row if row["health"] == "maintenance" and row["running"] == 1 else None

    row = wait_for(shows_it_running, 5 * HEARTBEAT, "a heartbeat showing the running task in maintenance")
    assert row["maintenance"]["comment"] == "it: finish"

    success = fleet.wait_event(task_id, events.SUCCESS, timeout=30)
    assert success["reason"] == "exit code 0"
    assert fleet.kinds(task_id) == [events.RECEIVED, events.STARTED, events.SUCCESS]
    maintenance_at = float(registry.maintenance(fleet.redis, fleet.keys, fleet.hostname)["at"])
    assert float(started["ts"]) < maintenance_at < float(success["ts"])
    assert _claimed_by(fleet, task_id) == fleet.hostname


def _worker_rows(fleet: Fleet) -> list[dict[str, Any]]:
    from airflow_asyncq_provider.state import overview

    return overview.worker_rows(registry.live_workers(fleet.redis, fleet.keys), time.time())


def test_maintenance_survives_a_restart(redis_client, tmp_path, make_workload):
    comment = "it: survives restarts"
    with _maintenance_fleet(redis_client, tmp_path) as (fleet, args):
        result = run_airflow(["asyncq", "maintenance", fleet.hostname, "on", "--comment", comment], fleet.env)
        assert result.returncode == 0, result.stderr
        _wait_worker_sees(fleet, True)

        assert _restart(fleet, args) == 0  # SIGTERM: a clean drain (nothing was running)
        # read before the consumer started, so the gate is closed from the first poll on
        assert f"Maintenance on for {fleet.hostname}: {comment}" in fleet.worker.output()

        task_id = _publish(fleet, make_workload, 0)
        _expect_no_new_work(fleet, task_id)
        row = _status_row(fleet)
        assert (row["health"], row["maintenance"]) == ("maintenance", f"on: {comment}")
        _assert_waiting(fleet, task_id)

        result = run_airflow(["asyncq", "maintenance", fleet.hostname, "off"], fleet.env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{fleet.hostname}: maintenance off; it takes work again"
        assert registry.maintenance(fleet.redis, fleet.keys, fleet.hostname) is None
        _expect_taken_and_run(fleet, task_id)
        row = _status_row(fleet)
        assert (row["health"], row["maintenance"]) == ("ok", "-")


def test_the_cli_refuses_an_unknown_worker(fleet):
    result = run_airflow(["asyncq", "maintenance", "nobody@nowhere", "on", "--comment", "x"], fleet.env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert re.fullmatch(r"error: no live worker named 'nobody@nowhere' \(live workers: (.+)\); use the WORKER "
                        r"column of `airflow asyncq status`", line), line
    assert fleet.hostname in line
    assert registry.maintenance(fleet.redis, fleet.keys, "nobody@nowhere") is None


def test_off_clears_the_record_of_a_worker_that_is_gone(fleet):
    """A pod that was replaced never comes back under its name: its record must still be removable."""
    registry.set_maintenance(fleet.redis, fleet.keys, "gone@pod-1", True, comment="old", by="it")
    result = run_airflow(["asyncq", "maintenance", "gone@pod-1", "off"], fleet.env)
    assert result.returncode == 0, result.stderr
    assert registry.maintenance(fleet.redis, fleet.keys, "gone@pod-1") is None


def test_an_unreadable_maintenance_record_does_not_stop_running_work(redis_client, tmp_path, make_workload):
    with _maintenance_fleet(redis_client, tmp_path) as (fleet, _args):
        task_id = _publish(fleet, make_workload, 8)
        fleet.wait_event(task_id, events.STARTED)
        # a hand-written key of the wrong type: HGETALL answers WRONGTYPE on every heartbeat
        fleet.redis.set(fleet.keys.maintenance(fleet.hostname), "on")
        outcome = wait_for(lambda: {events.SUCCESS, events.FAILED} & set(fleet.kinds(task_id)), 30,
                           lambda: f"an outcome for {task_id}\n{fleet.worker.output()[-3000:]}")
        assert outcome == {events.SUCCESS}, fleet.events_for(task_id)[-1]


def test_a_message_popped_as_maintenance_begins_goes_back_to_the_queue(fleet, make_workload):
    """The gate closes while the consumer's last BRPOP is still out (kombu sends the next one the moment
    a reply comes back): a message published then is popped. kombu 5.7 would keep that reply unread
    until the gate opens again, the message held by a worker in maintenance for as long as it lasts;
    the gate lets the reply through and the runner hands the message back. Three rounds, each
    publishing right after the worker logs maintenance on, while that BRPOP is most likely still out."""
    for _round in range(3):
        seen = _log_count(fleet, "on")
        registry.set_maintenance(fleet.redis, fleet.keys, fleet.hostname, True, comment="it: pop", by="it")
        wait_for(lambda seen=seen: fleet._check_alive() or _log_count(fleet, "on") > seen, 5 * HEARTBEAT,
                 "the worker to log maintenance on", interval=0.01)
        task_id = _publish(fleet, make_workload, 0)
        wait_for(lambda task_id=task_id: _queued_ids(fleet) == [task_id], 3,
                 lambda task_id=task_id: f"{task_id} back in the queue\n{fleet.worker.output()[-3000:]}", interval=0.05)
        _over_heartbeats(fleet, 2, check=lambda task_id=task_id: _assert_waiting(fleet, task_id))
        assert fleet.kinds(task_id) == []
        registry.set_maintenance(fleet.redis, fleet.keys, fleet.hostname, False)
        _expect_taken_and_run(fleet, task_id)
