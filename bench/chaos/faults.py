"""The faults: a plan drawn from the seed up front, and a thread per fault that injects it and undoes it.

``plan(seed, minutes)`` draws everything at once (when, which kind, which target, how long), so a seed
names one sequence of faults, printed at the start and kept in the results. Which host or scheduler is
hit in the end can still move: a fault aimed at a target that is already down or cut off goes to the
next free one, and is skipped (with the reason) when none is free. At most two of the three hosts are
impaired at once, one scheduler is down at once, and one Redis fault runs at once, and a Redis fault
waits (bounded) until the group has a master, a replica in sync and three sentinels that agree.

Every fault is bounded: each hold ends after its drawn length or at once when the window closes
(``ending``), and every wait inside a fault has a deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time
from typing import Any

import redis

from bench.chaos.sentinel import MASTER_NAME
from bench.chaos.topology import HOSTS, SCHEDULERS, Deployment

KINDS = ("worker_kill", "scheduler_kill", "redis_kill", "sentinel_failover", "partition", "netem")
INTERVAL = (15.0, 30.0)  # seconds between two faults
MAX_HOSTS_DOWN = 2
REDIS_WAIT = 30.0  # how long a Redis fault waits for a healthy group before it is skipped
SWITCH_WAIT = 60.0


@dataclasses.dataclass
class Planned:
    offset: float  # seconds after the window opened
    kind: str
    target: str  # a host, a scheduler, or "redis"
    hold: float  # the supervisor's pause before a restart, or how long a partition or slow link lasts
    variant: str = ""  # partition: "redis" (Redis and sentinel ports) or "all" (the host's whole link)
    delay: float = 0.0  # netem: seconds per packet
    loss: float = 0.0  # netem: probability of a drop


@dataclasses.dataclass
class Fault:
    planned: Planned
    target: str
    at: float = 0.0  # wall clock of the injection
    end: float | None = None  # wall clock of the restart, heal, or (failover) the old master's demotion
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.planned.kind, "target": self.target, "planned": dataclasses.asdict(self.planned),
                "at": self.at, "end": self.end, "notes": self.notes, "skipped": self.skipped,
                "error": self.error}


def plan(seed: int, minutes: float) -> list[Planned]:
    rng = random.Random(seed)
    window = minutes * 60
    planned: list[Planned] = []
    offset = rng.uniform(*INTERVAL)
    while offset < window - 5:
        kind = rng.choice(KINDS)
        host = rng.choice(HOSTS)
        if kind == "worker_kill":
            planned.append(Planned(offset, kind, host, hold=rng.uniform(2, 10)))
        elif kind == "scheduler_kill":
            planned.append(Planned(offset, kind, rng.choice(SCHEDULERS), hold=rng.uniform(5, 15)))
        elif kind == "redis_kill":
            planned.append(Planned(offset, kind, "redis", hold=rng.uniform(2, 8)))
        elif kind == "sentinel_failover":
            planned.append(Planned(offset, kind, "redis", hold=0.0))
        elif kind == "partition":
            planned.append(Planned(offset, kind, host, hold=rng.uniform(5, 60), variant=rng.choice(("redis", "all"))))
        else:
            planned.append(Planned(offset, kind, host, hold=rng.uniform(20, 60), delay=rng.uniform(0.05, 0.3),
                                   loss=rng.uniform(0.0, 0.1)))
        offset += rng.uniform(*INTERVAL)
    return planned


class Chaos:
    """Runs planned faults, each on a thread of its own, and knows what is down right now."""

    def __init__(self, dep: Deployment, log) -> None:
        self.dep = dep
        self.log = log
        self.ending = threading.Event()
        self.busy: set[str] = set()
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ choosing a target
    def _claim(self, planned: Planned) -> str | None:
        with self._lock:
            if planned.target == "redis":
                candidates = ["redis"]
            elif planned.kind == "scheduler_kill":
                candidates = [] if any(s in self.busy for s in SCHEDULERS) else [planned.target]
            else:
                if sum(h in self.busy for h in HOSTS) >= MAX_HOSTS_DOWN:
                    return None
                start = HOSTS.index(planned.target)
                candidates = [HOSTS[(start + i) % len(HOSTS)] for i in range(len(HOSTS))]
            for target in candidates:
                if target not in self.busy:
                    self.busy.add(target)
                    return target
        return None

    def _release(self, target: str) -> None:
        with self._lock:
            self.busy.discard(target)

    def is_busy(self, name: str) -> bool:
        with self._lock:
            return name in self.busy

    # ------------------------------------------------------------------ running
    def launch(self, planned: Planned) -> Fault:
        target = self._claim(planned)
        fault = Fault(planned, target or planned.target)
        self.faults.append(fault)
        if target is None:
            fault.skipped = "every eligible target is already down, cut off or slowed"
            fault.at = time.time()
            self.log(f"fault {planned.kind} on {planned.target}: skipped ({fault.skipped})")
            return fault
        thread = threading.Thread(target=self._run, args=(fault,), name=f"fault-{planned.kind}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return fault

    def _run(self, fault: Fault) -> None:
        try:
            getattr(self, f"_{fault.planned.kind}")(fault)
        except Exception as exc:  # recorded, never silent: the run reports it and goes on
            fault.error = f"{type(exc).__name__}: {exc}"
            self.log(f"fault {fault.planned.kind} on {fault.target} failed: {fault.error}")
        finally:
            self._release(fault.target)

    def finish(self, timeout: float = 180) -> None:
        """Close the window: every hold ends now, and every fault undoes itself."""
        self.ending.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            self.log(f"fault threads still running after {timeout:.0f} s: {stuck}")

    def _hold(self, seconds: float) -> None:
        self.ending.wait(seconds)

    # ------------------------------------------------------------------ the kinds
    def _worker_kill(self, fault: Fault) -> None:
        fault.at = time.time()
        fault.notes["processes"] = self.dep.kill_host(fault.target)
        self.log(f"fault: SIGKILL host {fault.target} ({fault.notes['processes']} processes); "
                 f"restart in {fault.planned.hold:.1f} s")
        self._hold(fault.planned.hold)
        self.dep.start_worker(fault.target)
        fault.end = time.time()

    def _scheduler_kill(self, fault: Fault) -> None:
        job, in_flight = self.dep.scheduler_job(fault.target)
        fault.notes.update(job_id=job, in_flight_keys=in_flight)
        fault.at = time.time()
        self.dep.kill_scheduler(fault.target)
        self.log(f"fault: SIGKILL {fault.target} (job {job}, {len(in_flight)} task instances queued or running); "
                 f"restart in {fault.planned.hold:.1f} s")
        self._hold(fault.planned.hold)
        self.dep.start_scheduler(fault.target)
        fault.end = time.time()

    def _wait_group(self, fault: Fault) -> bool:
        group = self.dep.redis
        assert group is not None
        waited = time.monotonic()
        if not group.wait_healthy(REDIS_WAIT):
            fault.skipped = f"the Sentinel group was not healthy within {REDIS_WAIT:.0f} s"
            fault.at = time.time()
            self.log(f"fault {fault.planned.kind}: skipped ({fault.skipped})")
            return False
        fault.notes["waited_for_group_s"] = round(time.monotonic() - waited, 1)
        return True

    def _until(self, predicate, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return time.time()
            time.sleep(0.1)
        return None

    def _redis_kill(self, fault: Fault) -> None:
        group = self.dep.redis
        assert group is not None
        if not self._wait_group(fault):
            return
        old = group.master_port()
        assert old is not None
        fault.at = time.time()
        group.kill(old)
        fault.notes["old_master"] = old
        switched = self._until(lambda: group.master_port() not in (None, old), SWITCH_WAIT)
        fault.notes["switched_at"] = switched
        new = group.master_port()
        fault.notes["new_master"] = new
        self.log(f"fault: SIGKILL Redis master :{old}; sentinels switched to :{new} "
                 + (f"after {switched - fault.at:.1f} s" if switched else f"not within {SWITCH_WAIT:.0f} s"))
        self._hold(fault.planned.hold)
        # as a replica of the new master, never as an empty master of its own
        group.start_redis(old, replica_of=new if switched else None)
        fault.end = time.time()
        fault.notes["resynced_at"] = self._until(lambda: group.role(old) == "slave" and group._in_sync(old), 60)

    def _sentinel_failover(self, fault: Fault) -> None:
        group = self.dep.redis
        assert group is not None
        if not self._wait_group(fault):
            return
        old = group.master_port()
        fault.notes["old_master"] = old
        fault.at = time.time()
        for port in group.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                group.sentinel(port).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
                fault.notes["sentinel"] = port
                break
        switched = self._until(lambda: group.master_port() not in (None, old), SWITCH_WAIT)
        fault.notes["switched_at"] = switched
        fault.notes["new_master"] = group.master_port()
        demoted = self._until(lambda: group.role(old) == "slave", SWITCH_WAIT) if old else None
        fault.notes["demoted_at"] = demoted
        fault.end = demoted
        self.log(f"fault: SENTINEL FAILOVER from :{old} to :{fault.notes['new_master']}"
                 + (f", old master demoted after {demoted - fault.at:.1f} s" if demoted else ""))

    def _partition(self, fault: Fault) -> None:
        assert self.dep.fleet is not None and self.dep.redis is not None
        host = self.dep.fleet.hosts[fault.target]
        fault.at = time.time()
        try:
            if fault.planned.variant == "redis":
                for port in self.dep.redis.ports:
                    host.cut(port=port)
            else:
                host.cut()
            self.log(f"fault: partition {fault.target} from {'Redis and the sentinels' if fault.planned.variant == 'redis' else 'everything'} "
                     f"for {fault.planned.hold:.1f} s")
            self._hold(fault.planned.hold)
        finally:
            host.heal()
            fault.end = time.time()

    def _netem(self, fault: Fault) -> None:
        fault.at = time.time()
        try:
            self.dep.slow_link(fault.target, fault.planned.delay, fault.planned.loss, fault.planned.hold)
            self.log(f"fault: slow link on {fault.target}: {fault.planned.delay * 1000:.0f} ms delay, "
                     f"{fault.planned.loss:.1%} loss for {fault.planned.hold:.1f} s")
            self._hold(fault.planned.hold)
        finally:
            self.dep.fast_link(fault.target)
            fault.end = time.time()
