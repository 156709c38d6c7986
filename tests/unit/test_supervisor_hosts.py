"""forkserver's supervisor hosts, with a real fork server process and real forks; only the supervisor's
work is replaced (``_supervise``), by what the task id asks for: end at once, fail, crash, or hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from airflow_asyncq_provider.worker.forkclient import Child

SERVER = """
import os, sys, time
from pydantic import TypeAdapter
from airflow.executors.workloads import ExecutorWorkload
from airflow_asyncq_provider.worker import forkserver

def fake(workload, task_id):
    name = workload.ti.task_id
    if name == "hang":
        time.sleep(120)
    if name == "crash":
        exit_now = os._exit
        os._exit = lambda status: (time.sleep(1), exit_now(status))  # this host lingers as it exits
        return forkserver.EXIT_CRASHED, {"error": "RuntimeError: boom"}
    return (1 if name == "fail" else 0), {}

forkserver._supervise = fake
server = forkserver.ForkServer(sys.argv[1], float(sys.argv[2]))
server._decoder = TypeAdapter(ExecutorWorkload)
server.serve()
"""


class Server:
    def __init__(self, path: Path, idle_timeout: float) -> None:
        self.path = str(path)
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, self.path, str(idle_timeout)],
                                     stdin=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not self._answers():
            assert self.proc.poll() is None and time.monotonic() < deadline, "the fork server did not start"
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(self.path)
                conn.sendall(b'{"op": "ping"}\n')
                return b"pong" in conn.recv(100)
        except OSError:
            return False

    def spawn(self, payload: str) -> Child:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        conn.sendall(json.dumps({"id": "t1", "payload": payload}).encode() + b"\n")
        reader = conn.makefile("rb")
        return Child(conn, reader, int(json.loads(reader.readline())["pid"]))

    def run(self, payload: str) -> tuple[int, dict]:
        child = self.spawn(payload)
        try:
            return child.pid, child.wait()
        finally:
            child.release()

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(20)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[float], Server]]:
    servers: list[Server] = []

    def make(idle_timeout: float = 30.0) -> Server:
        servers.append(Server(tmp_path / f"fork{len(servers)}.sock", idle_timeout))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with the default idle timeout for the cases that leave it as they found it."""
    server = Server(tmp_path_factory.mktemp("hosts") / "fork.sock", 30.0)
    yield server
    server.stop()


@pytest.fixture
def payload(make_workload) -> Callable[[str], str]:
    return lambda name: make_workload(task_id=name).model_dump_json()


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False


def test_one_host_runs_one_workload_after_another(shared, payload):
    server = shared
    first, status = server.run(payload("ok"))
    assert status == {"code": 0, "signal": None, "result": None}
    second, status = server.run(payload("fail"))
    assert second == first and status["code"] == 1
    third, _ = server.run(payload("ok"))
    assert third == first


def test_a_host_takes_no_workload_until_the_worker_released_the_last(shared, payload):
    server = shared
    held = server.spawn(payload("ok"))
    assert held.wait()["code"] == 0  # done, but the worker still tracks its pid
    other, _ = server.run(payload("ok"))
    assert other != held.pid
    held.release()
    deadline = time.monotonic() + 5
    while server.run(payload("ok"))[0] not in (held.pid, other):
        assert time.monotonic() < deadline


def test_a_host_given_up_while_it_runs_takes_no_other_workload(shared, payload):
    server = shared
    abandoned = server.spawn(payload("hang"))
    abandoned.release()  # the slot stopped tracking it before its end (a Redis error, say)
    time.sleep(0.2)
    pid, _ = server.run(payload("ok"))
    assert pid != abandoned.pid
    os.kill(abandoned.pid, signal.SIGKILL)
    assert _gone(abandoned.pid)


def test_a_killed_host_reports_the_signal_and_a_new_host_takes_the_next(shared, payload):
    server = shared
    child = server.spawn(payload("hang"))
    os.kill(child.pid, signal.SIGKILL)  # what a memory kill or a fence does to the group
    assert child.wait() == {"code": None, "signal": signal.SIGKILL, "result": None}
    child.release()
    assert server.run(payload("ok"))[0] != child.pid


def test_a_crashed_supervisor_takes_its_host_with_it(shared, payload):
    server = shared
    pid, status = server.run(payload("crash"))
    assert status["result"] == {"error": "RuntimeError: boom"}
    assert _gone(pid)
    assert server.run(payload("ok"))[0] != pid


def test_a_host_exiting_after_a_crash_is_handed_nothing_more(shared, payload):
    """The next workload arrives while the crashed host is still exiting: it goes to another host (it
    used to reach the exiting one and fail: 'supervisor host exited with code 0 before it reported')."""
    server = shared
    crashed, _ = server.run(payload("crash"))
    pid, status = server.run(payload("ok"))
    assert status == {"code": 0, "signal": None, "result": None}
    assert pid != crashed
    assert _gone(crashed)


def test_an_idle_host_exits_after_the_idle_timeout(start, payload):
    server = start(1.0)
    pid, _ = server.run(payload("ok"))
    assert _gone(pid, timeout=10)
    assert server.proc.poll() is None


def test_idle_timeout_zero_gives_every_workload_a_fresh_supervisor(start, payload):
    server = start(0)
    first, status = server.run(payload("ok"))
    assert status["code"] == 0 and _gone(first)
    second, _ = server.run(payload("ok"))
    assert second != first


def test_a_workload_may_not_reach_a_host_unless_it_validates(shared):
    server = shared
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(server.path)
    conn.sendall(b'{"id": "x", "payload": "{\\"type\\": \\"nope\\"}"}\n')
    reply = json.loads(conn.makefile("rb").readline())
    conn.close()
    assert reply["error"].startswith("invalid workload")


def test_every_host_dies_with_the_worker(start, payload):
    server = start()
    busy = server.spawn(payload("hang"))
    idle, _ = server.run(payload("ok"))  # a second host, idle once this returns
    assert busy.pid != idle
    server.stop()  # the worker's end of the fork server's stdin closes
    assert _gone(idle) and _gone(busy.pid)
    assert busy.wait()["result"]["error"] == "fork server died while the task ran"
    busy.release()
