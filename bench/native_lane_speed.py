"""How fast one native lane is where tests/integration/native/test_lane.py only checks that it is correct.

    .venv/bin/python bench/native_lane_speed.py [--repeats 5] [--out FILE]

Starts one lane (``--loop-concurrency 50 --sync-threads 2``, as the test's) on Redis DB 12 under a key
prefix and queue of its own (it deletes only those keys, so it may run beside bench/native/run.py, which
flushes DB 12 when it starts), and times three cases, each ``--repeats`` times:

* ``fan_out``: 100 ``async def`` tasks sleeping 0.5 s, from the first send to the last result. Perfect
  overlap on 50 slots is 1 s; the old test bound was 4 s.
* ``loop_while_threads_blocked``: both sync threads busy with a 2 s ``def`` task, then 5 sleeps of 0.05 s
  on the loop, one after another. No waiting for a thread is 0.25 s; the old test bound was 1.5 s.
* ``trigger_fail_fast``: ``NativeResultTrigger`` over a 5 s sleep and a task that raises, until its event.
  The old test bound was 4 s.

Prints every run and the medians; ``--out`` also writes them as JSON. The tasks are defined below; the
lane imports this module with ``--task-modules bench.native_lane_speed``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from airflow_asyncq_provider.native import fleet  # noqa: E402  (reads no configuration at import)

DB = 12
URL = f"redis://127.0.0.1:6379/{DB}"
# case -> the bound the integration test used to assert, kept here as the target
TARGETS = {"fan_out": 4.0, "loop_while_threads_blocked": 1.5, "trigger_fail_fast": 4.0}


@fleet.task(name="bench.speed.sleep")
async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@fleet.task(name="bench.speed.sync_sleep")
def sync_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@fleet.task(name="bench.speed.fail")
async def fail(message: str) -> None:
    raise ValueError(message)


# ---------------------------------------------------------------- the lane
class Lane:
    def __init__(self, prefix: str, queue: str, node: str, home: Path) -> None:
        from celery.utils.nodenames import host_format

        self.prefix, self.queue, self.hostname = prefix, queue, host_format(node)
        self.log_path = home / "lane.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
        env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__ASYNCQ__BROKER_URL": URL,
                    "AIRFLOW__ASYNCQ__KEY_PREFIX": prefix, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
                    "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "airflow_asyncq_provider.native.lane", "--loop-concurrency", "50",
                 "--sync-threads", "2", "--queues", queue, "--hostname", node,
                 "--task-modules", "bench.native_lane_speed", "--loglevel", "WARNING"],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, client: Any, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the lane exited with {self.proc.returncode}:\n{self.tail()}")
            if client.hexists(f"{self.prefix}:native:tasks", "bench.speed.sleep"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the lane did not register its tasks within {timeout} s:\n{self.tail()}")

    def wait_started(self, results: list[Any], timeout: float = 10) -> None:
        inspect = fleet.control.inspect(destination=[self.hostname], timeout=1.0)
        wanted = {r.id for r in results}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = (inspect.active() or {}).get(self.hostname) or []
            if wanted <= {task["id"] for task in active}:
                return
            time.sleep(0.05)
        raise TimeoutError(f"the lane did not start {sorted(wanted)} within {timeout} s")

    def send(self, name: str, *args: Any) -> Any:
        return fleet.send_task(name, args=list(args), queue=self.queue)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- the cases
def fan_out(lane: Lane) -> float:
    started = time.monotonic()
    results = [lane.send("bench.speed.sleep", 0.5) for _ in range(100)]
    assert [r.get(timeout=60) for r in results] == [0.5] * 100
    return time.monotonic() - started


def loop_while_threads_blocked(lane: Lane) -> float:
    blockers = [lane.send("bench.speed.sync_sleep", 2.0) for _ in range(2)]
    lane.wait_started(blockers)
    started = time.monotonic()
    assert [lane.send("bench.speed.sleep", 0.05).get(timeout=30) for _ in range(5)] == [0.05] * 5
    elapsed = time.monotonic() - started
    assert [b.get(timeout=30) for b in blockers] == [2.0, 2.0]  # the next run starts with free threads
    return elapsed


def trigger_fail_fast(lane: Lane) -> float:
    from celery.exceptions import TaskRevokedError

    from airflow_asyncq_provider.triggers.native_result import NativeResultTrigger

    async def first(trigger: NativeResultTrigger) -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    slow, failing = lane.send("bench.speed.sleep", 5), lane.send("bench.speed.fail", "boom")
    started = time.monotonic()
    trigger = NativeResultTrigger([slow.id, failing.id], ["bench.speed.sleep", "bench.speed.fail"], 10_000)
    payload = asyncio.run(asyncio.wait_for(first(trigger), 60))
    elapsed = time.monotonic() - started
    assert payload["status"] == "failed" and payload["exc_type"] == "ValueError", payload
    # Collect both results, so no subscription is left pending, and free the slow one's coroutine slot.
    failing.get(timeout=30, propagate=False)
    fleet.control.revoke(slow.id, terminate=True)
    try:
        slow.get(timeout=30)
    except TaskRevokedError:
        pass
    return elapsed


CASES = {"fan_out": fan_out, "loop_while_threads_blocked": loop_while_threads_blocked,
         "trigger_fail_fast": trigger_fail_fast}


# ---------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    import redis

    uid = uuid.uuid4().hex[:8]
    prefix, queue = f"bench-speed-{uid}", f"bench-speed-{uid}"
    # The driver's fleet app and the trigger read [asyncq] from the environment on first use.
    os.environ.update({"AIRFLOW__ASYNCQ__BROKER_URL": URL, "AIRFLOW__ASYNCQ__KEY_PREFIX": prefix})
    client = redis.Redis(db=DB, decode_responses=True)
    client.ping()
    home = Path(tempfile.mkdtemp(prefix="bench-native-speed-"))
    lane = Lane(prefix, queue, f"bench-speed-{uid}@%h-native", home)
    runs: dict[str, list[float]] = {name: [] for name in CASES}
    try:
        lane.wait_ready(client)
        for repeat in range(1, args.repeats + 1):
            for name, case in CASES.items():
                runs[name].append(round(case(lane), 3))
                print(f"run {repeat}/{args.repeats} {name}: {runs[name][-1]:.3f} s", flush=True)
    finally:
        lane.stop()
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.delete(queue, *(f"{queue}\x06\x16{step}" for step in range(1, 10)))
    summary = {name: {"median_s": round(statistics.median(values), 3), "runs_s": values,
                      "target_s": TARGETS[name], "met": statistics.median(values) < TARGETS[name]}
               for name, values in runs.items()}
    print()
    for name, figures in summary.items():
        print(f"{name:28} median {figures['median_s']:6.3f} s   target < {figures['target_s']:g} s: "
              f"{'met' if figures['met'] else 'MISSED'}")
    print(f"lane log: {lane.log_path}")
    if args.out:
        args.out.write_text(json.dumps({"repeats": args.repeats, "cpus": os.cpu_count(),
                                        "python": sys.version.split()[0], "cases": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
