"""The counting, once the faults have stopped and the fleet has settled: what users would check.

- **Task instances**: how many ended in success, and how many were left queued or running (or in any
  other state that is not final), read from Airflow's own tables.
- **Side effects done twice**: from the side-effect file, a try whose ``done`` line appears twice, and a
  task instance with ``done`` lines from two different tries (each of those tries finished its work).
  A try that ``start``-ed twice is counted too, as a sign of a duplicate delivery that ran.
- **Recovery per fault**, from the fault's own times, the sampled registry records (watch.py), the
  ``start`` lines and the schedulers' logs. Which measures a kind gets is in ``MEASURES``.
"""

from __future__ import annotations

import collections
import datetime
import re
import statistics
from pathlib import Path
from typing import Any

from bench.chaos.faults import Fault
from bench.chaos.watch import Sampler

DAG_ID = "asyncq_chaos"
FINAL = {"success", "failed", "upstream_failed", "skipped", "removed"}
ADOPTED = re.compile(r"^(\S+Z) \[info\s*\] Adopted (\d+) task instance", re.MULTILINE)
STUCK = re.compile(r"^(\S+Z) \[\w+\s*\] Task stuck in queued[^\n]*?<TaskInstance: " + DAG_ID
                   + r"\.(\S+) (\S+)(?: map_index=(\d+))?", re.MULTILINE)
LOST = re.compile(r"^(\S+Z) \[error\s*\] Task TaskInstanceKey\(dag_id='" + DAG_ID + r"', task_id='(\w+)', "
                  r"run_id='(\S+?)', try_number=(\d+), map_index=(-?\d+)\): (worker \S+ lost|lease expired)",
                  re.MULTILINE)
STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)")
WINDOW_AFTER = 300.0  # a recovery later than this after its fault is not attributed to it
ADOPT_WITHIN = 180.0  # an "Adopted" line later than this after a scheduler's SIGKILL belongs to another fault

#: What each kind's recovery is measured by: (name, what it means)
MEASURES: dict[str, list[tuple[str, str]]] = {
    "worker_kill": [("consuming_s", "SIGKILL → the restarted worker's consumer ticks (includes the restart pause)"),
                    ("start_s", "restart → its consumer ticks (the worker's own start-up)"),
                    ("reported_lost_s", "SIGKILL → the executor has reported every try it was running lost"),
                    ("rerun_s", "SIGKILL → every try it was running has started again (behind the queue)"),
                    ("next_start_s", "SIGKILL → next task start on the fleet")],
    "scheduler_kill": [("next_start_s", "SIGKILL → next task start on the fleet"),
                       ("orphans_final_s", "SIGKILL → every task instance the dead one had queued or running "
                                           "has ended"),
                       ("adopted_s", "SIGKILL → another scheduler logs that it adopted task instances (only when "
                                     "some were still in flight when the dead job was noticed)")],
    "redis_kill": [("switch_s", "SIGKILL of the master → the sentinels name the replica"),
                   ("consuming_s", "SIGKILL → every unimpaired host's consumer tick on the new master"),
                   ("next_start_s", "SIGKILL → next task start on the fleet")],
    "sentinel_failover": [("switch_s", "SENTINEL FAILOVER → the sentinels name the replica"),
                          ("consuming_s", "FAILOVER → every unimpaired host's consumer tick on the new master"),
                          ("next_start_s", "FAILOVER → next task start on the fleet")],
    "partition": [("consuming_s", "heal → the host's consumer ticks again"),
                  ("host_start_s", "heal → next task start on that host (when work was waiting)"),
                  ("reported_lost_s", "cut → the executor has reported lost the host's running tries (those it "
                                      "reports lost at all)"),
                  ("rerun_s", "cut → every try it had running that never finished has started again")],
    "netem": [("consuming_s", "end of the slow link → the host's next consumer tick"),
              ("host_start_s", "end of the slow link → next task start on that host (when work was waiting)")],
}


def read_effects(path: Path) -> list[tuple[str, str, int, int, str, str, float]]:
    """(tag, task_id, map_index, try, run_id, host, time) of every line of our DAG."""
    rows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 9 and parts[1] == DAG_ID:
                rows.append((parts[0], parts[2], int(parts[3]), int(parts[4]), parts[5], parts[7], float(parts[8])))
    return rows


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(values), "median": round(statistics.median(values), 1), "max": round(max(values), 1)}


def log_times(path: Path, pattern: re.Pattern[str]) -> list[float]:
    """Wall-clock times (UTC log stamps) of every match of ``pattern`` in ``path``."""
    if not path.exists():
        return []
    found = []
    for match in pattern.finditer(path.read_text(errors="replace")):
        found.append(datetime.datetime.fromisoformat(match.group(1).rstrip("Z") + "+00:00").timestamp())
    return found


def line_times(path: Path, needle: str) -> list[float]:
    if not path.exists():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        stamp = STAMP.search(line) if needle in line else None
        if stamp:
            found.append(datetime.datetime.fromisoformat(stamp.group(1) + "+00:00").timestamp())
    return found


def stuck_in_queued(schedulers: list[Path]) -> list[dict[str, Any]]:
    """Every "Task stuck in queued" of our DAG the schedulers logged: a task instance that sat in queued
    for ``[scheduler] task_queued_timeout`` (600 s) until Airflow requeued it (or failed it)."""
    found = []
    for path in schedulers:
        if path.exists():
            for match in STUCK.finditer(path.read_text(errors="replace")):
                at = datetime.datetime.fromisoformat(match.group(1).rstrip("Z") + "+00:00").timestamp()
                found.append({"at": at, "task_id": match.group(2), "run_id": match.group(3),
                              "map_index": int(match.group(4)) if match.group(4) else -1, "log": path.name})
    return sorted(found, key=lambda item: item["at"])


def lost_reports(schedulers: list[Path]) -> dict[tuple[str, str, int, int], tuple[float, str]]:
    """(run_id, task_id, map_index, try) -> (when, why) of every try an executor reported lost: its
    worker stopped heartbeating ("worker … lost") or its lease ran out ("lease expired")."""
    found: dict[tuple[str, str, int, int], tuple[float, str]] = {}
    for path in schedulers:
        if path.exists():
            for m in LOST.finditer(path.read_text(errors="replace")):
                at = datetime.datetime.fromisoformat(m.group(1).rstrip("Z") + "+00:00").timestamp()
                key = (m.group(3), m.group(2), int(m.group(5)), int(m.group(4)))
                if key not in found or at < found[key][0]:
                    found[key] = (at, "lease_expired" if m.group(6) == "lease expired" else "worker_lost")
    return found


class Accounting:
    def __init__(self, effects: Path, sampler: Sampler, faults: list[Fault], logs: Path,
                 tries: dict[tuple[str, str, int, int], tuple[float | None, float | None]]) -> None:
        """``tries``: (run_id, task_id, map_index, try) -> (queued at, ended at), from Airflow's tables."""
        self.rows = read_effects(effects)
        self.tries = tries
        self.lost = lost_reports([logs / "scheduler.log", logs / "scheduler-b.log"])
        self.sampler = sampler
        self.faults = faults
        self.logs = logs
        self.starts = sorted((r[6], r[5], (r[4], r[1], r[2], r[3])) for r in self.rows if r[0] == "start")
        self.dones: dict[tuple[str, str, int, int], list[float]] = collections.defaultdict(list)
        self.done_hosts: dict[tuple[str, str, int, int], str] = {}
        for r in self.rows:
            if r[0] == "done":
                self.dones[(r[4], r[1], r[2], r[3])].append(r[6])
                self.done_hosts[(r[4], r[1], r[2], r[3])] = r[5]

    # ------------------------------------------------------------------ side effects
    def doubles(self) -> dict[str, Any]:
        started = collections.Counter(key for _t, _h, key in self.starts)
        done_twice = sorted(k for k, times in self.dones.items() if len(times) > 1)
        tries_done = collections.defaultdict(list)
        for (run, task, index, attempt) in self.dones:
            tries_done[(run, task, index)].append(attempt)
        two_tries = {ti: sorted(tries) for ti, tries in tries_done.items() if len(tries) > 1}
        return {
            "done_twice_same_try": [list(k) for k in done_twice],
            "done_in_two_tries": [{"ti": list(ti), "tries": tries, "evidence": self._why_twice(ti, tries)}
                                  for ti, tries in sorted(two_tries.items())],
            "start_twice_same_try": [list(k) for k, n in sorted(started.items()) if n > 1],
            "tries_started": len(started),
            "tis_with_retries": len({k[:3] for k in started if k[3] > 1}),
            "most_tries_of_one_ti": max(collections.Counter(k[:3] for k in started).values(), default=0),
        }

    def _why_twice(self, ti: tuple[str, str, int], tries: list[int]) -> list[str]:
        """Where the first try did its work, and the faults on that host between a few seconds before
        its ``done`` and the next try's start (a fault later than the ``done`` hit a try that had done
        its work but not yet reported it)."""
        key = (*ti, tries[0])
        first_done, host = min(self.dones[key]), self.done_hosts[key]
        next_start = min(t for t, _h, k in self.starts if k == (*ti, tries[1]))
        lines = [f"try {tries[0]} wrote done on {host}; try {tries[1]} started {next_start - first_done:.1f} s later"]
        for fault in self.faults:
            if fault.skipped is None and fault.target == host and first_done - 5 <= fault.at <= next_start:
                what = fault.planned.kind + (f" ({fault.planned.variant})" if fault.planned.variant else "")
                lag = fault.at - first_done
                lines.append(f"{what} of {host} {abs(lag):.1f} s {'after' if lag >= 0 else 'before'} that done")
        if len(lines) == 1:
            lines.append(f"no fault on {host} in that time")
        return lines

    # ------------------------------------------------------------------ recovery
    def waiting(self, at: float) -> int:
        """Tries that had been queued by ``at`` and had not started (nor ended) yet: work the fleet
        owed at that moment. Without any, "the next start" measures an idle fleet, not a recovery."""
        first_start: dict[tuple[str, str, int, int], float] = {}
        for t, _h, key in self.starts:
            first_start.setdefault(key, t)
        count = 0
        for key, (queued, ended) in self.tries.items():
            if queued is None or queued > at:
                continue
            began = first_start.get(key)
            if (began is not None and began > at) or (began is None and (ended is None or ended > at)):
                count += 1
        return count

    def final_at(self, ti: tuple[Any, ...]) -> float | None:
        """When the task instance ``(run_id, task_id, map_index)`` ended its last try."""
        tries = [(key[3], ended) for key, (_queued, ended) in self.tries.items() if key[:3] == tuple(ti[:3])]
        if not tries:
            return None
        _last, ended = max(tries, key=lambda item: item[0])
        return ended

    def next_start(self, after: float, host: str | None = None) -> float | None:
        for t, h, _key in self.starts:
            if t > after and (host is None or h == host):
                return t
        return None

    def _running(self, host: str, at: float) -> list[tuple[str, str, int, int]]:
        """The tries that ``host`` was running at ``at``: started there before it, not done before it,
        not already followed by a later try, and not killed with the host by an earlier SIGKILL."""
        kills = [f.at for f in self.faults if f.planned.kind == "worker_kill" and f.target == host
                 and not f.skipped and f.at < at]
        running = []
        for t, h, key in self.starts:
            if h != host or t >= at or any(d < at for d in self.dones.get(key, [])):
                continue
            if any(k[:3] == key[:3] and k[3] > key[3] and s < at for s, _h, k in self.starts):
                continue
            if any(t < kill for kill in kills):
                continue
            running.append(key)
        return running

    def _rerun(self, tries: list[tuple[str, str, int, int]], at: float) -> float | None:
        """Seconds from ``at`` until every one of ``tries`` had a later try started (None: one never did)."""
        later_starts = []
        for run, task, index, attempt in tries:
            later = [t for t, _h, key in self.starts if key[:3] == (run, task, index) and key[3] > attempt]
            if not later:
                return None
            later_starts.append(min(later))
        value = max(later_starts) - at
        return round(value, 2) if value <= WINDOW_AFTER else None

    def _reported_lost(self, tries: list[tuple[str, str, int, int]], at: float) -> dict[str, Any]:
        """Seconds from ``at`` until an executor had reported every one of ``tries`` lost, and why."""
        reports = [self.lost.get(key) for key in tries]
        found = [r for r in reports if r is not None]
        out: dict[str, Any] = {"lost_reasons": sorted({why for _t, why in found})}
        if len(found) == len(tries) and max(t for t, _w in found) - at <= WINDOW_AFTER:
            out["reported_lost_s"] = round(max(t for t, _w in found) - at, 2)
        else:
            out["reported_lost_s"] = None
        return out

    def _impaired(self, host: str, start: float, end: float, exclude: Fault) -> bool:
        for fault in self.faults:
            if fault is exclude or fault.skipped or fault.target != host:
                continue
            if fault.at <= end and (fault.end or end) >= start:
                return True
        return False

    def recovery(self, fault: Fault, schedulers: list[Path]) -> dict[str, Any]:
        kind, at, host = fault.planned.kind, fault.at, fault.target
        out: dict[str, Any] = {}

        def since(t: float | None, ref: float) -> float | None:
            return round(t - ref, 2) if t is not None and t - ref <= WINDOW_AFTER else None

        if kind in ("worker_kill", "scheduler_kill", "redis_kill", "sentinel_failover"):
            out["waiting_at_fault"] = self.waiting(at)
            if out["waiting_at_fault"]:
                out["next_start_s"] = since(self.next_start(at), at)
        if kind == "worker_kill":
            tick = self.sampler.first_tick(host, fault.end or at)
            out["consuming_s"] = since(tick, at)
            out["start_s"] = since(tick, fault.end or at)
            interrupted = self._running(host, at)
            out["interrupted_tries"] = len(interrupted)
            if interrupted:
                out.update(self._reported_lost(interrupted, at))
                out["rerun_s"] = self._rerun(interrupted, at)
        elif kind == "scheduler_kill":
            owned = [tuple(k) for k in fault.notes.get("in_flight_keys", [])]
            out["in_flight"] = len(owned)
            if owned:
                ends = [self.final_at(k) for k in owned]
                out["orphans_final_s"] = None if None in ends else since(max(ends), at)  # type: ignore[type-var]
                adopted = [t for path in schedulers for t in log_times(path, ADOPTED) if at < t < at + ADOPT_WITHIN]
                if adopted:  # not needed when they all end before the dead job is noticed (30 s)
                    out["adopted_s"] = since(min(adopted), at)
        elif kind in ("redis_kill", "sentinel_failover"):
            switched = fault.notes.get("switched_at")
            out["switch_s"] = since(switched, at)
            new = fault.notes.get("new_master")
            per_host = {}
            for name in self.sampler.nodes:
                tick = self.sampler.first_tick(name, at, master=new)
                if self._impaired(name, at, tick or at + WINDOW_AFTER, fault):
                    continue  # another fault had this host down or cut off before it recovered
                per_host[name] = since(tick, at)
            out["consuming_per_host_s"] = per_host
            values = list(per_host.values())
            out["consuming_s"] = None if not values or None in values else max(values)  # type: ignore[type-var]
        elif kind in ("partition", "netem"):
            end = fault.end or at
            out["consuming_s"] = since(self.sampler.first_tick(host, end), end)
            out["waiting_at_end"] = self.waiting(end)
            if out["waiting_at_end"]:
                out["host_start_s"] = since(self.next_start(end, host), end)
            out["starts_on_host_during"] = sum(1 for t, h, _k in self.starts if h == host and at <= t <= end)
            interrupted = self._running(host, at)
            stopped = [key for key in interrupted if not self.dones.get(key)]
            out["running_at_fault"] = len(interrupted)
            out["of_which_finished"] = len(interrupted) - len(stopped)
            if kind == "partition" and any(key in self.lost for key in interrupted):
                out.update(self._reported_lost([k for k in interrupted if k in self.lost], at))
            if stopped:
                out["rerun_s"] = self._rerun(stopped, at)
            if kind == "partition":
                out["fenced"] = any(at <= t <= end + 5 for t in line_times(self.logs / f"{host}.log",
                                                                             "fenced: worker"))
        return out


def summarize(recoveries: list[tuple[Fault, dict[str, Any]]]) -> dict[str, Any]:
    """Per kind: how many ran (and were skipped or failed), and median and max of each measure.
    A measure that never happened within ``WINDOW_AFTER`` counts in ``unrecovered``."""
    summary: dict[str, Any] = {}
    for kind, measures in MEASURES.items():
        ran = [(f, r) for f, r in recoveries if f.planned.kind == kind and not f.skipped]
        entry: dict[str, Any] = {
            "ran": len(ran),
            "skipped": sum(1 for f, _r in recoveries if f.planned.kind == kind and f.skipped),
            "errors": sum(1 for f, _r in ran if f.error),
        }
        for name, meaning in measures:
            present = [r for _f, r in ran if name in r]
            values = [r[name] for r in present if r[name] is not None]
            entry[name] = {**_stats(values), "unrecovered": len(present) - len(values),
                           "not_applicable": len(ran) - len(present), "meaning": meaning}
        summary[kind] = entry
    return summary


def task_instances(rows: list[list[str]]) -> dict[str, Any]:
    """Counts from ``run_id, task_id, map_index, state, try_number`` rows of task_instance."""
    states = collections.Counter(r[3] or "none" for r in rows)
    stuck = [r for r in rows if (r[3] or "none") not in FINAL]
    return {
        "total": len(rows),
        "by_state": dict(states),
        "success": states.get("success", 0),
        "queued_or_running": sum(1 for r in rows if r[3] in ("queued", "running")),
        "not_final": len(stuck),
        "not_success": [{"run_id": r[0], "task_id": r[1], "map_index": int(r[2]), "state": r[3] or "none",
                         "try_number": int(r[4] or 0)} for r in rows if r[3] != "success"],
    }
