"""Follow a deployment's processes through a window of time and keep each one's CPU counters.

A ``Window`` is opened (``begin``) and closed (``end``). In between, a thread reads every process of
the deployment's trees (the api-server, scheduler, dag-processor, triggerer and worker, with all their
descendants) and the PostgreSQL backends of one database, every ``interval`` seconds, so that
short-lived processes (supervisors, task processes, DAG-file processors) are seen while they live.

What a sampler cannot see, the kernel still counts: a process that exits is reaped by its parent,
which adds the child's utime+stime+cutime+cstime to its own cutime+cstime (procfs.py). So every
process' *reaped* counter says exactly how much its dead children used, and ``attribute.py`` compares
it with what the sampler saw of them.

For that comparison to be exact, the window knows, for every child that disappeared, whether its
parent's counter as recorded already includes it. Each tick reads a parent before its children, and
reads the children again after any new read of the parent, so a child read as alive was not reaped
when its parent's counter was read. A child found gone was reaped by then, so every later read of its
(still living) parent includes it (``Window.in_parent_counter``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

from bench.cpu import procfs
from bench.cpu.exits import ExitListener

Key = tuple[int, int]  # (pid, start ticks)
#: A forked child carries its parent's title at first and Airflow retitles it a little later, so the
#: command line is read again at these reads.
RETITLE_READS = (3, 6, 12)


@dataclasses.dataclass
class Record:
    key: Key
    component: str
    parent: Key | None  # None for a component's root and for a PostgreSQL backend
    depth: int
    cmd: str
    base_own: int  # ticks at the window's start (0 for a process born inside the window)
    base_reaped: int
    own: int  # ticks at its last read
    reaped: int
    base_sys: int  # stime part of base_own and own
    sys: int
    alive_at_begin: bool
    first_seen: float
    last_seen: float
    reads: int = 1
    read_seq: int = 0  # when it was last read (a global read counter of the window)
    gone: bool = False
    gone_seq: int = 0  # when it was first found gone
    gone_tick: int = 0
    #: (tick, reaped counter at the last read in that tick), one entry per tick in which it changed
    reaped_history: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    alive_at_end: bool = False
    children: list[Key] = dataclasses.field(default_factory=list)

    @property
    def own_delta(self) -> int:
        return self.own - self.base_own

    @property
    def reaped_delta(self) -> int:
        return self.reaped - self.base_reaped


@dataclasses.dataclass
class Snapshot:
    """What a window's start or end looked like, for the totals that need no sampler."""

    at: float
    machine: procfs.MachineTimes
    processes: dict[int, procfs.Stat]
    harness: int  # ticks used by this process (the benchmark itself, sampler thread included)


def subtree_ticks(processes: dict[int, procfs.Stat], root: int) -> int:
    """own + reaped, summed over ``root`` and every live descendant. Between two snapshots, the
    difference of this sum is the CPU the tree used, children that lived and died in between
    included, as long as a member of the tree reaped them."""
    children: dict[int, list[int]] = {}
    for stat in processes.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        stat = processes.get(pid)
        if stat is None:
            continue
        total += stat.own + stat.reaped
        todo.extend(children.get(pid, ()))
    return total


def all_ticks(processes: dict[int, procfs.Stat]) -> int:
    return sum(s.own + s.reaped for s in processes.values())


class Window:
    """``roots``: component name -> root pid. ``postmaster``/``database``: which PostgreSQL backends
    are this deployment's (postmaster children whose process title names the database, less
    ``exclude``)."""

    def __init__(
        self,
        roots: dict[str, int],
        *,
        postmaster: int | None = None,
        database: str | None = None,
        exclude: frozenset[int] = frozenset(),
        interval: float | None = 0.1,
        exits: ExitListener | None = None,
    ) -> None:
        self.roots = roots
        self.postmaster = postmaster
        self.database = database
        self.exclude = exclude  # backends that are not the deployment's (the benchmark's own)
        self.exits = exits
        self.exit_ns: dict[int, int] = {}
        self.exit_ambiguous: set[int] = set()
        self.interval = interval
        self.records: dict[Key, Record] = {}
        self._live: dict[int, Key] = {}  # pid -> key of a tracked process believed alive
        self._known: set[int] = set()  # pids already looked at (tracked or not)
        self._pg_pending: dict[int, int] = {}  # postmaster child pid -> ticks left to name its database
        self.tick = 0
        self._seq = 0
        self.tick_seconds: list[float] = []
        self.begin_snapshot: Snapshot | None = None
        self.end_snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle
    def begin(self, extra_backends: frozenset[int] = frozenset()) -> None:
        """``extra_backends``: pids that pg_stat_activity lists for the database (checked, then tracked)."""
        if self.exits is not None:
            self.exits.reset()
        snap = self._snapshot()
        self.begin_snapshot = snap
        now = snap.at
        children: dict[int, list[int]] = {}
        for stat in snap.processes.values():
            children.setdefault(stat.ppid, []).append(stat.pid)
        for component, root in self.roots.items():
            todo: list[tuple[int, Key | None, int]] = [(root, None, 0)]
            while todo:
                pid, parent, depth = todo.pop()
                stat = snap.processes.get(pid)
                if stat is None:
                    continue
                self._track(stat, component, parent, depth, now, born_inside=False)
                todo.extend((c, stat.key, depth + 1) for c in children.get(pid, ()))
        if self.postmaster is not None:
            for pid in children.get(self.postmaster, ()):
                if pid in self.exclude:
                    continue
                if pid in extra_backends or self._is_backend(procfs.read_cmdline(pid)):
                    self._track(snap.processes[pid], "postgres", None, 0, now, born_inside=False)
        self._known = set(snap.processes)
        if self.interval:
            self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)
            self._thread.start()

    def end(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(30)
        with self._lock:
            self._tick()  # the last read of everything tracked, with the same care as every tick
            for key in self._live.values():
                self.records[key].alive_at_end = True
            for rec in self.records.values():
                if rec.alive_at_end:
                    rec.cmd = procfs.read_cmdline(rec.key[0]) or rec.cmd
        self.end_snapshot = self._snapshot()
        if self.exits is not None:
            time.sleep(0.2)  # records of the last exits are sent before the reap, but read by a thread
            self.exit_ns, self.exit_ambiguous = self.exits.collect()

    # ------------------------------------------------------------ one read of everything
    def _snapshot(self) -> Snapshot:
        machine = procfs.machine()
        processes = procfs.scan()
        me = procfs.read_stat(os.getpid())
        return Snapshot(time.monotonic(), machine, processes, me.own if me else 0)

    def _loop(self) -> None:
        assert self.interval
        while not self._stop.wait(self.interval):
            started = time.monotonic()
            with self._lock:
                self._tick()
            self.tick_seconds.append(time.monotonic() - started)

    def _tick(self) -> None:
        self.tick += 1
        present = procfs.pids()
        for pid in self._known - present:
            self._known.discard(pid)
            self._pg_pending.pop(pid, None)
        self._discover(sorted(present - self._known))
        for pid in list(self._pg_pending):
            self._check_pending(pid)
        # Parents before children (see the module docstring); orphans and backends are read as roots.
        roots = [
            k
            for k in self._live.values()
            if (parent := self.records[k].parent) is None or self.records[parent].gone
        ]
        for key in roots:
            rec = self.records[key]
            if self._read(rec):
                self._read_family(rec)

    def _read(self, rec: Record) -> bool:
        """Read one tracked process; False (and the record marked gone) when it no longer exists."""
        self._seq += 1
        stat = procfs.read_stat(rec.key[0])
        if stat is None or stat.start != rec.key[1]:
            if not rec.gone:
                rec.gone, rec.gone_seq, rec.gone_tick = True, self._seq, self.tick
                self._live.pop(rec.key[0], None)
            return False
        rec.own, rec.reaped, rec.sys, rec.read_seq = stat.own, stat.reaped, stat.sys, self._seq
        rec.last_seen = time.monotonic()
        rec.reads += 1
        if rec.reads in RETITLE_READS:
            rec.cmd = procfs.read_cmdline(rec.key[0]) or rec.cmd
        self._note_reaped(rec)
        return True

    def _note_reaped(self, rec: Record) -> None:
        history = rec.reaped_history
        if history and history[-1][0] == self.tick:
            history[-1] = (self.tick, rec.reaped)
        elif not history or history[-1][1] != rec.reaped:
            history.append((self.tick, rec.reaped))

    def _read_family(self, parent: Record) -> None:
        """Leaves every live child read *after* the parent's last read: a child that is gone is looked
        for again only after the parent is read once more, whose counter then includes it."""
        kids = [self.records[k] for k in parent.children if not self.records[k].gone]
        while kids:
            alive = [kid for kid in kids if self._read(kid)]
            if len(alive) == len(kids) or not self._read(parent):
                kids = alive
                break
            kids = alive
        for kid in kids:
            self._read_family(kid)

    # ------------------------------------------------------------ new processes
    def _discover(self, new: list[int]) -> None:
        now = time.monotonic()
        stats = {pid: s for pid in new if (s := procfs.read_stat(pid)) is not None}
        self._known.update(new)
        added = True
        while added:  # a child may be listed before its (also new) parent after pid wrap-around
            added = False
            for pid, stat in list(stats.items()):
                parent_key = self._live.get(stat.ppid)
                if parent_key is not None and self.records[parent_key].component != "postgres":
                    parent = self.records[parent_key]
                    self._track(stat, parent.component, parent_key, parent.depth + 1, now, born_inside=True)
                    del stats[pid]
                    added = True
        for pid, stat in stats.items():
            if self.postmaster is not None and stat.ppid == self.postmaster and pid not in self.exclude:
                self._pg_pending[pid] = 20
                self._check_pending(pid, stat)

    def _check_pending(self, pid: int, stat: procfs.Stat | None = None) -> None:
        cmd = procfs.read_cmdline(pid)
        if not cmd.startswith("postgres: "):  # a backend not yet titled (still the postmaster's cmdline)
            self._pg_pending[pid] -= 1
            if self._pg_pending[pid] <= 0:
                del self._pg_pending[pid]
            return
        del self._pg_pending[pid]
        if self._is_backend(cmd):
            stat = stat or procfs.read_stat(pid)
            if stat is not None:
                self._track(stat, "postgres", None, 0, time.monotonic(), born_inside=True)

    def _is_backend(self, cmd: str) -> bool:
        """``postgres: [cluster: ]user database host(port) state`` or ``... autovacuum worker database``."""
        return bool(self.database) and cmd.startswith("postgres: ") and self.database in cmd.split()

    def _track(
        self, stat: procfs.Stat, component: str, parent: Key | None, depth: int, now: float, born_inside: bool
    ) -> None:
        base_own, base_reaped, base_sys = (0, 0, 0) if born_inside else (stat.own, stat.reaped, stat.sys)
        rec = Record(
            key=stat.key,
            component=component,
            parent=parent,
            depth=depth,
            cmd=procfs.read_cmdline(stat.pid),
            base_own=base_own,
            base_reaped=base_reaped,
            own=stat.own,
            reaped=stat.reaped,
            base_sys=base_sys,
            sys=stat.sys,
            alive_at_begin=not born_inside,
            first_seen=now,
            last_seen=now,
        )
        self._seq += 1
        rec.read_seq = self._seq
        self._note_reaped(rec)
        self.records[stat.key] = rec
        self._live[stat.pid] = stat.key
        if parent is not None:
            self.records[parent].children.append(stat.key)

    # ------------------------------------------------------------ results
    def final_own(self, rec: Record) -> float | None:
        """Ticks the process used in its whole life, as taskstats reported at its exit; None when
        unknown (no listener, alive at the end, alive before the window, or its pid was reused)."""
        pid = rec.key[0]
        if not rec.gone or rec.alive_at_begin or pid not in self.exit_ns or pid in self.exit_ambiguous:
            return None
        return self.exit_ns[pid] * procfs.CLK_TCK / 1e9

    @staticmethod
    def reaped_at(rec: Record, tick: int) -> int:
        """The reaped counter as last read in ``tick`` or before (its window-start value before that)."""
        value = rec.base_reaped
        for at, reaped in rec.reaped_history:
            if at > tick:
                break
            value = reaped
        return value

    def in_parent_counter(self, rec: Record) -> bool:
        """Gone, and its parent was read (alive) after that: the parent's recorded counter includes it."""
        parent = self.records.get(rec.parent) if rec.parent else None
        return rec.gone and parent is not None and parent.read_seq > rec.gone_seq

    def duration(self) -> float:
        assert self.begin_snapshot and self.end_snapshot
        return self.end_snapshot.at - self.begin_snapshot.at

    def sampler_stats(self) -> dict[str, Any]:
        ticks = sorted(self.tick_seconds)
        return {
            "ticks": len(ticks),
            "interval_s": self.interval,
            "tick_ms_median": round(1000 * ticks[len(ticks) // 2], 2) if ticks else None,
            "tick_ms_max": round(1000 * ticks[-1], 2) if ticks else None,
        }
