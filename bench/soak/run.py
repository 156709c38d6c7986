"""Soak: at least 2,000 tasks through ONE `airflow asyncq worker`, on real Airflow, PostgreSQL and Redis.

Reports the RSS of the worker's long-lived processes (the Celery main process and the fork server;
workload children come and go and are not part of a leak) over time, and the growth from the first to
the last thousand tasks (target < 10 %). Also reports the scheduler's loop time, received as StatsD
``scheduler.scheduler_loop_duration`` timings on a local UDP port.

    .venv/bin/python bench/soak/run.py [--tasks 2000] [--per-run 500] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from devtools.stack import Stack  # noqa: E402

DB = "asyncq_soak"
REDIS_DB = 9
MIB = 1024**2


class StatsdSink(threading.Thread):
    """Collects ``scheduler.scheduler_loop_duration`` timings (ms) sent by the scheduler."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.loops: list[tuple[float, float]] = []

    def run(self) -> None:
        while True:
            data = self.sock.recv(65535).decode(errors="replace")
            for line in data.splitlines():
                if "scheduler_loop_duration:" in line and "|ms" in line:
                    self.loops.append((time.time(), float(line.split(":")[1].split("|")[0])))


def long_lived(worker_pid: int) -> list[psutil.Process]:
    root = psutil.Process(worker_pid)
    return [root, *[c for c in root.children() if "forkserver" in " ".join(c.cmdline())]]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--per-run", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so `finally` stops every process we started

    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)"], check=True
    )
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", f"CREATE DATABASE {DB}"], check=True)
    subprocess.run(["redis-cli", "-n", str(REDIS_DB), "FLUSHDB"], check=True, capture_output=True)
    home = REPO / ".stack-soak"
    shutil.rmtree(home, ignore_errors=True)
    sink = StatsdSink()
    sink.start()
    stack = Stack(
        home,
        sql_conn=f"postgresql+psycopg2://postgres@127.0.0.1:5432/{DB}",
        broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
        key_prefix="soak",
        dags_folder=REPO / "bench" / "soak" / "dags",
        extra_env={
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(sink.port),
            "AIRFLOW__CORE__MAX_MAP_LENGTH": str(max(1024, args.per_run)),
            "AIRFLOW__CORE__PARALLELISM": str(args.concurrency * 2),
        },
    )
    samples: list[dict[str, Any]] = []
    try:
        stack.migrate()
        stack.start_core()
        worker = stack.start_worker("soak", concurrency=args.concurrency)
        stack.wait_api()
        stack.wait_dag("asyncq_soak")
        time.sleep(5)
        done = 0
        failures = 0
        started = time.monotonic()
        runs = -(-args.tasks // args.per_run)
        for index in range(runs):
            run_id = stack.trigger("asyncq_soak", conf={"n": args.per_run}, run_id=f"soak_{index}")
            while True:
                stack.check_alive()
                state = stack.api("GET", f"/api/v2/dags/asyncq_soak/dagRuns/{run_id}")["state"]
                finished = stack.api(
                    "GET",
                    f"/api/v2/dags/asyncq_soak/dagRuns/{run_id}/taskInstances"
                    "?limit=1&state=success&state=failed",
                )["total_entries"]
                rss = {p.pid: p.memory_info().rss for p in long_lived(worker.pid)}
                samples.append(
                    {
                        "t": round(time.monotonic() - started, 1),
                        "done": done + finished,
                        "rss_mib": round(sum(rss.values()) / MIB, 1),
                    }
                )
                if state in ("success", "failed"):
                    states = [ti["state"] for ti in stack.task_instances("asyncq_soak", run_id)]
                    break
                time.sleep(3)
            failed = sum(1 for s in states if s != "success")
            failures += failed
            done += len(states)
            print(
                f"run {index + 1}/{runs}: {len(states)} task instances, {failed} not successful, "
                f"{done} done, worker RSS {samples[-1]['rss_mib']} MiB, {time.monotonic() - started:.0f} s",
                flush=True,
            )
    finally:
        stack.stop()
    first = [s["rss_mib"] for s in samples if s["done"] <= 1000]
    last = [s["rss_mib"] for s in samples if s["done"] > done - 1000]
    growth = (statistics.median(last) / statistics.median(first) - 1) * 100
    loops = [ms for _t, ms in sink.loops]
    half = len(loops) // 2
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tasks": done,
        "concurrency": args.concurrency,
        "duration_s": round(samples[-1]["t"], 1),
        "worker_rss_mib_first_1000_median": statistics.median(first),
        "worker_rss_mib_last_1000_median": statistics.median(last),
        "worker_rss_growth_pct": round(growth, 1),
        "scheduler_loop_ms_median": round(statistics.median(loops), 1) if loops else None,
        "scheduler_loop_ms_p95": round(sorted(loops)[int(len(loops) * 0.95)], 1) if loops else None,
        "scheduler_loop_ms_median_first_half": round(statistics.median(loops[:half]), 1) if half else None,
        "scheduler_loop_ms_median_second_half": round(statistics.median(loops[half:]), 1) if half else None,
        "scheduler_loops": len(loops),
        "samples": samples,
    }
    out = REPO / "bench" / "results" / "soak.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    print(f"target: worker RSS growth < 10 % -> {'met' if growth < 10 else 'MISSED'}; results in {out}")
    if not failures:
        shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"some task instances did not succeed; component logs kept in {home / 'logs'}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
