"""A real ``airflow asyncq worker`` (Celery + fork server) fed bad, duplicate and revoked messages.

One worker serves the whole module (it takes a few seconds to start). Every test checks that it is
still alive afterwards: no message may take the worker down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from airflow_asyncq_provider.broker.config import make_celery_app
from airflow_asyncq_provider.broker.messages import EXECUTE_WORKLOAD
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import events, registry
from airflow_asyncq_provider.state.keys import Keys

from ._support import REDIS_URL, WorkerProcess, airflow_env, delete_prefix, queue_keys, run_airflow, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEARTBEAT = 1.0


@dataclasses.dataclass
class Fleet:
    worker: WorkerProcess
    hostname: str
    queue: str
    keys: Keys
    env: dict[str, str]
    app: Any
    redis: redis.Redis

    def send(self, *args: Any, task_id: str | None = None, name: str = EXECUTE_WORKLOAD,
             **options: Any) -> str:
        task_id = task_id or f"it-{uuid.uuid4()}"
        self.app.send_task(name, args=args, task_id=task_id, queue=self.queue, **options)
        return task_id

    def events_for(self, task_id: str) -> list[dict[str, str]]:
        return [e for _sid, e in events.read_since(self.redis, self.keys, "0-0", 100_000)
                if e.get("id") == task_id]

    def kinds(self, task_id: str) -> list[str]:
        return [e["kind"] for e in self.events_for(task_id)]

    def dead_letter(self, task_id: str) -> dict[str, Any] | None:
        for raw in self.redis.lrange(self.keys.dead_letters, 0, -1):
            entry = json.loads(raw)
            if entry["id"] == task_id:
                return entry
        return None

    def wait_dead_letter(self, task_id: str, timeout: float = 20) -> dict[str, Any]:
        return wait_for(lambda: self.dead_letter(task_id) or self._check_alive(), timeout,
                        lambda: f"dead letter {task_id}\n{self.worker.output()[-3000:]}")

    def wait_event(self, task_id: str, kind: str, timeout: float = 20) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            self._check_alive()
            return next((e for e in self.events_for(task_id) if e["kind"] == kind), None)

        return wait_for(found, timeout, lambda: f"{kind} event for {task_id}\n{self.worker.output()[-3000:]}")

    def wait_handled(self, task_id: str, timeout: float = 20) -> str:
        """The outcome the worker's task returned for this message, once it has returned.

        Celery logs the line when the task function returns, and the worker runs a message to its end in
        that function (a started workload included), so no later event can come from this delivery.
        """
        done = re.compile(rf"Task {re.escape(EXECUTE_WORKLOAD)}\[{re.escape(task_id)}\] "
                          r"succeeded in \S+: '([^']*)'")

        def found() -> re.Match[str] | None:
            self._check_alive()
            return done.search(self.worker.output())

        match = wait_for(found, timeout, lambda: f"the worker to finish handling {task_id}\n"
                                                 f"{self.worker.output()[-3000:]}")
        return match.group(1)

    def _check_alive(self) -> None:
        assert self.worker.alive(), f"the worker died:\n{self.worker.output()[-5000:]}"

    def assert_serving(self) -> None:
        """Alive, registered, and still consuming: a fresh malformed message is dead-lettered."""
        self._check_alive()
        assert registry.alive(self.redis, self.keys, [self.hostname]) == {self.hostname: True}
        probe = self.send("still serving?")
        self.wait_dead_letter(probe)


def _jwt_like(exp: float) -> str:
    import base64

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS512', 'typ': 'JWT'})}.{part({'exp': exp, 'sub': 'x'})}.{uuid.uuid4().hex}sig"


@contextlib.contextmanager
def _running_fleet(redis_client: redis.Redis, home: Path) -> Iterator[Fleet]:
    from celery.utils.nodenames import host_format

    uid = uuid.uuid4().hex[:10]
    prefix, queue, node = f"it-{uid}", f"itq_{uid}", f"it-{uid}@%h"
    env = airflow_env(home, broker_url=REDIS_URL, key_prefix=prefix,
                      worker_heartbeat_interval=str(HEARTBEAT), worker_lost_timeout=str(5 * HEARTBEAT))
    # No api-server in this tier: a real workload's supervisor fails fast at the Execution API.
    env.update({"AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://127.0.0.1:1/execution/",
                "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "0"})
    keys = Keys(prefix)
    hostname = host_format(node)
    worker = WorkerProcess(["-q", queue, "-c", "2", "--hostname", node, "--skip-serve-logs"], env,
                           home / "worker.log")
    app = make_celery_app(AsyncQSettings(broker_url=REDIS_URL, key_prefix=prefix, default_queue=queue))
    try:
        wait_for(lambda: not worker.alive() or registry.alive(redis_client, keys, [hostname])[hostname],
                 90, "the worker's first heartbeat")
        assert worker.alive(), f"the worker exited with {worker.proc.returncode}:\n{worker.output()}"
        wait_for(lambda: not worker.alive() or f"{hostname} ready." in worker.output(), 60,
                 "Celery to report the worker ready")
        assert worker.alive(), worker.output()
        yield Fleet(worker, hostname, queue, keys, env, app, redis_client)
    finally:
        code = worker.stop()
        app.close()
        delete_prefix(redis_client, prefix)
        redis_client.delete(*queue_keys(queue))
        # a warm shutdown unregisters the worker (checked here, after the tests, on the real process)
        assert code == 0, f"worker exit code {code}:\n{worker.output()[-3000:]}"


@pytest.fixture(scope="module")
def fleet(redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One worker for the module's tests; none of them may change what another one checks."""
    with _running_fleet(redis_client, tmp_path_factory.mktemp("worker_home")) as running:
        yield running


@pytest.fixture
def own_fleet(redis_client: redis.Redis, tmp_path: Path) -> Iterator[Fleet]:
    """A worker of the test's own, for a test that breaks a part of it."""
    with _running_fleet(redis_client, tmp_path) as running:
        yield running


def _claimed_elsewhere(fleet: Fleet) -> str:
    """Send a message whose task record another worker has already claimed (a duplicate delivery)."""
    task_id = f"it-{uuid.uuid4()}"
    fleet.redis.hset(fleet.keys.task(task_id), mapping={"claimed_by": "other@host", "state": "started"})
    fleet.send(json.dumps({"type": "ExecuteTask", "token": "tok", "ti": {}}), task_id=task_id)
    return task_id


def test_worker_registers_with_its_queues_and_slots(fleet):
    info = registry.live_workers(fleet.redis, fleet.keys)[fleet.hostname]
    assert info["queues"] == [fleet.queue]
    assert info["slots"] == 2 and info["free"] == 2 and info["running"] == 0
    assert info["pid"] == fleet.worker.proc.pid
    assert isinstance(info["forkserver_pid"], int) and info["forkserver_pid"] != info["pid"]
    assert info["version"] == "0.1.0"


def test_fork_server_is_forked_from_the_worker(fleet):
    """Forked, not spawned: it shares the worker's imported pages (docs/BENCHMARKS.md, memory)."""
    import psutil

    info = registry.live_workers(fleet.redis, fleet.keys)[fleet.hostname]
    server = psutil.Process(info["forkserver_pid"])
    assert server.ppid() == fleet.worker.proc.pid
    assert "airflow_asyncq_provider.worker.forkserver" not in " ".join(server.cmdline())
    assert "Fork server forked from the worker" in fleet.worker.output()


def test_malformed_message_is_dead_lettered(fleet):
    task_id = fleet.send("not json")
    entry = fleet.wait_dead_letter(task_id)
    assert entry["error"].startswith("payload is not JSON")
    assert entry["payload"] == "not json"
    assert entry["hostname"] == fleet.hostname
    assert fleet.kinds(task_id) == []  # never claimed, so no event
    assert not fleet.redis.exists(fleet.keys.task(task_id))
    fleet.assert_serving()


def test_wrong_arguments_are_dead_lettered(fleet):
    task_id = fleet.send("a", {}, "c")
    entry = fleet.wait_dead_letter(task_id)
    assert "got 3 args" in entry["error"]
    fleet.assert_serving()


def test_unknown_task_name_is_dead_lettered(fleet):
    task_id = fleet.send("{}", name="asyncq.no_such_task")
    entry = fleet.wait_dead_letter(task_id)
    assert entry["error"] == "unknown task name 'asyncq.no_such_task'"
    fleet.assert_serving()


def test_payload_failing_validation_is_dead_lettered_and_failed(fleet):
    payload = json.dumps({"type": "ExecuteTask", "token": "tok", "ti": {"dag_id": "d", "task_id": "t"}})
    task_id = fleet.send(payload)
    failed = fleet.wait_event(task_id, events.FAILED)
    assert failed["reason"].startswith("invalid workload")
    assert failed["hostname"] == fleet.hostname
    assert fleet.kinds(task_id) == [events.RECEIVED, events.FAILED]  # never started
    entry = fleet.wait_dead_letter(task_id)
    assert entry["error"].startswith("invalid workload") and entry["payload"] == payload
    record = fleet.redis.hgetall(fleet.keys.task(task_id))
    assert record["state"] == events.FAILED and record["claimed_by"] == fleet.hostname
    fleet.assert_serving()


def test_pickle_message_is_refused(fleet):
    task_id = fleet.send("harmless, but pickled", serializer="pickle")
    entry = fleet.wait_dead_letter(task_id)
    assert entry["error"].startswith("message refused by Celery: ContentDisallowed(")
    assert "pickle" in entry["error"]
    assert fleet.kinds(task_id) == []  # no task code ran
    fleet.assert_serving()


def test_duplicate_delivery_is_dropped(fleet):
    task_id = _claimed_elsewhere(fleet)
    duplicate = fleet.wait_event(task_id, events.DUPLICATE)
    assert duplicate["reason"] == "already claimed by other@host"
    assert duplicate["hostname"] == fleet.hostname
    # a wrongly started run would have reported before the slot returned
    assert fleet.wait_handled(task_id) == events.DUPLICATE
    assert fleet.kinds(task_id) == [events.DUPLICATE]  # no received, no terminal event
    record = fleet.redis.hgetall(fleet.keys.task(task_id))
    assert (record["claimed_by"], record["state"]) == ("other@host", "started")  # the real run's record
    assert fleet.dead_letter(task_id) is None
    fleet.assert_serving()


def test_revoked_before_start_never_starts(fleet):
    task_id = f"it-{uuid.uuid4()}"
    fleet.redis.hset(fleet.keys.task(task_id), mapping={"revoked": f"{time.time():.3f}", "state": "published"})
    fleet.send(json.dumps({"type": "ExecuteTask", "token": "tok", "ti": {}}), task_id=task_id)
    revoked = fleet.wait_event(task_id, events.REVOKED)
    assert revoked["reason"] == "revoked before start"
    assert fleet.wait_handled(task_id) == events.REVOKED  # the slot returned: a start would have reported
    assert fleet.kinds(task_id) == [events.REVOKED]  # no received, no started
    fleet.assert_serving()


def test_executor_to_worker_round_trip(fleet, monkeypatch, make_workload):
    """Executor -> Redis -> worker -> fork server -> supervisor -> event stream -> executor."""
    _round_trip(fleet, monkeypatch, make_workload)


def test_a_killed_fork_server_is_replaced_by_a_fresh_interpreter(own_fleet, monkeypatch, make_workload):
    """The worker runs threads (Celery's pool, the heartbeat) once it has started, so it must not fork
    again: the new server is ``python -m``. A worker of its own: the module's keeps its forked server."""
    import psutil

    fleet = own_fleet
    old = registry.live_workers(fleet.redis, fleet.keys)[fleet.hostname]["forkserver_pid"]
    psutil.Process(old).kill()
    _round_trip(fleet, monkeypatch, make_workload)
    wait_for(lambda: registry.live_workers(fleet.redis, fleet.keys)[fleet.hostname]["forkserver_pid"] != old,
             5 * HEARTBEAT, "a heartbeat naming the new fork server")
    new = psutil.Process(registry.live_workers(fleet.redis, fleet.keys)[fleet.hostname]["forkserver_pid"])
    assert "airflow_asyncq_provider.worker.forkserver" in " ".join(new.cmdline())
    assert "Fork server is gone" in fleet.worker.output()


def _round_trip(fleet, monkeypatch, make_workload) -> None:
    from airflow.utils.state import TaskInstanceState

    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    monkeypatch.setenv("AIRFLOW__ASYNCQ__BROKER_URL", REDIS_URL)
    monkeypatch.setenv("AIRFLOW__ASYNCQ__KEY_PREFIX", fleet.keys.prefix)
    monkeypatch.setenv("AIRFLOW__ASYNCQ__WORKER_HEARTBEAT_INTERVAL", str(HEARTBEAT))
    monkeypatch.setenv("AIRFLOW__ASYNCQ__WORKER_LOST_TIMEOUT", str(5 * HEARTBEAT))
    executor = AsyncQExecutor()
    executor.start()
    try:
        workload = make_workload(queue=fleet.queue)
        workload = workload.model_copy(update={"token": _jwt_like(time.time() + 3600)})
        task_id = workload.ti.external_executor_id
        executor.queue_workload(workload, session=None)
        executor._process_workloads([workload])
        seen: list[tuple[Any, Any]] = []

        def collect() -> bool:
            executor.sync()
            event = executor.get_event_buffer().get(workload.ti.key)
            if event is not None:
                seen.append(event)
            return any(state in (TaskInstanceState.FAILED, TaskInstanceState.SUCCESS) for state, _ in seen)

        wait_for(collect, 60, lambda: f"a final state for {task_id}\n{fleet.worker.output()[-3000:]}",
                 interval=0.2)
        states = [state for state, _info in seen]
        assert states[0] == TaskInstanceState.QUEUED
        assert TaskInstanceState.SUCCESS not in states  # no api-server: it cannot succeed
        state, reason = seen[-1]
        assert state == TaskInstanceState.FAILED
        # the worker's reason reaches the task instance: here, no Execution API to talk to
        assert reason.startswith("supervisor crashed: ConnectError"), reason
        assert fleet.kinds(task_id)[:2] == [events.RECEIVED, events.STARTED]
        started = fleet.events_for(task_id)[1]
        assert int(started["pid"]) > 0 and started["hostname"] == fleet.hostname
        assert workload.ti.key not in executor.running
    finally:
        executor.end()
    fleet.assert_serving()
    # the workload's token is a credential: it must not appear in anything the worker logged
    assert workload.token.split(".")[2] not in fleet.worker.output()


def test_still_alive_and_heartbeating(fleet):
    before = registry.live_workers(fleet.redis, fleet.keys)[fleet.hostname]
    claimed_after = time.time() - 0.001  # the heartbeat rounds its times to the millisecond
    task_id = _claimed_elsewhere(fleet)  # this test's own claim (dropped as a duplicate)
    fleet.wait_handled(task_id)

    def newer_heartbeat_with_the_claim() -> dict[str, Any] | None:
        info = registry.live_workers(fleet.redis, fleet.keys)[fleet.hostname]
        return info if (info["heartbeat_at"] > before["heartbeat_at"]
                        and info["last_claim_at"] >= claimed_after) else None

    after = wait_for(newer_heartbeat_with_the_claim, 5 * HEARTBEAT,
                     "a newer heartbeat that reports the claim just made")
    assert after["running"] == 0 and after["free"] == 2
    assert after["last_claim_at"] >= claimed_after > 0  # it claimed the message above
    assert 0 < fleet.redis.pttl(fleet.keys.worker(fleet.hostname)) <= 5 * HEARTBEAT * 1000
    fleet.assert_serving()


# ------------------------------------------------------------------------------------------ status
def test_status_json_lists_the_live_worker(fleet):
    result = run_airflow(["asyncq", "status", "--json"], fleet.env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["broker"] == REDIS_URL
    (row,) = [w for w in report["workers"] if w["worker"] == fleet.hostname]
    assert row["queues"] == fleet.queue and row["slots"] == 2 and row["free"] == 2
    assert row["health"] == "ok"
    assert 0 <= row["heartbeat_age_s"] < 5 * HEARTBEAT
    assert row["version"] == "0.1.0"


def test_status_table_lists_the_live_worker(fleet):
    result = run_airflow(["asyncq", "status"], fleet.env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"broker: {REDIS_URL}"
    assert lines[1].split()[:4] == ["WORKER", "HEALTH", "QUEUES", "SLOTS"]
    (row,) = [line for line in lines if line.startswith(fleet.hostname)]
    assert row.split()[1:4] == ["ok", fleet.queue, "2"]
