"""The chaos run: a fleet of three worker hosts on Redis Sentinel, two schedulers, and seeded faults.

    .venv/bin/python -m bench.chaos.run [--minutes 10] [--seed N] [--tasks 1000]     (make chaos ARGS=...)

Needs root (network namespaces, iptables), PostgreSQL on 127.0.0.1:5432 and ``redis-server``. It
starts the deployment of topology.py, triggers ``asyncq_chaos`` runs totalling ``--tasks`` mapped tasks
spread over the window, injects one planned fault every 15–30 s for ``--minutes``, then lets the fleet
settle without faults (bounded by ``--settle-minutes``) and counts (account.py). Results go to
bench/results/chaos.json and to the generated block of docs/RELIABILITY.md.

Everything it creates is removed when it ends, also on an error or SIGTERM; what a crashed run left
behind is removed when the next one starts (topology.cleanup_leftovers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.chaos import account, faults, report
from bench.chaos.topology import DB, HOSTS, SCHEDULERS, Deployment, cleanup_leftovers, psql
from bench.chaos.watch import Sampler

DAG_ID = account.DAG_ID
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "chaos.json"
STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S} +{time.monotonic() - STARTED:6.0f}s] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the fault window (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault plan (default: a random one, "
                                                               "printed and recorded)")
    parser.add_argument("--tasks", type=int, default=1000, help="mapped tasks in total (default 1000)")
    parser.add_argument("--runs", type=int, default=None, help="DAG runs they are split into (default: one "
                                                               "per 100 tasks, at least 4)")
    parser.add_argument("--sleep", type=float, default=1.5, help="mean-ish seconds each task sleeps between "
                                                                 "start and done (×0.5–1.4; default 1.5)")
    parser.add_argument("--settle-minutes", type=float, default=15.0,
                        help="at most this long without faults for the runs to finish (default 15)")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/RELIABILITY.md")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.tasks < 1:
        parser.error("--minutes must be > 0 and --tasks >= 1")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**6)
    if args.runs is None:
        args.runs = max(4, args.tasks // 100)
    args.runs = min(args.runs, args.tasks)
    return args


# ---------------------------------------------------------------------------------------- supervision
class Supervisor:
    """Restarts what exited while no fault was meant to stop it, and records it: a finding, not noise."""

    def __init__(self, dep: Deployment, chaos: faults.Chaos) -> None:
        self.dep = dep
        self.chaos = chaos
        self.exits: list[dict[str, Any]] = []

    def check(self) -> None:
        stack, group = self.dep.stack, self.dep.redis
        assert stack is not None and group is not None
        for name, proc in list(stack.procs.items()):
            if proc.poll() is None or self.chaos.is_busy(name):
                continue
            tail = (stack.logs / f"{name}.log").read_text(errors="replace")[-3000:]
            self.exits.append({"at": time.time(), "name": name, "code": proc.returncode, "log_tail": tail})
            log(f"{name} exited by itself with code {proc.returncode}; restarting it")
            self.dep.restart_core(name)
        for name in (*HOSTS, *SCHEDULERS):  # a fault that failed to restart what it stopped
            if name not in stack.procs and not self.chaos.is_busy(name):
                self.exits.append({"at": time.time(), "name": name, "code": None, "log_tail": "not running"})
                log(f"{name} is not running and no fault holds it; starting it")
                self.dep.restart_core(name)
        if self.chaos.is_busy("redis"):
            return
        for port in group.dead():
            code = group.procs.pop(port).returncode
            self.exits.append({"at": time.time(), "name": f"redis:{port}", "code": code,
                               "log_tail": group.logs(800)})
            master = group.master_port()
            log(f"redis :{port} exited by itself with code {code}; restarting it")
            if port in group.sentinel_ports:
                group.start_sentinel(port, master or group.redis_ports[0])
            else:
                group.start_redis(port, replica_of=master if master != port else None)


# ---------------------------------------------------------------------------------------- the window
def split(tasks: int, runs: int) -> list[int]:
    return [tasks // runs + (1 if i < tasks % runs else 0) for i in range(runs)]


def trigger(dep: Deployment, index: int, n: int, sleep: float) -> dict[str, Any]:
    assert dep.stack is not None
    run_id = f"chaos_{index:03d}"
    for attempt in range(10):  # bounded: the api-server is not a fault target, but it may be slow
        try:
            dep.stack.trigger(DAG_ID, conf={"n": n, "sleep": sleep}, run_id=run_id)
            log(f"triggered {run_id}: {n} tasks")
            return {"run_id": run_id, "n": n, "at": time.time()}
        except Exception as exc:
            if "409" in str(exc):  # a retry whose first try got through
                return {"run_id": run_id, "n": n, "at": time.time()}
            log(f"trigger {run_id} failed ({exc}); try {attempt + 2} in 3 s")
            time.sleep(3)
    raise RuntimeError(f"could not trigger {run_id}")


def window(args: argparse.Namespace, dep: Deployment, chaos: faults.Chaos, supervisor: Supervisor,
           planned: list[faults.Planned]) -> tuple[float, list[dict[str, Any]]]:
    length = args.minutes * 60
    sizes = split(args.tasks, args.runs)
    events: list[tuple[float, int, str, Any]] = [(i * length / args.runs, 0, "trigger", i) for i in range(args.runs)]
    events += [(p.offset, 1, "fault", p) for p in planned]
    events.sort(key=lambda e: (e[0], e[1]))
    opened = time.time()
    runs = []
    for offset, _order, what, item in events:
        while time.time() < opened + offset:
            supervisor.check()
            time.sleep(min(1.0, max(0.0, opened + offset - time.time())))
        if what == "trigger":
            runs.append(trigger(dep, item, sizes[item], args.sleep))
        else:
            chaos.launch(item)
    while time.time() < opened + length:
        supervisor.check()
        time.sleep(1)
    log("the fault window is closed: undoing the faults that are still on")
    chaos.finish()
    supervisor.check()
    return opened, runs


def run_states() -> dict[str, str]:
    rows = psql(f"SELECT run_id, state FROM dag_run WHERE dag_id = '{DAG_ID}'", DB)
    return dict(line.split("\t") for line in rows.splitlines() if line)


def fleet_whole(dep: Deployment, sampler: Sampler, since: float) -> list[str]:
    """What is not back yet: hosts without a consumer tick after ``since``, a Sentinel group that is not
    healthy. (Core processes that are down are restarted by the supervisor.)"""
    assert dep.redis is not None
    missing = [f"host {name}" for name in HOSTS if sampler.first_tick(name, since) is None]
    if not dep.redis.healthy():
        missing.append("a healthy Sentinel group")
    return missing


def settle(args: argparse.Namespace, dep: Deployment, sampler: Sampler, supervisor: Supervisor,
           runs: list[dict[str, Any]]) -> dict[str, Any]:
    """No faults: wait until every run is final and the whole fleet is back (so that the last faults'
    recoveries can be measured), for at most ``--settle-minutes``."""
    began = time.time()
    deadline = began + args.settle_minutes * 60
    states: dict[str, str] = {}
    last_note = 0.0
    missing: list[str] = []
    while time.time() < deadline:
        supervisor.check()
        states = run_states()
        open_runs = [r["run_id"] for r in runs if states.get(r["run_id"]) not in ("success", "failed")]
        missing = fleet_whole(dep, sampler, began)
        if not open_runs and not missing:
            break
        if time.time() - last_note > 30:
            done = psql(f"SELECT count(*) FROM task_instance WHERE dag_id = '{DAG_ID}' AND state IN "
                        f"('success', 'failed', 'upstream_failed')", DB).strip()
            log(f"settling: {len(open_runs)} run(s) open, {done} task instances final"
                + (f"; waiting for {', '.join(missing)}" if missing else ""))
            last_note = time.time()
        time.sleep(2)
    return {"seconds": round(time.time() - began, 1), "limit_s": args.settle_minutes * 60,
            "fleet_not_back": missing,
            "all_runs_final": all(states.get(r["run_id"]) in ("success", "failed") for r in runs),
            "run_states": {r["run_id"]: states.get(r["run_id"], "missing") for r in runs}}


# ---------------------------------------------------------------------------------------- counting
def collect(args: argparse.Namespace, dep: Deployment, sampler: Sampler, chaos: faults.Chaos,
            supervisor: Supervisor, opened: float, runs: list[dict[str, Any]],
            settled: dict[str, Any]) -> dict[str, Any]:
    assert dep.stack is not None and dep.redis is not None
    tis = [line.split("\t") for line in psql(
        f"SELECT run_id, task_id, map_index, state, try_number FROM task_instance WHERE dag_id = '{DAG_ID}' "
        f"ORDER BY run_id, task_id, map_index", DB).splitlines() if line]
    history = [line.split("\t") for line in psql(
        f"SELECT run_id, task_id, map_index, try_number, state FROM task_instance_history "
        f"WHERE dag_id = '{DAG_ID}'", DB).splitlines() if line]
    tries = {}
    for table in ("task_instance", "task_instance_history"):
        for line in psql(f"SELECT run_id, task_id, map_index, try_number, extract(epoch from queued_dttm), "
                         f"extract(epoch from end_date) FROM {table} WHERE dag_id = '{DAG_ID}'", DB).splitlines():
            if line:
                run_id, task_id, index, attempt, queued, ended = line.split("\t")
                tries[(run_id, task_id, int(index), int(attempt))] = (float(queued) if queued else None,
                                                                      float(ended) if ended else None)
    books = account.Accounting(dep.effects, sampler, chaos.faults, dep.stack.logs, tries)
    schedulers = [dep.stack.logs / "scheduler.log", dep.stack.logs / "scheduler-b.log"]
    per_fault = [(f, {} if f.skipped else books.recovery(f, schedulers)) for f in chaos.faults]
    counts = account.task_instances(tis)
    expected = args.tasks + len(runs)  # the mapped tasks and one ``items`` per run
    fleet_events: dict[str, int] = {}
    dlq = None
    try:
        client = dep.redis.client()
        for _id, fields in client.xrange("hosts:fleet-events"):
            fleet_events[fields.get("kind", "?")] = fleet_events.get(fields.get("kind", "?"), 0) + 1
        dlq = client.llen("hosts:dlq")
    except Exception as exc:
        log(f"could not read the fleet events: {exc}")
    history_states: dict[str, int] = {}
    for row in history:
        history_states[row[4] or "none"] = history_states.get(row[4] or "none", 0) + 1
    doubles = books.doubles()
    states = {(r[0], r[1], int(r[2]), int(r[3])): r[4] or "none" for r in history}
    states.update({(r[0], r[1], int(r[2]), int(r[4] or 0)): r[3] or "none" for r in tis})
    for item in doubles["done_in_two_tries"]:  # what Airflow recorded for each try that did the work
        item["states"] = {str(t): states.get((*item["ti"], t), "?") for t in item["tries"]}
    doubles["two_tries_both_success"] = sum(
        1 for item in doubles["done_in_two_tries"] if all(v == "success" for v in item["states"].values()))
    stuck = account.stuck_in_queued(schedulers)
    return {
        "seed": args.seed,
        "args": {"minutes": args.minutes, "tasks": args.tasks, "runs": args.runs, "sleep": args.sleep,
                 "settle_minutes": args.settle_minutes},
        "command": f".venv/bin/python -m bench.chaos.run --minutes {args.minutes:g} --seed {args.seed} "
                   f"--tasks {args.tasks}",
        "date": datetime.datetime.fromtimestamp(opened, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "window_opened": opened,
        "runs": runs,
        "settle": settled,
        "task_instances": {**counts, "expected": expected},
        "earlier_tries_by_state": history_states,
        "side_effects": doubles,
        "side_effect_server": dep.sink.stats() if dep.sink is not None else None,  # lines written, refused
        "stuck_in_queued": stuck,
        "fleet_events": fleet_events,
        "dead_letters": dlq,
        "master_changes": [{"at": at, "port": port} for at, port in sampler.masters],
        "unexpected_exits": supervisor.exits,
        "faults": [{**f.as_dict(), "offset_s": round(f.at - opened, 1), "recovery": r} for f, r in per_fault],
        "recovery": account.summarize(per_fault),
        "targets": targets(counts, expected, doubles, settled, stuck),
    }


def targets(counts: dict[str, Any], expected: int, doubles: dict[str, Any], settled: dict[str, Any],
            stuck: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three targets, and a fourth that "nothing stuck" at the end can hide: no task
    instance that had to wait for ``[scheduler] task_queued_timeout`` to be requeued."""
    twice = len(doubles["done_twice_same_try"]) + len(doubles["done_in_two_tries"])
    stuck_tis = {(s["run_id"], s["task_id"], s["map_index"]) for s in stuck}
    return {
        "every_ti_success": {"met": counts["success"] == expected == counts["total"],
                             "value": f"{counts['success']} of {expected} succeeded ({counts['total']} exist)"},
        "no_doubles": {"met": twice == 0,
                       "value": f"{twice} side effects done twice: {len(doubles['done_twice_same_try'])} in one try, "
                                f"{len(doubles['done_in_two_tries'])} in two tries (in "
                                f"{doubles.get('two_tries_both_success', 0)} of which Airflow recorded both "
                                f"tries as success)"},
        "nothing_stuck": {"met": counts["not_final"] == 0 and settled["all_runs_final"],
                          "value": f"{counts['queued_or_running']} queued or running, {counts['not_final']} not "
                                   f"final, settle {settled['seconds']:.0f} s of {settled['limit_s']:.0f} s"},
        "no_queued_timeout": {"met": not stuck,
                              "value": f"{len(stuck_tis)} task instances sat in queued until task_queued_timeout "
                                       f"({len(stuck)} requeues)"},
    }


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    load = os.getloadavg()
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return {"node": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "airflow": md.version("apache-airflow"),
            "celery": md.version("celery"), "kombu": md.version("kombu"), "redis_py": md.version("redis"),
            "memory_gib": round(int(mem) / 1024**2, 1), "loadavg_at_end": [round(x, 2) for x in load]}


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` removes what we created
    planned = faults.plan(args.seed, args.minutes)
    log(f"seed {args.seed}: {len(planned)} faults over {args.minutes:g} min, {args.tasks} tasks in {args.runs} runs")
    for p in planned:
        log(f"  plan +{p.offset:5.1f}s {p.kind:<17} {p.target:<12} hold {p.hold:4.1f}s {p.variant}"
            + (f" delay {p.delay * 1000:.0f}ms loss {p.loss:.1%}" if p.kind == "netem" else ""))
    for note in cleanup_leftovers():
        log(f"cleanup of an earlier run: {note}")
    load_before = [round(x, 2) for x in os.getloadavg()]
    dep = Deployment()
    sampler: Sampler | None = None
    result: dict[str, Any] | None = None
    try:
        dep.start(log)
        assert dep.stack is not None and dep.redis is not None and dep.fleet is not None
        dep.stack.wait_dag(DAG_ID, timeout=300)
        sampler = Sampler(dep.redis, {name: dep.fleet.node(name) for name in HOSTS}, "hosts")
        sampler.start()
        chaos = faults.Chaos(dep, log)
        supervisor = Supervisor(dep, chaos)
        opened, runs = window(args, dep, chaos, supervisor, planned)
        settled = settle(args, dep, sampler, supervisor, runs)
        log(f"settled in {settled['seconds']:.0f} s: " + ", ".join(f"{k}={v}" for k, v in settled["run_states"].items()))
        result = collect(args, dep, sampler, chaos, supervisor, opened, runs, settled)
        result["machine"]["loadavg_at_start"] = load_before
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if sampler is not None:
            try:
                sampler.stop()
            except Exception:
                traceback.print_exc()
        log("removing the deployment (processes, namespaces, rules, database)")
        dep.close()
    report.save(result, RESULTS)
    if not args.no_doc:
        report.document(result)
    report.print_summary(result, log)
    return 0 if all(t["met"] for t in result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
