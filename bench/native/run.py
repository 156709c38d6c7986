"""Native-lane benchmark: N concurrent ``async def`` tasks sleeping 1 s on ONE lane process, and the same
workload as ``def`` tasks on a stock ``celery worker -P prefork -c 8``, in the same run, same Redis DB.

    .venv/bin/python bench/native/run.py [--tasks 1000] [--repeats 3] [--prefork-repeats 1]

For each run: wall time from the first publish to the last result, and the peak RSS (and PSS) of the
worker's process tree, sampled every 50 ms. Results go to bench/native/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parents[2]
DB = 12
URL = f"redis://127.0.0.1:6379/{DB}"
PREFIX = "bench-native"
MIB = 1024 * 1024


class PeakMemory(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.rss, self.pss, self.stop = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs)
                pss = sum(p.memory_full_info().pss for p in procs)
            except psutil.Error:
                continue
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)


def env() -> dict[str, str]:
    home = tempfile.mkdtemp(prefix="bench-native-")
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    base.update({"AIRFLOW_HOME": home, "AIRFLOW__ASYNCQ__BROKER_URL": URL, "AIRFLOW__ASYNCQ__KEY_PREFIX": PREFIX,
                 "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONPATH": str(ROOT), "BENCH_REDIS_URL": URL,
                 "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db"})
    return base


def wait_ready(client: redis.Redis, proc: subprocess.Popen[bytes], check: Any, what: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def publisher() -> Any:
    """A broker-only Celery app: publishing does not subscribe to result channels (Celery's Redis result
    backend SUBSCRIBEs once per sent task, which alone took 15-25 s for 1,000 sends here). Workers store
    results anyway; the driver finds them with MGET."""
    from celery import Celery

    app = Celery("bench-publisher", broker=URL, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_backend=None)
    return app


def drive(name: str, queue: str, n: int, pid: int, result_key: str) -> dict[str, Any]:
    import uuid

    client = redis.Redis(db=DB)
    app = publisher()
    ids = [str(uuid.uuid4()) for _ in range(n)]
    keys = [result_key + task_id for task_id in ids]
    peak = PeakMemory(pid)
    peak.start()
    time.sleep(0.3)
    idle_rss = peak.rss
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for task_id in ids:
            app.send_task(name, args=[1.0], queue=queue, task_id=task_id, producer=producer)
    published = time.monotonic() - started
    pending = keys
    while pending:
        values = client.mget(pending)
        pending = [k for k, v in zip(pending, values, strict=True) if v is None]
        if pending:
            time.sleep(0.02)
        if time.monotonic() - started > 600:
            raise TimeoutError(f"{len(pending)} results missing after 600 s")
    wall = time.monotonic() - started
    peak.stop.set()
    peak.join()
    metas = [json.loads(v) for v in client.mget(keys)]
    assert all(m["status"] == "SUCCESS" and m["result"] == 1.0 for m in metas), "every task must succeed"
    client.delete(*keys)
    return {"wall_s": round(wall, 3), "publish_s": round(published, 3), "peak_rss_mib": round(peak.rss / MIB, 1),
            "peak_pss_mib": round(peak.pss / MIB, 1), "idle_rss_mib": round(idle_rss / MIB, 1)}


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefork-repeats", type=int, default=1)
    args = parser.parse_args()
    client = redis.Redis(db=DB)
    client.flushdb()
    e = env()
    os.environ.update({k: e[k] for k in ("AIRFLOW__ASYNCQ__BROKER_URL", "AIRFLOW__ASYNCQ__KEY_PREFIX",
                                         "BENCH_REDIS_URL")})
    sys.path.insert(0, str(ROOT))
    logs = Path(e["AIRFLOW_HOME"])
    lane = subprocess.Popen([sys.executable, "-m", "airflow_asyncq_provider.native.lane", "--loop-concurrency",
                             str(args.tasks), "--sync-threads", "1", "--queues", "bench-native", "--hostname",
                             "bench@%h-native", "--task-modules", "bench.native.tasks", "--loglevel", "WARNING"],
                            env=e, cwd=ROOT, start_new_session=True, stdout=open(logs / "lane.log", "wb"),
                            stderr=subprocess.STDOUT)
    lane_runs = []
    try:
        wait_ready(client, lane, lambda: client.hexists(f"{PREFIX}:native:tasks", "bench.sleep"), "native lane")
        time.sleep(1)
        for _ in range(args.repeats):
            lane_runs.append(drive("bench.sleep", "bench-native", args.tasks, lane.pid,
                                   f"{PREFIX}:native:celery-task-meta-"))
            print("lane", lane_runs[-1], flush=True)
    finally:
        stop(lane)
    from bench.native.prefork_app import app as prefork

    celery = str(Path(sys.executable).with_name("celery"))
    worker = subprocess.Popen([celery, "-A", "bench.native.prefork_app", "worker", "-P", "prefork", "-c", "8",
                               "-Q", "bench-prefork", "--loglevel", "WARNING", "--without-mingle",
                               "--without-gossip", "-n", "bench-prefork@%h"],
                              env=e, cwd=ROOT, start_new_session=True, stdout=open(logs / "prefork.log", "wb"),
                              stderr=subprocess.STDOUT)
    prefork_runs = []
    try:
        wait_ready(client, worker, lambda: bool(prefork.control.ping(timeout=0.5)), "prefork worker")
        for _ in range(args.prefork_repeats):
            prefork_runs.append(drive("bench.sync_sleep", "bench-prefork", args.tasks, worker.pid,
                                      "celery-task-meta-"))
            print("prefork", prefork_runs[-1], flush=True)
    finally:
        stop(worker)

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    import celery as celery_pkg

    summary = {
        "tasks": args.tasks, "sleep_s": 1.0, "machine": f"{os.cpu_count()} CPUs", "python": sys.version.split()[0],
        "celery": celery_pkg.__version__,
        "lane": {"runs": lane_runs, "median_wall_s": median(lane_runs, "wall_s"),
                 "median_peak_rss_mib": median(lane_runs, "peak_rss_mib"),
                 "median_peak_pss_mib": median(lane_runs, "peak_pss_mib")},
        "prefork_c8": {"runs": prefork_runs, "median_wall_s": median(prefork_runs, "wall_s"),
                       "median_peak_rss_mib": median(prefork_runs, "peak_rss_mib"),
                       "median_peak_pss_mib": median(prefork_runs, "peak_pss_mib")},
    }
    out = Path(__file__).with_name("results.json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("lane", "prefork_c8")}))
    print("lane median wall", summary["lane"]["median_wall_s"], "s, peak RSS", summary["lane"]["median_peak_rss_mib"],
          "MiB | prefork -c 8 median wall", summary["prefork_c8"]["median_wall_s"], "s, peak RSS",
          summary["prefork_c8"]["median_peak_rss_mib"], "MiB")
    client.flushdb()


if __name__ == "__main__":
    main()
