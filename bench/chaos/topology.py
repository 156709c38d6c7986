"""The chaos run's deployment, and everything needed to take it down again, even after a crash.

    root namespace                                   bridge 10.77.<n>.1/24 (tests/system/hosts/network.py)
      api-server, scheduler, scheduler-b,              ├── h1  10.77.<n>.11  own hostname, own log dir
      dag-processor, triggerer, PostgreSQL             ├── h2  10.77.<n>.12
      Redis master + replica + 3 sentinels  ──────────┘└── h3  10.77.<n>.13
        (127.0.0.1 and 10.77.<n>.1)
      the side-effect server (sink.py, a thread of the harness, on 10.77.<n>.1)

It reuses the hosts tier as it is: ``Network`` for the namespaces, veths, hostnames and iptables, and
``Fleet`` for starting a host's worker and reading its registry record. ``Fleet`` was written for one
standalone Redis, so it gets the Sentinel group in that Redis's place (``client()`` and ``url`` are all it
uses of it here), with every Redis server and sentinel on the bridge's address.

Cleanup: the run records its pid, home and database in ``/run/asyncq-chaos/state.json`` before it starts
anything. ``Network`` keeps its own state file, so a run that crashed has its namespaces removed by the
next one; our processes are found again by what they carry (``AIRFLOW_HOME=<home>`` in their
environment, or a working directory inside ``<home>``), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.chaos.sentinel import SentinelGroup
from bench.chaos.sink import SideEffectServer
from devtools.stack import Stack
from tests.system.hosts import conftest as hosts
from tests.system.hosts.network import Network, cleanup_stale

REPO = Path(__file__).resolve().parents[2]
HOME = REPO / ".stack-chaos"
DAGS = Path(__file__).resolve().parent / "dags"
DB = "asyncq_chaos"
STATE = Path("/run/asyncq-chaos/state.json")
HOSTS = hosts.HOSTS
SCHEDULERS = ("scheduler", "scheduler-b")
JOB_ID = re.compile(r"\(scheduler job_id=(\d+)\)")
CONCURRENCY = 4  # per host: 12 slots on the fleet, as the hosts tier runs


def psql(query: str, db: str = "postgres") -> str:
    return subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1",
                           "-AtF", "\t", "-c", query], check=True, capture_output=True, text=True,
                          timeout=120).stdout


# ---------------------------------------------------------------------------------------- leftovers
def _ours(pid: int, home: Path) -> bool:
    """A process a chaos run started: it runs with our AIRFLOW_HOME, inside our home (Redis), or writes
    its output there (every component, and its children)."""
    with contextlib.suppress(OSError):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"AIRFLOW_HOME=") and Path(item[13:].decode(errors="replace")).is_relative_to(home):
                return True
    # a process title (the api-server's) overwrites what /proc shows as its environment: look at where
    # it runs and where its output goes too
    for link in ("cwd", "fd/1", "fd/2"):
        with contextlib.suppress(OSError):
            if Path(os.readlink(f"/proc/{pid}/{link}")).is_relative_to(home):
                return True
    return False


def kill_ours(home: Path = HOME) -> list[int]:
    """SIGKILL every process of ours that is still there; returns their pids."""
    me = os.getpid()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        if _ours(pid, home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def cleanup_leftovers() -> list[str]:
    """What an earlier run that died left behind: processes, namespaces, the database."""
    done = []
    if STATE.exists():
        with contextlib.suppress(ValueError, OSError):
            state = json.loads(STATE.read_text())
            pid = int(state.get("pid", 0))
            alive = pid > 0 and Path(f"/proc/{pid}").exists()
            if alive and pid != os.getpid():
                raise RuntimeError(f"another chaos run (pid {pid}) is still running; stop it first")
    killed = kill_ours()
    if killed:
        done.append(f"killed {len(killed)} leftover process(es)")
    done += [f"removed network {tag}" for tag in cleanup_stale()]
    if STATE.exists():
        with contextlib.suppress(subprocess.SubprocessError):
            psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
            done.append(f"dropped database {DB}")
        STATE.unlink()
    return done


def write_state(net: Network | None) -> None:
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps({"pid": os.getpid(), "home": str(HOME), "db": DB,
                                 "network": net.tag if net else None}))


# ---------------------------------------------------------------------------------------- deployment
class Deployment:
    """The core, the Sentinel group and the hosts; ``close()`` removes all of it and may run twice."""

    def __init__(self) -> None:
        self.net: Network | None = None
        self.redis: SentinelGroup | None = None
        self.stack: Stack | None = None
        self.fleet: hosts.Fleet | None = None
        self.effects = HOME / "effects" / "side_effects.log"  # written by the sink, read by account.py
        self.sink: SideEffectServer | None = None
        self.linkdelays: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, log) -> None:
        shutil.rmtree(HOME, ignore_errors=True)
        (HOME / "redis").mkdir(parents=True)
        self.effects.parent.mkdir(parents=True)
        self.effects.parent.chmod(0o777)
        write_state(None)
        tag = f"c{os.getpid() % 1000:03d}"
        self.net = Network.create(tag)
        write_state(self.net)
        for name in HOSTS:
            self.net.add_host(name)
        log(f"network {tag}: bridge {self.net.gateway}, hosts "
            + ", ".join(f"{h.name}={h.address} ({h.hostname})" for h in self.net.hosts))
        self.redis = SentinelGroup(HOME / "redis", self.net.gateway)
        self.redis.start()
        log(f"Redis master :{self.redis.redis_ports[0]}, replica :{self.redis.redis_ports[1]}, sentinels "
            + ", ".join(f":{p}" for p in self.redis.sentinel_ports))
        # before the stack, whose environment carries its URL to every worker
        self.sink = SideEffectServer(self.effects, self.net.gateway, log=log)
        self.sink.start()
        log(f"side-effect server {self.sink.url}, writing {self.effects}")
        psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        psql(f"CREATE DATABASE {DB}")
        self.stack = Stack(HOME / "airflow", sql_conn=hosts.PG.format(db=DB), broker_url=self.redis.url,
                           key_prefix=hosts.PREFIX, dags_folder=DAGS, extra_env={
                               **self.redis.env(),
                               "ASYNCQ_SIDE_EFFECTS": self.sink.url,  # a network write (sink.py)
                               # the hosts tier's timeouts (tests/system/hosts/conftest.py)
                               "AIRFLOW__ASYNCQ__WORKER_HEARTBEAT_INTERVAL": str(hosts.HEARTBEAT),
                               "AIRFLOW__ASYNCQ__WORKER_LOST_TIMEOUT": str(hosts.LOST_TIMEOUT),
                               "AIRFLOW__ASYNCQ__PUBLISH_TIMEOUT": str(hosts.PUBLISH_TIMEOUT),
                               "AIRFLOW__ASYNCQ__KILL_GRACE_PERIOD": str(hosts.KILL_GRACE),
                               "AIRFLOW__ASYNCQ__WORKER_DRAIN_TIMEOUT": "5",
                               "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
                               "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "30",
                               "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "120",
                               "AIRFLOW__CORE__MAX_MAP_LENGTH": "2048",
                           })
        self.fleet = hosts.Fleet(self.stack, self.net, self.redis, HOME / "airflow", self.effects)  # type: ignore[arg-type]
        for host in self.net.hosts:
            self.fleet.hosts[host.name] = host
        self.stack.migrate()
        self.stack.start_core()
        self.stack.spawn("scheduler-b", "scheduler")
        for name in HOSTS:
            self.start_worker(name)
        self.stack.wait_api()
        for name in HOSTS:
            self.fleet.wait_consuming(name, timeout=240)
        log("core (two schedulers) and three hosts are up, every host consuming")

    # ------------------------------------------------------------------ components
    def start_worker(self, name: str) -> None:
        assert self.fleet is not None
        self.fleet.start_worker(name, concurrency=CONCURRENCY)

    def start_scheduler(self, name: str) -> None:
        assert self.stack is not None
        self.stack.spawn(name, "scheduler")

    def restart_core(self, name: str) -> None:
        """A core component that exited by itself, started again as its supervisor would."""
        assert self.stack is not None
        self.stack.procs.pop(name, None)
        if name in SCHEDULERS:
            self.start_scheduler(name)
        elif name in HOSTS:
            self.start_worker(name)
        elif name == "api-server":
            self.stack.spawn(name, "api-server", "--port", str(self.stack.api_port))
        else:
            self.stack.spawn(name, name)

    def kill_host(self, name: str) -> int:
        """SIGKILL every process of the host (its worker, fork server, supervisors, tasks, log server),
        as when the machine dies: all the namespace's processes but our link delay. Returns how many."""
        assert self.net is not None and self.stack is not None
        host = self.fleet.hosts[name] if self.fleet else None
        assert host is not None
        spare = {p.pid for p in self.linkdelays.values() if p.poll() is None}
        pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True,
                                               text=True, timeout=30).stdout.split()]
        victims = [p for p in pids if p not in spare]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc = self.stack.procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        return len(victims)

    def scheduler_job(self, name: str) -> tuple[int | None, list[list[Any]]]:
        """The scheduler's job id, as its log last named it since it last started ("Setting the following
        tasks to queued state (scheduler job_id=N)"), and the task instances that job has queued or running
        now, as [run_id, task_id, map_index]. (None, []) when this incarnation has queued nothing yet."""
        assert self.stack is not None
        path = self.stack.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        found = JOB_ID.findall(text[max(0, text.rfind("Starting the scheduler")):])
        if not found:
            return None, []
        job = int(found[-1])
        try:
            rows = psql(f"SELECT run_id, task_id, map_index FROM task_instance WHERE queued_by_job_id = {job} "
                        f"AND state IN ('queued', 'running')", DB)
        except subprocess.SubprocessError:
            return job, []
        return job, [[r[0], r[1], int(r[2])] for r in (line.split("\t") for line in rows.splitlines() if line)]

    def kill_scheduler(self, name: str) -> None:
        assert self.stack is not None
        self.stack.kill(name, signal.SIGKILL)

    # ------------------------------------------------------------------ the link
    def slow_link(self, name: str, delay: float, loss: float, seconds: float) -> None:
        """What ``tc netem delay <delay> loss <loss>`` does on the host's egress to the core (this kernel
        has no sch_netem): an NFQUEUE rule in the host's namespace hands every packet the host sends to
        the bridge's address to tests/system/hosts/linkdelay.py, which delays or drops it."""
        assert self.fleet is not None and self.net is not None and self.stack is not None
        host = self.fleet.hosts[name]
        queue = 10 + HOSTS.index(name)
        self.linkdelays[name] = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, str(hosts.LINKDELAY),
             "--queue", str(queue), "--delay", str(delay), "--loss", str(loss), "--seconds", str(seconds + 5)],
            stderr=open(self.stack.logs / f"linkdelay-{name}.log", "ab"))  # noqa: SIM115 - the process owns it
        time.sleep(0.3)  # bound to the queue before packets go there (--queue-bypass covers the gap)
        host.iptables("-I", "OUTPUT", "-d", self.net.gateway, "-j", "NFQUEUE", "--queue-num", str(queue),
                      "--queue-bypass")

    def fast_link(self, name: str) -> None:
        assert self.fleet is not None and self.net is not None
        host = self.fleet.hosts[name]
        queue = 10 + HOSTS.index(name)
        host.iptables("-D", "OUTPUT", "-d", self.net.gateway, "-j", "NFQUEUE", "--queue-num", str(queue),
                      "--queue-bypass", check=False)
        proc = self.linkdelays.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        for name in list(self.linkdelays):
            with contextlib.suppress(Exception):
                self.fast_link(name)
        if self.fleet is not None:
            for host in self.fleet.hosts.values():
                with contextlib.suppress(Exception):
                    host.heal()
        if self.stack is not None:
            with contextlib.suppress(Exception):
                self.stack.stop()
        if self.net is not None:
            with contextlib.suppress(Exception):
                self.net.destroy()  # kills what is left in the namespaces; their rules go with them
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
        if self.sink is not None:  # after the hosts: no try is left to send it a line
            with contextlib.suppress(Exception):
                self.sink.stop()
        kill_ours()  # anything that escaped its process group
        with contextlib.suppress(Exception):
            psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        with contextlib.suppress(FileNotFoundError):
            STATE.unlink()
