"""The kernel's CPU counters, read straight from /proc (psutil would cost the sampler more per read).

``/proc/<pid>/stat`` fields 14-17 are utime, stime, cutime and cstime in clock ticks. utime+stime is
what the process (all its threads) used itself; cutime+cstime is what its children used, added by the
kernel when the process *reaps* them with wait(), including what their own reaped children used. A
short-lived child that was never sampled is therefore still counted, in its parent's cutime+cstime.
"""

from __future__ import annotations

import dataclasses
import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True, slots=True)
class Stat:
    pid: int
    ppid: int
    start: int  # field 22, clock ticks since boot: (pid, start) names a process even across pid reuse
    own: int  # utime + stime, ticks
    reaped: int  # cutime + cstime, ticks
    sys: int  # stime alone: the kernel's share of ``own`` (syscalls, page faults, fork, exit)
    state: str

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)


def read_stat(pid: int) -> Stat | None:
    """None when the process is gone (or was never there)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may itself hold spaces or parentheses: split after the last.
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state), so field k is fields[k - 3].
    return Stat(
        pid=pid,
        ppid=int(fields[1]),
        start=int(fields[19]),
        own=int(fields[11]) + int(fields[12]),
        reaped=int(fields[13]) + int(fields[14]),
        sys=int(fields[12]),
        state=fields[0].decode(),
    )


def read_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pids() -> set[int]:
    return {int(name) for name in os.listdir("/proc") if name.isdigit()}


def scan() -> dict[int, Stat]:
    """Every process on the machine (that this namespace sees), pid -> Stat."""
    found = {}
    for pid in pids():
        stat = read_stat(pid)
        if stat is not None:
            found[pid] = stat
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class MachineTimes:
    """The first line of /proc/stat, in ticks, summed over all CPUs."""

    user: int  # includes guest
    nice: int
    system: int
    idle: int
    iowait: int
    irq: int
    softirq: int
    steal: int

    @property
    def total(self) -> int:
        return (
            self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
        )

    @property
    def busy(self) -> int:
        """What ran on the CPUs: processes (user, nice, system) plus interrupt handling."""
        return self.user + self.nice + self.system + self.irq + self.softirq

    @property
    def processes(self) -> int:
        """The part of ``busy`` that is charged to processes (and so to their /proc/<pid>/stat)."""
        return self.user + self.nice + self.system


def machine() -> MachineTimes:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    return MachineTimes(*values)


def seconds(ticks: float) -> float:
    return ticks / CLK_TCK
