"""What the benchmark measures: process-tree PSS, run timings from the REST API, and summary statistics."""

from __future__ import annotations

import datetime
import math
import re
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import psutil

MIB = 1024 * 1024


# ---------------------------------------------------------------- memory
def tree_pss(pid: int) -> dict[str, Any]:
    """Sum of PSS over ``pid`` and all its descendants, with a per-process breakdown.

    PSS charges each shared page to the processes sharing it in equal parts, so the sum over a tree
    is what the tree really costs, copy-on-write sharing included (RSS would count shared pages once
    per process).
    """
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    parts = []
    for proc in procs:
        try:
            pss = proc.memory_full_info().pss
            cmdline = " ".join(proc.cmdline())[:120]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += pss
        parts.append({"pid": proc.pid, "cmd": cmdline, "pss_mib": round(pss / MIB, 1)})
    return {"pss_mib": round(total / MIB, 1), "processes": parts}


def idle_pss(pid: int, samples: int = 3, interval: float = 2.0) -> dict[str, Any]:
    """Median of a few samples, so one sample taken during a heartbeat does not decide."""
    readings = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        readings.append(tree_pss(pid))
    readings.sort(key=lambda r: r["pss_mib"])
    chosen = readings[len(readings) // 2]
    return {**chosen, "samples_mib": [r["pss_mib"] for r in readings]}


class PeakSampler:
    """Samples a process tree's PSS in a background thread; ``peak_mib`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_mib = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pss-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_mib = max(self.peak_mib, tree_pss(self.pid)["pss_mib"])
                self.samples += 1
            except psutil.Error:
                pass
            self._stop.wait(self.interval)


# ---------------------------------------------------------------- timings
def parse_ts(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def seconds(start: str | None, end: str | None) -> float | None:
    a, b = parse_ts(start), parse_ts(end)
    if a is None or b is None:
        return None
    return (b - a).total_seconds()


def run_figures(dag_run: dict[str, Any], tis: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall time from the run's own start/end, and queued->start latency of every task instance."""
    latencies = [
        lat for ti in tis if (lat := seconds(ti.get("queued_when"), ti.get("start_date"))) is not None
    ]
    states: dict[str, int] = {}
    for ti in tis:
        states[str(ti.get("state"))] = states.get(str(ti.get("state")), 0) + 1
    runtimes = [d for ti in tis if (d := seconds(ti.get("start_date"), ti.get("end_date"))) is not None]
    return {
        "state": dag_run.get("state"),
        "start_date": dag_run.get("start_date"),
        "end_date": dag_run.get("end_date"),
        "wall_s": seconds(dag_run.get("start_date"), dag_run.get("end_date")),
        "task_instances": len(tis),
        "ti_states": states,
        "latency_count": len(latencies),
        "latency_median_s": median(latencies),
        "latency_p95_s": percentile(latencies, 95),
        "latency_max_s": max(latencies) if latencies else None,
        "ti_runtime_median_s": median(runtimes),
        # What parallelism really allowed: TIs queued or running at once, and running at once.
        "max_in_flight": max_overlap([(ti.get("queued_when"), ti.get("end_date")) for ti in tis]),
        "max_running": max_overlap([(ti.get("start_date"), ti.get("end_date")) for ti in tis]),
        "latencies_s": [round(x, 3) for x in latencies],
    }


SUPERVISOR_DONE = re.compile(r"^(\S+Z) .*Workload finished .*workload_id=([0-9a-f-]{36})")


def supervisor_tail(log_path: str, tis: list[dict[str, Any]]) -> dict[str, Any]:
    """How long each task's supervisor lived on after its TI ended (all executors log the same line).

    The TI's end_date is written by the task process through the Execution API; the executor frees the
    slot only when the supervisor process (``supervise_task``) returns, which the supervisor logs as
    "Workload finished ... workload_id=<ti id>".
    """
    ends = {ti.get("id"): parse_ts(ti.get("end_date")) for ti in tis}
    tails = []
    try:
        with open(log_path, errors="replace") as fh:
            for line in fh:
                match = SUPERVISOR_DONE.search(line)
                end = ends.get(match.group(2)) if match else None
                if match and end is not None:
                    tails.append((parse_ts(match.group(1)) - end).total_seconds())  # type: ignore[operator]
    except OSError:
        pass
    return {
        "supervisor_tail_count": len(tails),
        "supervisor_tail_median_s": median(tails),
        "supervisor_tail_over_4s": sum(1 for t in tails if t > 4),
    }


def max_overlap(intervals: list[tuple[str | None, str | None]]) -> int:
    """Largest number of [start, end) intervals that overlap at one instant."""
    points = []
    for start, end in intervals:
        a, b = parse_ts(start), parse_ts(end)
        if a is not None and b is not None:
            points += [(a, 1), (b, -1)]
    level = peak = 0
    for _when, step in sorted(points, key=lambda p: (p[0], p[1])):  # ends before starts at a tie
        level += step
        peak = max(peak, level)
    return peak


# ---------------------------------------------------------------- statistics
def median(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), for small samples."""
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * pct / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b
