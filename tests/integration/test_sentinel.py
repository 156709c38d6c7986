"""Redis Sentinel against real processes: a master, a replica (``--replicaof``) and three sentinels
(``redis-server <conf> --sentinel``), each on a free port of 127.0.0.1 in a tmp dir, with passwords on
the Redis pair (in the URL) and on the sentinels (``sentinel_password``).

What is proved: the state client, a Celery publish/consume through kombu's Sentinel transport and the
native result backend all work through the sentinels; after ``SENTINEL FAILOVER`` and after a SIGKILL of
the master the *same* client object writes to the new master within a bounded time (printed); and a real
``airflow asyncq worker`` claims a workload published before a failover and one published after it,
without a restart. Every process is ours, started and killed here; missing redis-server fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from airflow_asyncq_provider.broker.config import make_celery_app, native_config
from airflow_asyncq_provider.broker.messages import EXECUTE_WORKLOAD, send_workload
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import registry
from airflow_asyncq_provider.state.client import connect
from airflow_asyncq_provider.state.keys import Keys

from ._support import WorkerProcess, airflow_env, run_airflow, wait_for
from .test_worker import _jwt_like

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MASTER_NAME = "asyncq-it"
MASTER_PW = "m4ster-pw-it"
SENTINEL_PW = "s3ntinel-pw-it"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
RECOVERY_DEADLINE = 30.0  # seconds a client may take to write to the new master


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class SentinelGroup:
    """One master, one replica, three sentinels: our own processes, found by port."""

    dir: Path
    redis_ports: list[int]
    sentinel_ports: list[int]
    procs: dict[int, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)

    @property
    def url(self) -> str:
        # kombu's form; the master's password and database on the first part, as kombu reads them
        first, *rest = self.sentinel_ports
        return ";".join([f"sentinel://:{MASTER_PW}@127.0.0.1:{first}/0",
                         *(f"sentinel://127.0.0.1:{port}" for port in rest)])

    def settings(self, **overrides: object) -> AsyncQSettings:
        values: dict[str, object] = {"broker_url": self.url, "sentinel_master": MASTER_NAME,
                                     "sentinel_password": SENTINEL_PW, "publish_timeout": 2.0,
                                     "key_prefix": f"sit-{uuid.uuid4().hex[:8]}", **overrides}
        return AsyncQSettings(**values)  # type: ignore[arg-type]

    def sentinel(self, port: int | None = None) -> redis.Redis:
        return redis.Redis("127.0.0.1", port or self.sentinel_ports[0], password=SENTINEL_PW,
                           decode_responses=True, socket_timeout=2, socket_connect_timeout=2)

    def direct(self, port: int) -> redis.Redis:
        return redis.Redis("127.0.0.1", port, password=MASTER_PW, decode_responses=True, socket_timeout=2,
                           socket_connect_timeout=2)

    def master_port(self, sentinel_port: int | None = None) -> int:
        _host, port = self.sentinel(sentinel_port).sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    def start_redis(self, port: int, replica_of: int | None = None) -> None:
        conf = self.dir / f"redis-{port}.conf"
        lines = [f"port {port}", "bind 127.0.0.1", "save \"\"", "appendonly no", f"dir {self.dir}",
                 f"requirepass {MASTER_PW}", f"masterauth {MASTER_PW}", f"logfile redis-{port}.log",
                 # sentinels and replicas announce 127.0.0.1, as the clients reach it
                 "replica-announce-ip 127.0.0.1"]
        if replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        conf.write_text("\n".join(lines) + "\n")  # a file: sentinels run CONFIG REWRITE on a failover
        self.procs[port] = subprocess.Popen(["redis-server", str(conf)], cwd=self.dir,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def start_sentinel(self, port: int, master_port: int) -> None:
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", f"dir {self.dir}", f"logfile sentinel-{port}.log",
            f"requirepass {SENTINEL_PW}", f"sentinel sentinel-pass {SENTINEL_PW}",
            "sentinel announce-ip 127.0.0.1",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2",
            f"sentinel auth-pass {MASTER_NAME} {MASTER_PW}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]) + "\n")
        self.procs[port] = subprocess.Popen(["redis-server", str(conf), "--sentinel"], cwd=self.dir,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted(self.dir.glob("*.log")))

    def _ready(self, master_port: int) -> bool:
        for port in self.sentinel_ports:
            try:
                client = self.sentinel(port)
                master = client.sentinel_master(MASTER_NAME)
                replicas = client.sentinel_slaves(MASTER_NAME)
            except redis.RedisError:
                return False
            if int(master["port"]) != master_port or master["num-other-sentinels"] != 2:
                return False
            good = [r for r in replicas if not (r["is_sdown"] or r["is_odown"])
                    and r.get("master-link-status") == "ok"]
            if len(good) != len(self.redis_ports) - 1:
                return False
        return True

    def wait_ready(self, master_port: int, timeout: float = 45) -> None:
        """Every sentinel names this master, knows the other two and sees a replica in sync."""
        wait_for(lambda: self._ready(master_port), timeout,
                 lambda: f"the sentinels to agree on master :{master_port} with a healthy replica\n"
                         f"{self.logs()}", interval=0.2)

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A fresh group per test: a failover changes who the master is, and a SIGKILL leaves one Redis."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; the Sentinel tests need it")
    ports = [_free_port() for _ in range(5)]
    group = SentinelGroup(tmp_path, redis_ports=ports[:2], sentinel_ports=ports[2:])
    try:
        master, replica = group.redis_ports
        group.start_redis(master)
        wait_for(lambda: _answers(group.direct(master)), 10, lambda: f"the master\n{group.logs()}")
        group.start_redis(replica, replica_of=master)
        wait_for(lambda: _in_sync(group.direct(replica)), 15, lambda: f"the replica to sync\n{group.logs()}")
        for port in group.sentinel_ports:
            group.start_sentinel(port, master)
        group.wait_ready(master)
        yield group
    finally:
        group.stop()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _in_sync(client: redis.Redis) -> bool:
    try:
        return client.info("replication").get("master_link_status") == "up"
    except redis.RedisError:
        return False


@dataclasses.dataclass
class Recovery:
    seconds: float  # from the failover (or kill) to the first write read back from the new master
    new_master: int
    failed: int  # writes that raised
    stranded: int  # writes the old master accepted before its demotion: lost with it


def _write_until_on(client: redis.Redis, group: SentinelGroup, old_master: int, key: str,
                    started: float) -> Recovery:
    """Write a new value each round through ``client`` until one is read back from the master the
    sentinels now name (not ``old_master``). A write that the old master accepted before its demotion
    does not count: it is lost when the old master becomes a replica (asynchronous replication)."""
    deadline = started + RECOVERY_DEADLINE
    failed = stranded = 0
    for attempt in range(100_000):  # bounded by the deadline as well
        value = f"v{attempt}"
        try:
            client.set(key, value)
        except redis.RedisError:
            failed += 1
        else:
            with contextlib.suppress(redis.RedisError):
                port = group.master_port()
                if port != old_master and group.direct(port).get(key) == value:
                    return Recovery(time.monotonic() - started, port, failed, stranded)
            stranded += 1
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"no write reached a new master within {RECOVERY_DEADLINE:g} s "
                         f"({failed} failed, {stranded} on the old master)\n{group.logs()}")


def _role(client: redis.Redis) -> str | None:
    try:
        return str(client.info("replication")["role"])
    except redis.RedisError:
        return None


# ------------------------------------------------------------------------------------------------ tests


def test_state_client_writes_and_reads_through_the_master(group: SentinelGroup) -> None:
    settings = group.settings()
    client = connect(settings, "test")  # PING, then INFO: a standalone master, not a cluster
    client.set("probe", "through-sentinel", ex=60)
    assert client.get("probe") == "through-sentinel"
    master, replica = group.redis_ports
    assert client.connection_pool.master_address == ("127.0.0.1", master)
    assert group.direct(master).get("probe") == "through-sentinel"
    assert wait_for(lambda: group.direct(replica).get("probe"), 5, "the replica to copy the write") \
        == "through-sentinel"
    assert client.info("replication")["role"] == "master"


def test_a_wrong_sentinel_password_names_the_option(group: SentinelGroup) -> None:
    from airflow_asyncq_provider.errors import BrokerUnavailable

    settings = group.settings(sentinel_password="not-it", publish_timeout=1.0)
    with pytest.raises(BrokerUnavailable) as err:
        connect(settings, "test")
    message = str(err.value)
    assert "sentinel_password" in message and MASTER_PW not in message and "not-it" not in message


def test_publish_through_the_sentinels_and_consume_through_kombus_sentinel_transport(
        group: SentinelGroup) -> None:
    """The executor publishes with redis-py's Sentinel client, a worker consumes with kombu's."""
    settings = group.settings()
    queue, task_id = f"sq_{uuid.uuid4().hex[:8]}", f"it-{uuid.uuid4()}"
    app = make_celery_app(settings)
    try:
        send_workload(connect(settings, "test"), task_id=task_id, payload='{"type": "ExecuteTask"}', meta=None,
                      queue=queue)
        # the message is a list on the master, named after the queue (kombu's Redis layout)
        master = group.direct(group.redis_ports[0])
        assert master.llen(queue) == 1
        with app.connection_for_read() as connection:
            assert connection.transport.driver_type == "redis" and connection.transport_cls == "sentinel"
            simple = connection.SimpleQueue(queue)
            try:
                message = simple.get(timeout=10)
                assert message.headers["id"] == task_id and message.headers["task"] == EXECUTE_WORKLOAD
                assert message.payload[0] == ['{"type": "ExecuteTask"}', None]
                message.ack()
            finally:
                simple.close()
        assert master.llen(queue) == 0
    finally:
        app.close()


def test_native_result_backend_through_celerys_sentinel_backend(group: SentinelGroup) -> None:
    from celery import Celery

    settings = group.settings()
    app = Celery("asyncq-native-it", set_as_current=False)
    app.conf.update(native_config(settings))
    task_id = f"it-{uuid.uuid4()}"
    try:
        app.backend.store_result(task_id, {"answer": 42}, "SUCCESS")
        assert app.AsyncResult(task_id).get(timeout=10) == {"answer": 42}
        raw = group.direct(group.redis_ports[0]).get(Keys(settings.key_prefix).native_result(task_id))
        assert raw is not None and '"answer": 42' in raw
    finally:
        app.close()


def test_sentinel_failover_the_same_client_writes_to_the_new_master(group: SentinelGroup) -> None:
    settings = group.settings()
    client = connect(settings, "test")
    client.set("before", "1")
    old_master, replica = group.redis_ports
    started = time.monotonic()
    assert group.sentinel().execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
    recovery = _write_until_on(client, group, old_master, "after-failover", started)
    print(f"\nSENTINEL FAILOVER -> first write on the new master: {recovery.seconds:.2f} s "
          f"({recovery.failed} writes failed, {recovery.stranded} went to the old master before its demotion)")
    assert recovery.new_master == replica
    assert client.connection_pool.master_address == ("127.0.0.1", replica)
    assert client.get("before") == "1"  # replicated before the failover, so kept
    # the old master lives on as the new master's replica
    wait_for(lambda: _role(group.direct(old_master)) == "slave", 15, "the old master to become a replica")
    assert recovery.seconds < RECOVERY_DEADLINE


def test_sigkill_of_the_master_the_client_recovers_after_promotion(group: SentinelGroup) -> None:
    settings = group.settings()
    client = connect(settings, "test")
    client.set("before", "1")
    old_master, replica = group.redis_ports
    wait_for(lambda: group.direct(replica).get("before") == "1", 5, "the replica to copy the write")
    started = time.monotonic()
    group.kill(old_master)
    recovery = _write_until_on(client, group, old_master, "after-kill", started)
    print(f"\nSIGKILL of the master -> first write on the promoted replica: {recovery.seconds:.2f} s "
          f"({recovery.failed} writes failed; down-after-milliseconds {DOWN_AFTER_MS})")
    assert recovery.new_master == replica and recovery.stranded == 0
    assert client.get("before") == "1"
    assert recovery.seconds < RECOVERY_DEADLINE


@pytest.mark.parametrize("how", ["failover", "sigkill"])
def test_a_real_worker_follows_a_failover_without_a_restart(group: SentinelGroup, tmp_path: Path,
                                                            make_workload, how: str) -> None:
    """``failover``: a planned SENTINEL FAILOVER, the old master stays up; ``sigkill``: the master dies."""
    from celery.utils.nodenames import host_format

    settings = group.settings()
    uid = uuid.uuid4().hex[:8]
    queue, node = f"sq_{uid}", f"sit-{uid}@%h"
    hostname = host_format(node)
    keys = Keys(settings.key_prefix)
    env = airflow_env(tmp_path, broker_url=settings.broker_url, sentinel_master=MASTER_NAME,
                      sentinel_password=SENTINEL_PW, key_prefix=settings.key_prefix,
                      worker_heartbeat_interval="1", worker_lost_timeout="5")
    # No api-server here: a claimed workload's supervisor fails fast at the Execution API.
    env.update({"AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://127.0.0.1:1/execution/",
                "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "0"})
    worker = WorkerProcess(["-q", queue, "-c", "2", "--hostname", node, "--skip-serve-logs"], env,
                           tmp_path / "worker.log")
    client = connect(settings, "test")
    publisher = connect(settings, "test")

    def publish() -> str:
        """Like the executor, which retries a failed publish on its next heartbeats: during a failover
        the sentinels can for a moment name no healthy master, or the old one refuses writes."""
        workload = make_workload(queue=queue).model_copy(update={"token": _jwt_like(time.time() + 3600)})
        task_id = workload.ti.external_executor_id
        deadline = time.monotonic() + RECOVERY_DEADLINE
        for _attempt in range(1000):  # bounded by the deadline as well
            try:
                send_workload(publisher, task_id=task_id, payload=workload.model_dump_json(), meta=None,
                              queue=queue)
                return task_id
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable: the deadline ends the loop")

    def claimed(task_id: str, timeout: float) -> None:
        def by_us() -> bool:
            assert worker.alive(), f"the worker died:\n{worker.output()[-5000:]}"
            with contextlib.suppress(redis.RedisError):
                return client.hget(keys.task(task_id), "claimed_by") == hostname
            return False

        wait_for(by_us, timeout, lambda: f"{hostname} to claim {task_id}\n{worker.output()[-4000:]}\n"
                                         f"{group.logs()}", interval=0.1)

    try:
        wait_for(lambda: not worker.alive() or f"{hostname} ready." in worker.output(), 90,
                 lambda: f"the worker to be ready\n{worker.output()[-4000:]}")
        assert worker.alive(), worker.output()[-4000:]
        assert registry.alive(client, keys, [hostname]) == {hostname: True}
        before = publish()
        claimed(before, 30)

        old_master, replica = group.redis_ports
        started, wall = time.monotonic(), time.time()
        if how == "failover":
            assert group.sentinel().execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        else:
            group.kill(old_master)
        wait_for(lambda: group.master_port() == replica, RECOVERY_DEADLINE, "the sentinels to switch master")
        switched = time.monotonic() - started
        if how == "failover":
            # Until the sentinels demote the old master, every client (kombu's too) may still use it, and
            # a message published there is lost with it; publish once it is a replica, so that the worker
            # can only claim the message by consuming from the new master.
            wait_for(lambda: _role(group.direct(old_master)) == "slave", RECOVERY_DEADLINE,
                     lambda: f"the old master to become a replica\n{group.logs()}")
        ready = time.monotonic() - started
        after = publish()  # the same client: the publisher follows the failover too
        claimed(after, 60)
        took = time.monotonic() - started
        what = "SENTINEL FAILOVER" if how == "failover" else "SIGKILL of the master"
        print(f"\n{what} -> the worker claimed a workload published after it: {took:.2f} s "
              f"(sentinels switched after {switched:.2f} s, published at {ready:.2f} s"
              f"{' once the old master was demoted' if how == 'failover' else ''}, "
              f"claimed {took - ready:.2f} s after that)")
        new_master = group.direct(replica)
        assert new_master.hget(keys.task(after), "claimed_by") == hostname  # written to the new master
        assert new_master.llen(queue) == 0  # and consumed from it
        # the heartbeat thread's client followed too: a heartbeat written after the failover
        wait_for(lambda: float(registry.live_workers(new_master, keys).get(hostname, {})
                               .get("heartbeat_at", 0)) > wall, 10, "a heartbeat on the new master")
        assert client.connection_pool.master_address == ("127.0.0.1", replica)
        assert worker.alive()
        # and the CLI, a new process, finds the new master through the same settings
        result = run_airflow(["asyncq", "status", "--json"], env)
        assert result.returncode == 0, result.stderr[-3000:]
        shown = json.loads(result.stdout)
        assert shown["broker"] == settings.broker_url.replace(MASTER_PW, "***")
        assert hostname in {row["worker"] for row in shown["workers"]}
        assert MASTER_PW not in result.stdout + result.stderr and SENTINEL_PW not in result.stdout + result.stderr
    finally:
        code = worker.stop()
        publisher.close()
    output = worker.output()
    assert code == 0, f"worker exit code {code}:\n{output[-3000:]}"
    assert MASTER_PW not in output and SENTINEL_PW not in output, "a password reached the worker's log"
