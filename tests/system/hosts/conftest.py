"""Workers that are really separate hosts: the Airflow core (api-server, scheduler, dag-processor,
triggerer, PostgreSQL, a private Redis) in the root namespace, and three ``airflow asyncq worker`` hosts
in network namespaces of their own (network.py), each with its own hostname, address, log folder and
log server.

    root namespace                          bridge 10.77.<n>.1/24
      api-server :<port> (0.0.0.0)  ───┐     ├── h1  10.77.<n>.11  hostname aq<tag>h1  logs <home>/hosts/h1
      private redis-server :<port>  ───┤     ├── h2  10.77.<n>.12  ...
        bound to 127.0.0.1 and .1   ───┘     └── h3  10.77.<n>.13  ...

The hosts reach Redis and the api-server only at the bridge's address, and the api-server reads a
running task's log only from its host's log server (``http://<ti.hostname>:<port>/log/…``; the name
resolves through a line in /etc/hosts that the teardown removes). Short timeouts make faults show
quickly: a 2 s heartbeat, ``worker_lost_timeout`` 20 s, so a worker fences itself 15 s after its last
good heartbeat (worker/fencing.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.stack import Stack, airflow_bin, free_port
from tests.system.conftest import PG, _psql, _require, read_effects, wait_for
from tests.system.hosts.network import Host, Network

HEARTBEAT = 2.0
LOST_TIMEOUT = 20.0
PUBLISH_TIMEOUT = 2.0
KILL_GRACE = 3.0
HOSTS = ("h1", "h2", "h3")
PREFIX = "hosts"
LINKDELAY = Path(__file__).with_name("linkdelay.py")


class HostRedis:
    """A redis-server of our own that the hosts reach at the bridge's address: ours to restart, and to
    kill the connections of."""

    def __init__(self, workdir: Path, bind: str) -> None:
        self.port = free_port()
        self.bind = bind
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", f"127.0.0.1 {self.bind}", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        wait_for(lambda: _answers("127.0.0.1", self.port), 10, "the private redis-server to start", every=0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)


def _publish(app: Any, task: str, message_id: str, queue: str) -> bool:
    try:
        app.send_task(task, args=("not a workload",), task_id=message_id, queue=queue)
        return True
    except Exception:
        return False


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Fleet:
    """The stack plus its hosts: start, stop and find each host's worker, partition and heal hosts."""

    def __init__(self, stack: Stack, net: Network, redis_server: HostRedis, home: Path, effects: Path) -> None:
        self.stack = stack
        self.net = net
        self.redis = redis_server
        self.home = home
        self.effects = effects
        self.hosts: dict[str, Host] = {}
        self.delays: list[subprocess.Popen[bytes]] = []

    def node(self, name: str) -> str:
        return f"{name}@{self.hosts[name].hostname}"

    def start_worker(self, name: str, concurrency: int = 4) -> subprocess.Popen[bytes]:
        host = self.hosts[name]
        logs = self.home / "hosts" / name / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**self.stack.env,
               "ASYNCQ_WORKER_NAME": name,
               "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{self.net.gateway}:{self.stack.api_port}/execution/",
               "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(logs)}
        # default, which the DAGs use, and a queue of the host's own, for poison() to reach it alone
        argv = host.command([airflow_bin(), "asyncq", "worker", "-q", f"default,{name}", "-c", str(concurrency),
                             "--hostname", f"{name}@%h"])
        log = open(self.stack.logs / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.stack.procs[name] = proc
        return proc

    def probe(self, inside: str | None = None, *args: str) -> subprocess.CompletedProcess[str]:
        """``airflow asyncq probe`` run inside host ``inside`` (under its hostname), or in the root
        namespace when None."""
        argv = [airflow_bin(), "asyncq", "probe", *args]
        if inside is not None:
            argv = self.hosts[inside].command(argv)
        return subprocess.run(argv, env=self.stack.env, capture_output=True, text=True, timeout=120)

    def worker_log(self, name: str) -> str:
        return (self.stack.logs / f"{name}.log").read_text(errors="replace")

    def record(self, name: str) -> dict[str, str]:
        return self.redis.client().hgetall(f"{PREFIX}:worker:{self.node(name)}")

    def wait_consuming(self, name: str, since: float = 0.0, timeout: float = 180) -> float:
        """Until the host's registry record shows a consumer tick after ``since`` (wall clock)."""
        def ticked() -> float | None:
            with contextlib.suppress(redis.RedisError, ValueError):
                tick = float(self.record(name).get("consumer_tick_at") or 0)
                return tick if tick > since else None
            return None
        return wait_for(ticked, timeout, f"worker {name} to consume", self.stack)

    def poison(self, name: str) -> str:
        """A message only host ``name`` consumes, which it dead-letters at once (it is not a workload):
        proof that its consumer receives. Publishing is retried while Redis is away."""
        from airflow_asyncq_provider.broker.config import make_celery_app
        from airflow_asyncq_provider.broker.messages import EXECUTE_WORKLOAD
        from airflow_asyncq_provider.settings import AsyncQSettings

        message_id = f"probe-{name}-{uuid.uuid4().hex[:8]}"
        app = make_celery_app(AsyncQSettings(broker_url=self.redis.url, key_prefix=PREFIX))
        wait_for(lambda: _publish(app, EXECUTE_WORKLOAD, message_id, name), 60, f"a publish to queue {name}")
        return message_id

    def dead_lettered(self, message_id: str) -> dict[str, Any] | None:
        with contextlib.suppress(redis.RedisError):
            for raw in self.redis.client().lrange(f"{PREFIX}:dlq", 0, 200):
                entry = json.loads(raw)
                if entry.get("id") == message_id:
                    return entry
        return None

    def in_maintenance(self) -> set[str]:
        """The hosts whose maintenance record is in Redis: what each worker reads on its heartbeat."""
        from airflow_asyncq_provider.state import registry
        from airflow_asyncq_provider.state.keys import Keys

        client = self.redis.client()
        return {name for name in self.hosts if registry.maintenance(client, Keys(PREFIX), self.node(name))}

    def _maintenance_logged(self, name: str, state: str) -> int:
        """How often host ``name``'s worker logged that it read its maintenance record turn ``state``."""
        return self.worker_log(name).count(f"Maintenance {state} for {self.node(name)}")

    def maintenance(self, changes: dict[str, bool]) -> None:
        """``airflow asyncq maintenance NODE on|off`` for each host, all at once (each is an Airflow CLI
        start, seconds on a loaded machine); returns once each worker has read its new state (it reads
        its record on each heartbeat and logs every change)."""
        states = {name: "on" if on else "off" for name, on in changes.items()}
        before = {name: self._maintenance_logged(name, state) for name, state in states.items()}
        procs = {name: subprocess.Popen([airflow_bin(), "asyncq", "maintenance", self.node(name), state],
                                        env=self.stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                 for name, state in states.items()}
        for proc in procs.values():
            _out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
        for name, state in states.items():
            wait_for(lambda name=name, state=state: self._maintenance_logged(name, state) > before[name], 30,
                     f"{name} to read its maintenance {state}", self.stack)

    def steer(self, wanted: set[str]) -> None:
        """Exactly the hosts ``wanted`` in maintenance; only the hosts whose record differs are changed."""
        now = self.in_maintenance()
        self.maintenance({name: name in wanted for name in sorted(now ^ wanted)})

    def only(self, name: str) -> None:
        """Let only ``name`` take work: every other host goes into maintenance."""
        self.steer({n for n in self.hosts if n != name})

    def everyone(self) -> None:
        self.steer(set())

    def slow_link(self, names: list[str], delay: float, loss: float, seconds: float) -> None:
        """What ``tc netem delay <delay> loss <loss>`` would do on each host's Redis traffic (linkdelay.py):
        every packet a host sends to Redis waits ``delay`` seconds, and ``loss`` of them are dropped."""
        for queue, name in enumerate(names, start=1):
            host = self.hosts[name]
            self.delays.append(subprocess.Popen(
                ["ip", "netns", "exec", host.netns, sys.executable, str(LINKDELAY), "--queue", str(queue),
                 "--delay", str(delay), "--loss", str(loss), "--seconds", str(seconds)],
                stderr=open(self.stack.logs / f"linkdelay-{name}.log", "ab")))  # noqa: SIM115
            host.iptables("-I", "OUTPUT", "-p", "tcp", "-d", self.net.gateway, "--dport", str(self.redis.port),
                          "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass")

    def heal_all(self) -> None:
        for host in self.hosts.values():
            with contextlib.suppress(RuntimeError):
                host.heal()
        for proc in self.delays:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        self.delays.clear()

    def runs(self, dag_id: str, run_id: str, tag: str | None = None) -> list[list[str]]:
        rows = read_effects(self.effects, dag_id, run_id)
        return [r for r in rows if tag is None or r[0] == tag]


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    _require(5432, "PostgreSQL")
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; run `make services`")
    tag = uuid.uuid4().hex[:4]
    net = Network.create(tag)  # fails, never skips, without root, ip or iptables
    stack: Stack | None = None
    fleet: Fleet | None = None
    server: HostRedis | None = None
    db = f"asyncq_hosts_{os.getpid()}"
    try:
        home = tmp_path_factory.mktemp("hosts_home")
        effects_dir = tmp_path_factory.mktemp("hosts_effects")
        effects_dir.chmod(0o777)
        effects = effects_dir / "side_effects.log"
        server = HostRedis(tmp_path_factory.mktemp("hosts_redis"), net.gateway)
        server.start()
        _psql(f"DROP DATABASE IF EXISTS {db}")
        _psql(f"CREATE DATABASE {db}")
        stack = Stack(home, sql_conn=PG.format(db=db), broker_url=server.url, key_prefix=PREFIX, extra_env={
            "ASYNCQ_SIDE_EFFECTS": str(effects),
            "AIRFLOW__ASYNCQ__WORKER_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "AIRFLOW__ASYNCQ__WORKER_LOST_TIMEOUT": str(LOST_TIMEOUT),
            "AIRFLOW__ASYNCQ__PUBLISH_TIMEOUT": str(PUBLISH_TIMEOUT),
            "AIRFLOW__ASYNCQ__KILL_GRACE_PERIOD": str(KILL_GRACE),
            "AIRFLOW__ASYNCQ__WORKER_DRAIN_TIMEOUT": "5",
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "120",
        })
        fleet = Fleet(stack, net, server, home, effects)
        for name in HOSTS:
            fleet.hosts[name] = net.add_host(name)
        stack.migrate()
        stack.start_core()
        for name in HOSTS:
            fleet.start_worker(name)
        stack.wait_api()
        for name in HOSTS:
            fleet.wait_consuming(name)
        yield fleet
    finally:
        if fleet is not None:
            fleet.heal_all()  # stops the link delays: the namespaces go with net.destroy()
        if stack is not None:
            stack.stop()
            if os.environ.get("ASYNCQ_KEEP_LOGS"):
                shutil.copytree(stack.logs, Path(os.environ["ASYNCQ_KEEP_LOGS"]) / "hosts", dirs_exist_ok=True)
        net.destroy()
        if server is not None:
            server.stop()
        with contextlib.suppress(subprocess.CalledProcessError):
            _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


@pytest.fixture
def healed(fleet: Fleet) -> Iterator[Fleet]:
    """Every case starts and ends with every host connected, consuming and out of maintenance."""
    yield fleet
    fleet.heal_all()
    fleet.everyone()
    healed_at = time.time()
    for name in fleet.hosts:
        fleet.wait_consuming(name, since=healed_at)
