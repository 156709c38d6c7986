"""What the run sees while it runs: each host's registry record, read from the master of the moment.

Every half second the sampler asks the sentinels which server is the master and reads each host's
``<prefix>:worker:<node>`` hash *from that server*, so a sample says which master it came from. A
``consumer_tick_at`` after a fault, read from the new master, proves that the host's consumer loop runs
and that its heartbeat reaches the new master (docs/OPERATIONS.md, "The probe"). The record only holds
the latest tick, hence the sampling: recovery times are computed afterwards from these samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import redis

from bench.chaos.sentinel import SentinelGroup

EVERY = 0.5


@dataclasses.dataclass(frozen=True)
class Sample:
    at: float  # when we read it (wall clock)
    master: int  # the port of the master we read it from
    host: str
    tick: float  # consumer_tick_at in the record, 0 when there is no record
    heartbeat: float  # heartbeat_at


class Sampler(threading.Thread):
    def __init__(self, group: SentinelGroup, nodes: dict[str, str], prefix: str) -> None:
        super().__init__(name="chaos-sampler", daemon=True)
        self.group = group
        self.nodes = nodes  # host -> Celery node name
        self.prefix = prefix
        self.samples: list[Sample] = []
        self.masters: list[tuple[float, int]] = []  # (first seen, port) at each change of master
        self._halt = threading.Event()
        self._clients: dict[int, redis.Redis] = {}

    def run(self) -> None:
        while not self._halt.wait(EVERY):
            with contextlib.suppress(Exception):  # a sample missed during a fault is just a gap
                self._sample()

    def _sample(self) -> None:
        port = self.group.master_port()
        if port is None:
            return
        now = time.time()
        if not self.masters or self.masters[-1][1] != port:
            self.masters.append((now, port))
        client = self._clients.setdefault(port, self.group.direct(port))
        pipe = client.pipeline(transaction=False)
        for node in self.nodes.values():
            pipe.hmget(f"{self.prefix}:worker:{node}", "consumer_tick_at", "heartbeat_at")
        try:
            replies = pipe.execute()
        except redis.RedisError:
            self._clients.pop(port, None)
            return
        for host, (tick, heartbeat) in zip(self.nodes, replies, strict=True):
            self.samples.append(Sample(now, port, host, float(tick or 0), float(heartbeat or 0)))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    # ------------------------------------------------------------------ reading the samples
    def first_tick(self, host: str, after: float, master: int | None = None) -> float | None:
        """The earliest consumer tick of ``host`` later than ``after`` (optionally: read from ``master``)."""
        ticks = [s.tick for s in self.samples
                 if s.host == host and s.tick > after and (master is None or s.master == master)]
        return min(ticks) if ticks else None
