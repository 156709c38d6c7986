"""Redis under Sentinel for the chaos run: a master, a replica and three sentinels, our own processes.

Every one of them listens on 127.0.0.1 and on the bridge's address (the worker hosts' gateway), and
announces the bridge's address, so the core in the root namespace and the hosts in theirs are sent to
the same place by the sentinels. The Redis pair has a password (in the broker URL) and so have the
sentinels (``[asyncq] sentinel_password``), as in tests/integration/test_sentinel.py.

The run kills and restarts these servers; ``healthy`` says when the group can take the next Redis fault
(every sentinel names the same master, knows the other two, and sees a replica in sync).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.sentinel import Sentinel

from devtools.stack import free_port

MASTER_NAME = "asyncq-chaos"
MASTER_PW = "chaos-m4ster-pw"
SENTINEL_PW = "chaos-s3ntinel-pw"
DOWN_AFTER_MS = 2000  # not 1 s as in the integration test: on a loaded machine a false failover is a fault we did not plan
FAILOVER_TIMEOUT_MS = 10000


class SentinelGroup:
    def __init__(self, workdir: Path, bind: str) -> None:
        self.dir = workdir
        self.bind = bind
        self.redis_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port(), free_port(), free_port()]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._client: redis.Redis | None = None

    # ------------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        """kombu's form: the master's password and database on the first part only."""
        first, *rest = self.sentinel_ports
        return ";".join([f"sentinel://:{MASTER_PW}@{self.bind}:{first}/0",
                         *(f"sentinel://{self.bind}:{port}" for port in rest)])

    @property
    def ports(self) -> list[int]:
        return [*self.redis_ports, *self.sentinel_ports]

    def env(self) -> dict[str, str]:
        return {"AIRFLOW__ASYNCQ__SENTINEL_MASTER": MASTER_NAME, "AIRFLOW__ASYNCQ__SENTINEL_PASSWORD": SENTINEL_PW}

    # ------------------------------------------------------------------ clients
    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis("127.0.0.1", port, password=SENTINEL_PW, decode_responses=True, socket_timeout=2,
                           socket_connect_timeout=2)

    def direct(self, port: int) -> redis.Redis:
        return redis.Redis("127.0.0.1", port, password=MASTER_PW, decode_responses=True, socket_timeout=2,
                           socket_connect_timeout=2)

    def client(self) -> redis.Redis:
        """The master, whichever it is now (redis-py asks the sentinels again after a connection error)."""
        if self._client is None:
            sentinels = Sentinel([("127.0.0.1", p) for p in self.sentinel_ports], socket_timeout=2,
                                 sentinel_kwargs={"password": SENTINEL_PW, "socket_timeout": 2})
            self._client = sentinels.master_for(MASTER_NAME, password=MASTER_PW, decode_responses=True,
                                                socket_timeout=2, socket_connect_timeout=2)
        return self._client

    def master_port(self) -> int | None:
        """The master the sentinels name (the first that answers), or None."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError, TypeError):
                _host, master = self.sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(master)
        return None

    def role(self, port: int) -> str | None:
        try:
            return str(self.direct(port).info("replication")["role"])
        except redis.RedisError:
            return None

    # ------------------------------------------------------------------ processes
    def start(self) -> None:
        master, replica = self.redis_ports
        self.start_redis(master)
        self._wait(lambda: self.role(master) == "master", 15, "the master to start")
        self.start_redis(replica, replica_of=master)
        self._wait(lambda: self._in_sync(replica), 20, "the replica to sync")
        for port in self.sentinel_ports:
            self.start_sentinel(port, master)
        self._wait(self.healthy, 60, "the sentinels to agree")

    def start_redis(self, port: int, replica_of: int | None = None) -> None:
        """A config file, not flags: the sentinels CONFIG REWRITE it when they reconfigure the server."""
        conf = self.dir / f"redis-{port}.conf"
        lines = [f"port {port}", f"bind 127.0.0.1 {self.bind}", 'save ""', "appendonly no", f"dir {self.dir}",
                 f"requirepass {MASTER_PW}", f"masterauth {MASTER_PW}", f"logfile redis-{port}.log",
                 "protected-mode no", f"replica-announce-ip {self.bind}"]
        if replica_of is not None:
            lines.append(f"replicaof {self.bind} {replica_of}")
        conf.write_text("\n".join(lines) + "\n")
        self.procs[port] = subprocess.Popen(["redis-server", str(conf)], cwd=self.dir, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.STDOUT)

    def start_sentinel(self, port: int, master_port: int) -> None:
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text("\n".join([
            f"port {port}", f"bind 127.0.0.1 {self.bind}", f"dir {self.dir}", f"logfile sentinel-{port}.log",
            "protected-mode no", f"requirepass {SENTINEL_PW}", f"sentinel sentinel-pass {SENTINEL_PW}",
            f"sentinel announce-ip {self.bind}",
            f"sentinel monitor {MASTER_NAME} {self.bind} {master_port} 2",
            f"sentinel auth-pass {MASTER_NAME} {MASTER_PW}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]) + "\n")
        self.procs[port] = subprocess.Popen(["redis-server", str(conf), "--sentinel"], cwd=self.dir,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()

    def dead(self) -> list[int]:
        """Ports of our servers that exited while nobody meant them to (the run restarts them)."""
        return [port for port, proc in self.procs.items() if proc.poll() is not None]

    # ------------------------------------------------------------------ health
    def _in_sync(self, port: int) -> bool:
        try:
            return self.direct(port).info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def healthy(self) -> bool:
        """Every sentinel names one master of ours that is up, knows the other two sentinels, and sees
        the other Redis as a replica in sync: the group can survive its next fault."""
        masters = set()
        for port in self.sentinel_ports:
            try:
                client = self.sentinel(port)
                master = client.sentinel_master(MASTER_NAME)
                replicas = client.sentinel_slaves(MASTER_NAME)
            except redis.RedisError:
                return False
            if master.get("is_sdown") or master.get("is_odown") or master["num-other-sentinels"] != 2:
                return False
            good = [r for r in replicas if not (r["is_sdown"] or r["is_odown"])
                    and r.get("master-link-status") == "ok"]
            if len(good) != 1:
                return False
            masters.add(int(master["port"]))
        if len(masters) != 1:
            return False
        (master_port,) = masters
        (replica,) = [p for p in self.redis_ports if p != master_port]
        return self.role(master_port) == "master" and self._in_sync(replica)

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return True
            time.sleep(0.5)
        return False

    def logs(self, tail: int = 1500) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.dir.glob("*.log")))

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")
