"""Redis failing between a message's acknowledgement and its claim, injected for real.

A private ``redis-server`` sits behind a small TCP proxy of the test's own. The worker (a real
``airflow asyncq worker``) talks to Redis only through the proxy; the executor that publishes the
workloads and reads their outcomes talks to Redis directly. When the worker sends the delivery count or
the claim of the test's workload, the proxy injects one fault at that very moment:

- ``stop``: SIGSTOP the redis-server for a few seconds (every client's commands time out);
- ``lose_reply``: pass the claim to Redis, drop its reply and cut the connection (the claim went
  through, the worker did not hear it);
- ``refuse``: cut every connection that sends a state command of this workload, for a few seconds,
  longer than ``[asyncq] event_retry_timeout`` (the worker hands the message back);
- ``partition``: cut every connection and refuse new ones, state and broker alike (the hand-back fails
  too, and the worker says who recovers the workload).

Then the counting: one ``received``, one ``started`` and one terminal event, no second claim, the
executor sees the task end once (no api-server here, so the supervisor fails at the Execution API:
``failed`` is the one expected outcome).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from airflow_asyncq_provider.state import events, registry
from airflow_asyncq_provider.state.keys import Keys

from ._support import WorkerProcess, airflow_env, wait_for
from .test_worker import _jwt_like

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENT_RETRY_TIMEOUT = 4.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server of this module's own, so the test may stop it (SIGSTOP) without harming others."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self._log = open(workdir / "redis.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._answers, 10, "the private redis-server to answer")

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pause(self, seconds: float) -> None:
        """SIGSTOP now, SIGCONT after ``seconds`` (on a timer: the caller carries on)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        timer = threading.Timer(seconds, os.kill, (self.proc.pid, signal.SIGCONT))
        timer.daemon = True
        timer.start()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()


@dataclasses.dataclass
class Rule:
    patterns: tuple[bytes, ...]  # all of them in one chunk the client sends
    action: str
    seconds: float = 0.0
    until: float | None = None  # refuse: the window, set when it first fires
    fired: int = 0


class FaultProxy:
    """Forwards 127.0.0.1:<port> to the private Redis; injects a fault when a client's chunk matches.

    redis-py and kombu send each command (or pipeline) in one write, so a chunk holds a whole command.
    """

    def __init__(self, redis_server: PrivateRedis) -> None:
        self.redis_server = redis_server
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.rules: list[Rule] = []
        self.partition_until = 0.0
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, *patterns: bytes, action: str, seconds: float = 0.0) -> Rule:
        rule = Rule(tuple(patterns), action, seconds)
        with self._lock:
            self.rules.append(rule)
        return rule

    def partition(self, seconds: float) -> None:
        self.partition_until = time.monotonic() + seconds
        self.log.append(f"partition {seconds:g} s")

    def close(self) -> None:
        self._closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _addr = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if time.monotonic() < self.partition_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.redis_server.port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _match(self, data: bytes) -> Rule | None:
        now = time.monotonic()
        with self._lock:
            for rule in self.rules:
                if not all(p in data for p in rule.patterns):
                    continue
                if rule.action == "refuse":
                    if rule.until is None:
                        rule.until = now + rule.seconds
                    if now < rule.until:
                        rule.fired += 1
                        return rule
                elif rule.fired == 0:
                    rule.fired = 1
                    return rule
        return None

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        drop_reply = False
        try:
            while not self._closed.is_set():
                if time.monotonic() < self.partition_until:
                    return
                readable, _, _ = select.select([client, upstream], [], [], 0.1)
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    if sock is upstream:
                        if drop_reply:
                            self.log.append("reply dropped, connection cut")
                            return
                        client.sendall(data)
                        continue
                    rule = self._match(data)
                    if rule is not None:
                        self.log.append(f"{rule.action} on {rule.patterns[0].decode()}")
                        if rule.action == "refuse":
                            return
                        if rule.action == "partition":
                            self.partition(rule.seconds)
                            return
                        if rule.action == "stop":
                            self.redis_server.pause(rule.seconds)
                        elif rule.action == "lose_reply":
                            drop_reply = True
                    upstream.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()


@dataclasses.dataclass
class Gap:
    server: PrivateRedis
    proxy: FaultProxy
    worker: WorkerProcess
    hostname: str
    queue: str
    keys: Keys
    redis: redis.Redis
    executor: Any

    def kinds(self, task_id: str) -> list[str]:
        return [e["kind"] for _sid, e in events.read_since(self.redis, self.keys, "0-0", 100_000)
                if e.get("id") == task_id]

    def outcomes(self, workload: Any, timeout: float = 90) -> list[tuple[Any, Any]]:
        """Every state the executor reported for the workload, once it reported a final one."""
        from airflow.utils.state import TaskInstanceState

        seen: list[tuple[Any, Any]] = []

        def collect() -> bool:
            assert self.worker.alive(), f"the worker died:\n{self.worker.output()[-5000:]}"
            self.executor.sync()
            event = self.executor.get_event_buffer().get(workload.ti.key)
            if event is not None:
                seen.append(event)
            return any(state in (TaskInstanceState.FAILED, TaskInstanceState.SUCCESS) for state, _ in seen)

        wait_for(collect, timeout, lambda: f"a final state for {workload.ti.external_executor_id}\n"
                                           f"proxy: {self.proxy.log}\n{self.worker.output()[-4000:]}",
                 interval=0.3)
        return seen

    def assert_ran_once(self, workload: Any) -> tuple[Any, Any]:
        """The final (state, reason) the executor saw, after checking it came from exactly one run."""
        from airflow.utils.state import TaskInstanceState

        task_id = workload.ti.external_executor_id
        seen = self.outcomes(workload)
        time.sleep(2 * EVENT_RETRY_TIMEOUT)  # room for a second run to show itself, were there one
        self.executor.sync()
        seen.append(self.executor.get_event_buffer().get(workload.ti.key) or (None, None))
        kinds = self.kinds(task_id)
        finals = [(state, reason) for state, reason in seen
                  if state in (TaskInstanceState.FAILED, TaskInstanceState.SUCCESS)]
        assert len(finals) == 1, (seen, kinds)
        assert kinds.count(events.RECEIVED) == 1, kinds
        assert kinds.count(events.STARTED) == 1, kinds
        assert sum(kind in events.TERMINAL for kind in kinds) == 1, kinds
        assert events.DUPLICATE not in kinds, kinds
        assert self.redis.hget(self.keys.task(task_id), "claimed_by") == self.hostname
        forks = len(re.findall(rf"Workload {re.escape(task_id)} .* started as pid", self.worker.output()))
        assert forks == 1, f"forked {forks} times:\n{self.worker.output()[-4000:]}"
        assert self.worker.alive()
        return finals[0]


@pytest.fixture(scope="module")
def gap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gap]:
    from celery.utils.nodenames import host_format

    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

    home = tmp_path_factory.mktemp("gap_home")
    server = PrivateRedis(home)
    proxy = FaultProxy(server)
    uid = uuid.uuid4().hex[:10]
    prefix, queue, node = f"gap-{uid}", f"gapq_{uid}", f"gap-{uid}@%h"
    env = airflow_env(home, broker_url=proxy.url, key_prefix=prefix, worker_heartbeat_interval="1",
                      worker_lost_timeout="30", publish_timeout="1",
                      event_retry_timeout=str(EVENT_RETRY_TIMEOUT))
    env.update({"AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://127.0.0.1:1/execution/",
                "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "0"})
    hostname = host_format(node)
    worker = WorkerProcess(["-q", queue, "-c", "2", "--hostname", node, "--skip-serve-logs"], env,
                           home / "worker.log")
    client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=10)
    keys = Keys(prefix)
    patch = pytest.MonkeyPatch()
    for name, value in {"BROKER_URL": server.url, "KEY_PREFIX": prefix, "WORKER_HEARTBEAT_INTERVAL": "1",
                        "WORKER_LOST_TIMEOUT": "30"}.items():
        patch.setenv(f"AIRFLOW__ASYNCQ__{name}", value)
    executor = AsyncQExecutor()
    try:
        wait_for(lambda: not worker.alive() or registry.alive(client, keys, [hostname])[hostname], 90,
                 "the worker's first heartbeat")
        wait_for(lambda: not worker.alive() or f"{hostname} ready." in worker.output(), 60,
                 "Celery to report the worker ready")
        assert worker.alive(), worker.output()
        executor.start()
        yield Gap(server, proxy, worker, hostname, queue, keys, client, executor)
    finally:
        with contextlib.suppress(Exception):
            executor.end()
        code = worker.stop()
        patch.undo()
        proxy.close()
        server.stop()
        assert code == 0, f"worker exit code {code}:\n{worker.output()[-3000:]}"


def _arm_on_publish(gap: Gap, make_workload: Any, *patterns: bytes, action: str,
                    seconds: float = 0.0) -> tuple[Any, Rule]:
    """Publish a workload whose id is known before the worker can see it, with the fault armed on it."""
    workload = make_workload(queue=gap.queue)
    workload = workload.model_copy(update={"token": _jwt_like(time.time() + 3600)})
    key = gap.keys.task(workload.ti.external_executor_id).encode()
    rule = gap.proxy.arm(*patterns, key, action=action, seconds=seconds)
    gap.executor.queue_workload(workload, session=None)
    gap.executor._process_workloads([workload])
    return workload, rule


def test_redis_stopped_while_the_worker_counts_the_delivery(gap, make_workload):
    """SIGSTOP the redis-server the moment the worker counts the delivery (the message is acknowledged
    by then): every command times out for a while, shorter than event_retry_timeout. The workload
    still runs, once."""
    workload, rule = _arm_on_publish(gap, make_workload, b"HINCRBY", action="stop",
                                     seconds=EVENT_RETRY_TIMEOUT / 2)
    _state, reason = gap.assert_ran_once(workload)
    assert rule.fired == 1
    task_id = workload.ti.external_executor_id
    assert f"Redis failed before workload {task_id} was claimed" in gap.worker.output()  # retried
    # The timed-out count ran too once Redis resumed: the record may say 2; the check used the lower bound.
    assert gap.redis.hget(gap.keys.task(task_id), "deliveries") in ("1", "2")
    assert str(reason).startswith("supervisor crashed"), reason  # no api-server: the one expected end


def test_a_claim_whose_reply_was_lost_is_run_not_dropped(gap, make_workload):
    """The claim reaches Redis, its reply is cut off. The retry hears "already claimed by <this
    worker>"; dropped as a duplicate, the workload would stay queued until [scheduler]
    task_queued_timeout. It is recognised as this slot's own claim and run."""
    workload, rule = _arm_on_publish(gap, make_workload, b"HSETNX", b"claimed_by", action="lose_reply")
    gap.assert_ran_once(workload)
    assert rule.fired == 1 and "reply dropped, connection cut" in gap.proxy.log
    assert f"Workload {workload.ti.external_executor_id}: this worker's earlier claim reached Redis" in \
        gap.worker.output()


def test_state_refused_past_event_retry_timeout_hands_the_message_back(gap, make_workload):
    """Every state command of this workload is refused for longer than event_retry_timeout, while the
    broker works: the worker hands the message back, a later delivery claims and runs it, once."""
    workload, rule = _arm_on_publish(gap, make_workload, b"HINCRBY", action="refuse",
                                     seconds=2.5 * EVENT_RETRY_TIMEOUT)
    gap.assert_ran_once(workload)
    task_id = workload.ti.external_executor_id
    assert rule.fired >= 2
    assert f"Workload {task_id} handed back to queue '{gap.queue}' before its claim" in gap.worker.output()


def test_when_the_hand_back_fails_too_the_worker_names_the_task_and_its_recovery(gap, make_workload):
    """The whole Redis is cut off from the worker (state and broker) just as it counts the delivery,
    for longer than event_retry_timeout: the message cannot be handed back. The worker logs an error
    naming the task and what recovers it, and the executor still has it as queued (which is what the
    scheduler's stuck-in-queued check acts on)."""
    from airflow.utils.state import TaskInstanceState

    workload, rule = _arm_on_publish(gap, make_workload, b"HINCRBY", action="partition",
                                     seconds=3.5 * EVENT_RETRY_TIMEOUT)
    task_id = workload.ti.external_executor_id
    line = f"Workload {task_id} was acknowledged but neither claimed nor handed back"
    wait_for(lambda: line in gap.worker.output(), 60,
             lambda: f"the worker's error line\nproxy: {gap.proxy.log}\n{gap.worker.output()[-4000:]}")
    assert rule.fired == 1
    error = next(x for x in gap.worker.output().splitlines() if line in x)
    assert "[scheduler] task_queued_timeout" in error and "Redis restart" in error
    wait_for(lambda: gap.worker.alive() and registry.alive(gap.redis, gap.keys, [gap.hostname])[gap.hostname],
             60, "the worker to heartbeat again after the partition")
    gap.executor.sync()
    assert gap.executor.get_event_buffer().get(workload.ti.key, (None,))[0] in (None, TaskInstanceState.QUEUED)
    assert workload.ti.key in gap.executor.running  # the executor still waits for it: stuck in queued
    assert gap.kinds(task_id) == []
    assert not gap.redis.hexists(gap.keys.task(task_id), "claimed_by")
