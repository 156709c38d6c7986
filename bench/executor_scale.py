"""The executor at scale, with a simulated fleet: what one scheduler heartbeat costs AsyncQExecutor with
100 to 10,000 tasks in flight, next to CeleryExecutor's bulk state fetch at the same counts.

    .venv/bin/python bench/executor_scale.py [--counts 100,1000,10000] [--repeats 5]

No Airflow worker or scheduler runs. A real ``AsyncQExecutor`` is constructed and ``start()``-ed against
real Redis (settings from ``AIRFLOW__ASYNCQ__BROKER_URL`` / ``AIRFLOW__ASYNCQ__KEY_PREFIX``; by default
Redis DB 12 on 127.0.0.1:6379 under a key prefix of this run), and real ``ExecuteTask`` workloads are
queued and published to it. A simulated fleet, in a process of its own, consumes the published messages
and writes what real workers write, through the same protocol functions: ``records.claim``, the
``received`` and ``started`` events (``events.emit``), ``records.take_lease``, and every beat a
``registry.heartbeat`` with a ``WorkerInfo`` listing its running tasks plus ``records.renew`` of their
leases. For each count and repeat (a fresh executor, key prefix and queue each time) it measures:

* publish: ``_process_workloads`` of up to 1,000 workloads per call (one heartbeat's worth);
* the common ``sync()`` (nothing changed, no periodic step due) and the periodic one (the Redis-restart,
  liveness and waiting-workload checks that run every ``LIVENESS_EVERY`` / ``QUEUE_CHECK_EVERY``): wall
  time, Redis round trips and commands;
* outcomes: min(N, 1,000) success events applied by one ``sync()``;
* memory: tracemalloc's traced bytes held by the executor for N tracked tasks, both published (each
  still holds its workload, for republishing) and started (the workload dropped), in a separate pass.

Round trips are counted exactly: ``redis.Redis.execute_command`` and ``redis.client.Pipeline.execute``
are wrapped at class level, so every client of the process counts (the executor's own and kombu's).
CeleryExecutor runs from ``.venv-celery`` (bench/setup_celery_venv.sh builds it) in a child process of
this script (``--celery-child``), with Celery's Redis result backend, and its ``sync()`` is measured the
same way. Prints a table; writes bench/results/executor_scale.json. Method and figures:
docs/BENCHMARKS.md, "Executor at scale (simulated fleet)".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DB = 12
URL = f"redis://127.0.0.1:6379/{DB}"
CELERY_VENV = REPO / ".venv-celery"
KOMBU_SEP = "\x06\x16"
MIB = 1024 * 1024
PUBLISH_BATCH = 1000  # workloads per _process_workloads call: what one heartbeat can publish
OUTCOMES = 1000
# metric -> (target, the count the target applies to, unit); from the issue ("Performance", item 4)
TARGETS: dict[str, tuple[float, int, str]] = {
    "common_sync_round_trips": (2, 10_000, ""),
    "common_sync_ms": (2.0, 10_000, "ms"),
    "outcomes_ms": (50.0, 1000, "ms"),
    "publish_ms": (100.0, 1000, "ms"),
    "memory_started_mib_per_10k": (20.0, 10_000, "MiB"),
}


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- counting round trips
class RoundTrips:
    """Counts request/response exchanges with Redis in this process while ``measuring()``.

    One ``execute_command`` of a client is one round trip; one ``Pipeline.execute`` (MULTI/EXEC or not)
    sends its whole command stack and reads every reply, so it is one round trip of many commands.
    """

    def __init__(self) -> None:
        self.active = False
        self.round_trips = 0
        self.commands: Counter[str] = Counter()

    def install(self) -> None:
        import redis
        import redis.client

        counter = self
        real_command = redis.Redis.execute_command
        real_execute = redis.client.Pipeline.execute

        def execute_command(client: Any, *args: Any, **options: Any) -> Any:
            if counter.active:
                counter.round_trips += 1
                counter.commands[str(args[0]).upper()] += 1
            return real_command(client, *args, **options)

        def execute(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            if counter.active and pipe.command_stack:
                counter.round_trips += 1
                for command in pipe.command_stack:
                    counter.commands[str(command[0][0]).upper()] += 1
            return real_execute(pipe, *args, **kwargs)

        redis.Redis.execute_command = execute_command  # type: ignore[method-assign]
        redis.client.Pipeline.execute = execute  # type: ignore[method-assign]

    @contextlib.contextmanager
    def measuring(self) -> Iterator[dict[str, Any]]:
        """Yields a dict that holds ``seconds`` (wall), ``cpu_seconds`` (this process), ``round_trips`` and
        ``commands`` once the block ends."""
        self.round_trips, self.commands = 0, Counter()
        out: dict[str, Any] = {}
        self.active = True
        cpu, started = time.process_time(), time.perf_counter()
        try:
            yield out
        finally:
            out["seconds"] = time.perf_counter() - started
            out["cpu_seconds"] = time.process_time() - cpu
            self.active = False
            out["round_trips"] = self.round_trips
            out["commands"] = sum(self.commands.values())
            out["by_command"] = dict(self.commands)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of seconds (as ms), round trips and commands over samples of one measurement."""
    return {
        "ms": round(median([s["seconds"] for s in samples]) * 1000, 3),
        "cpu_ms": round(median([s["cpu_seconds"] for s in samples]) * 1000, 3),
        "round_trips": median([s["round_trips"] for s in samples]),
        "commands": median([s["commands"] for s in samples]),
        "by_command": samples[len(samples) // 2]["by_command"],
        "n": len(samples),
    }


# ---------------------------------------------------------------- the simulated fleet (own process)
class SimFleet:
    """Workers that exist only as what they write to Redis, with the worker's own calls, in its order."""

    def __init__(self, url: str, prefix: str, queue: str, per_worker: int, settings: dict[str, Any]) -> None:
        import redis

        from airflow_asyncq_provider.state.keys import Keys

        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.keys = Keys(prefix)
        self.queue = queue
        self.per_worker = per_worker
        self.s = settings
        self.hosts: list[str] = []
        self.running: dict[str, dict[str, tuple[dict[str, Any], int, float]]] = {}  # host -> id -> entry
        self.started_at = time.time()
        self.next_pid = 10_000

    def _emit(self, task_id: str, kind: str, host: str, **fields: Any) -> None:
        from airflow_asyncq_provider.state import events

        events.emit(self.client, self.keys, task_id, kind, maxlen=self.s["event_stream_maxlen"],
                    ttl=self.s["state_ttl"], hostname=host, **fields)

    def _host_with_room(self) -> str:
        for host in self.hosts:
            if len(self.running[host]) < self.per_worker:
                return host
        host = f"sim-{len(self.hosts):04d}@bench-fleet"
        self.hosts.append(host)
        self.running[host] = {}
        return host

    def consume_and_start(self) -> int:
        """Take every message off the queue's priority lists and run each as a worker would start it."""
        from airflow_asyncq_provider.state import records

        messages = []
        for step in range(10):
            name = self.queue if step == 0 else f"{self.queue}{KOMBU_SEP}{step}"
            while True:
                raw = self.client.rpop(name)
                if raw is None:
                    break
                messages.append(json.loads(raw))
        for message in messages:
            task_id = message["headers"]["id"]
            key = json.loads(self.client.hget(self.keys.task(task_id), records.KEY) or "{}")
            host = self._host_with_room()
            claim = records.claim(self.client, self.keys, task_id, host, self.s["state_ttl"])
            assert claim.won, claim
            self._emit(task_id, "received", host, key=key)
            self.next_pid += 1
            self.running[host][task_id] = (key, self.next_pid, time.time())
            records.take_lease(self.client, self.keys, task_id, host, self.s["lease_ms"])
            self._emit(task_id, "started", host, key=key, pid=self.next_pid)
        self.beat()
        return len(messages)

    def beat(self) -> dict[str, int]:
        """Every worker's heartbeat: its registry record, then the renewal of its leases."""
        from airflow_asyncq_provider.state import records, registry

        now = time.time()
        for host in self.hosts:
            tasks = self.running[host]
            info = registry.WorkerInfo(
                queues=[self.queue], slots=self.per_worker, running=len(tasks), version="bench", pid=1,
                forkserver_pid=2, started_at=self.started_at, last_claim_at=now, consumer_tick_at=now,
                draining=False, memory_budget=self.per_worker * 512 * MIB,
                memory_reserved=len(tasks) * 256 * MIB, memory_in_use=len(tasks) * 50 * MIB,
                tasks={tid: registry.RunningTask(pid, 50 * MIB, None, 256 * MIB, round(at, 3), key)
                       for tid, (key, pid, at) in tasks.items()})
            registry.heartbeat(self.client, self.keys, host, info, ttl=self.s["worker_lost_timeout"])
            revoked = records.renew(self.client, self.keys, list(tasks), host, self.s["lease_ms"],
                                    self.s["state_ttl"])
            assert not revoked, revoked
        return {"workers": len(self.hosts), "tasks": sum(len(t) for t in self.running.values())}

    def finish(self, count: int) -> int:
        """``count`` running tasks end successfully (the registry lists them until the next beat)."""
        done = 0
        for host in self.hosts:
            for task_id in list(self.running[host]):
                if done == count:
                    return done
                key, _pid, _at = self.running[host].pop(task_id)
                self._emit(task_id, "success", host, key=key, exit_code=0, signal=None, reason="exit code 0")
                done += 1
        return done


def fleet_main(conn: Any, *args: Any) -> None:
    """The fleet process: run each command the benchmark sends, answer with its result."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    fleet = SimFleet(*args)
    while True:
        command, params = conn.recv()
        if command == "stop":
            conn.send(None)
            return
        try:
            conn.send(("ok", getattr(fleet, command)(*params)))
        except Exception as exc:  # reported to the benchmark, which stops
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class FleetProcess:
    def __init__(self, *args: Any) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # the benchmark process holds sockets and threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=fleet_main, args=(child, *args), name="sim-fleet", daemon=True)
        self.proc.start()

    def call(self, command: str, *params: Any) -> Any:
        self.conn.send((command, params))
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"simulated fleet: {command} failed: {result}")
        return result

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("stop", ()))
            self.conn.recv()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# ---------------------------------------------------------------- AsyncQ side
def make_workload(queue: str, index: int) -> Any:
    """An ExecuteTask as the scheduler queues it: a mapped task instance, a token of a real JWT's size."""
    from airflow.executors.workloads import BundleInfo, ExecuteTask, TaskInstanceDTO

    ti = TaskInstanceDTO(id=uuid.uuid4(), task_id="work", dag_id="bench_executor_scale",
                         run_id="manual__2026-12-01T00:00:00+00:00", try_number=1, dag_version_id=uuid.uuid4(),
                         map_index=index, pool_slots=1, priority_weight=1, queue=queue,
                         external_executor_id=str(uuid.uuid4()))
    token = f"eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.{os.urandom(150).hex()}.{os.urandom(43).hex()}"
    return ExecuteTask(ti=ti, dag_rel_path=Path("bench_executor_scale.py"), token=token,
                       log_path=f"dag_id=bench_executor_scale/run_id=manual__2026-12-01T00:00:00+00:00/"
                                f"task_id=work/map_index={index}/attempt=1.log",
                       bundle_info=BundleInfo(name="dags-folder"))


class AsyncQRun:
    """One executor, key prefix, queue and fleet: one repeat at one count."""

    def __init__(self, count: int, per_worker: int, counter: RoundTrips) -> None:
        from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor

        self.count = count
        self.counter = counter
        self.prefix = f"{os.environ['AIRFLOW__ASYNCQ__KEY_PREFIX']}-{uuid.uuid4().hex[:8]}"
        self.queue = f"{self.prefix}-q"
        os.environ["AIRFLOW__ASYNCQ__KEY_PREFIX"], base = self.prefix, os.environ["AIRFLOW__ASYNCQ__KEY_PREFIX"]
        try:
            self.ex = AsyncQExecutor()
            self.ex.start()
        finally:
            os.environ["AIRFLOW__ASYNCQ__KEY_PREFIX"] = base
        s = self.ex.settings
        assert s is not None
        self.fleet = FleetProcess(s.broker_url, self.prefix, self.queue, per_worker, {
            "event_stream_maxlen": s.event_stream_maxlen, "state_ttl": s.state_ttl,
            "worker_lost_timeout": s.worker_lost_timeout, "lease_ms": int(s.worker_lost_timeout * 1000)})
        self.last_beat = 0.0

    # ------------------------------------------------------------ helpers
    def beat_if_due(self) -> None:
        """The fleet beats at least every worker_heartbeat_interval, between measurements."""
        assert self.ex.settings is not None
        if time.monotonic() - self.last_beat >= self.ex.settings.worker_heartbeat_interval:
            self.beat()

    def beat(self) -> None:
        self.fleet.call("beat")
        self.last_beat = time.monotonic()

    def warm_up(self) -> None:
        """One task through its whole life first, so the producer is connected and the queue declared."""
        workload = make_workload(self.queue, -1)
        self.ex.queue_workload(workload, session=None)
        self.ex._process_workloads([workload])
        assert self.fleet.call("consume_and_start") == 1
        self.fleet.call("finish", 1)
        self.drain_events()
        self.ex.get_event_buffer()
        assert not self.ex._tracked and not self.ex.running

    def publish(self, workloads: list[Any], measure: bool) -> list[dict[str, Any]]:
        samples = []
        for w in workloads:
            self.ex.queue_workload(w, session=None)
        for start in range(0, len(workloads), PUBLISH_BATCH):
            batch = workloads[start:start + PUBLISH_BATCH]
            if measure:
                with self.counter.measuring() as sample:
                    self.ex._process_workloads(batch)
                sample["size"] = len(batch)
                samples.append(sample)
            else:
                self.ex._process_workloads(batch)
        assert not self.ex.queued_tasks, "every workload must be published"
        return samples

    def drain_events(self) -> None:
        """Common syncs until the stream is read to its end (the periodic steps are not made due)."""
        while self.ex._read_events():
            pass

    def start_all(self) -> None:
        started = self.fleet.call("consume_and_start")
        self.last_beat = time.monotonic()
        assert started == self.count, (started, self.count)
        self.drain_events()
        buffer = self.ex.get_event_buffer()
        assert len(buffer) == self.count and all(t.started for t in self.ex._tracked.values()), len(buffer)

    def assert_nothing_changed(self) -> None:
        buffer = self.ex.get_event_buffer()
        if buffer:
            raise RuntimeError(f"sync() reported {len(buffer)} change(s) while nothing changed, e.g. "
                               f"{next(iter(buffer.items()))}")

    # ------------------------------------------------------------ measurements
    def periodic_sync(self, inner: int) -> list[dict[str, Any]]:
        samples = []
        for _ in range(inner):
            self.beat()  # fresh registry records and leases, as a live fleet keeps them
            self.ex._next_liveness = self.ex._next_queue_check = 0.0  # as if their periods elapsed
            with self.counter.measuring() as sample:
                self.ex.sync()
            assert self.ex._next_liveness > time.monotonic(), "the periodic steps must have run"
            self.assert_nothing_changed()
            samples.append(sample)
        return samples

    def common_sync(self, inner: int) -> list[dict[str, Any]]:
        samples = []
        for _ in range(inner):
            self.ensure_not_periodic()
            with self.counter.measuring() as sample:
                self.ex.sync()
            self.assert_nothing_changed()
            samples.append(sample)
        return samples

    def ensure_not_periodic(self) -> None:
        """If the periodic steps could fall due within the next second, run them (unmeasured) now."""
        now = time.monotonic() + 1.0
        if now >= self.ex._next_liveness or now >= self.ex._next_queue_check:
            self.open_window()

    def open_window(self) -> None:
        """Run the periodic steps (unmeasured), so the next LIVENESS_EVERY seconds have none."""
        self.beat()
        self.ex._next_liveness = self.ex._next_queue_check = 0.0
        self.ex.sync()
        self.assert_nothing_changed()

    def outcomes(self, how_many: int) -> dict[str, Any]:
        self.open_window()
        assert self.fleet.call("finish", how_many) == how_many
        assert time.monotonic() < min(self.ex._next_liveness, self.ex._next_queue_check), \
            "the fleet took the whole window; the outcome sync would be a periodic one"
        with self.counter.measuring() as sample:
            self.ex.sync()
        buffer = self.ex.get_event_buffer()
        assert len(buffer) == how_many and {state for state, _ in buffer.values()} == {"success"}, \
            (len(buffer), {state for state, _ in buffer.values()})
        sample["size"] = how_many
        return sample

    def close(self) -> None:
        import redis

        self.fleet.stop()
        with contextlib.suppress(Exception):
            self.ex.end()
        client = redis.Redis.from_url(os.environ["AIRFLOW__ASYNCQ__BROKER_URL"])
        names = [self.queue, *(f"{self.queue}{KOMBU_SEP}{step}" for step in range(1, 10)),
                 f"_kombu.binding.{self.queue}", f"_kombu.binding_permanent.{self.queue}"]
        client.delete(*names)
        batch = list(client.scan_iter(match=f"{self.prefix}:*", count=5000))
        for start in range(0, len(batch), 5000):
            client.delete(*batch[start:start + 5000])
        client.close()


def traced_now() -> int:
    import tracemalloc

    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def asyncq_speed(count: int, per_worker: int, inner: int, counter: RoundTrips) -> dict[str, Any]:
    import psutil

    run = AsyncQRun(count, per_worker, counter)
    try:
        run.warm_up()
        rss_before = psutil.Process().memory_info().rss
        workloads = [make_workload(run.queue, i) for i in range(count)]
        publish = run.publish(workloads, measure=True)
        del workloads
        run.ex.get_event_buffer()
        run.start_all()
        rss_started = psutil.Process().memory_info().rss
        periodic = run.periodic_sync(inner)
        common = run.common_sync(inner)
        run.beat_if_due()
        outcomes = run.outcomes(min(OUTCOMES, count))
        workers = run.fleet.call("beat")["workers"]
        return {"publish": publish, "periodic_sync": periodic, "common_sync": common, "outcomes": outcomes,
                "workers": workers, "rss_delta_started_mib": round((rss_started - rss_before) / MIB, 2)}
    finally:
        run.close()


def asyncq_memory(count: int, per_worker: int, counter: RoundTrips) -> dict[str, float]:
    """Bytes the executor holds for ``count`` tracked tasks, published and then started (tracemalloc)."""
    import tracemalloc

    run = AsyncQRun(count, per_worker, counter)
    try:
        run.warm_up()
        tracemalloc.start()
        try:
            base = traced_now()
            run.publish([make_workload(run.queue, i) for i in range(count)], measure=False)
            run.ex.get_event_buffer()  # the scheduler drains it every loop
            published = traced_now() - base
            run.start_all()
            started = traced_now() - base
        finally:
            tracemalloc.stop()
        return {"published_mib": round(published / MIB, 2), "started_mib": round(started / MIB, 2)}
    finally:
        run.close()


def asyncq_side(args: argparse.Namespace) -> dict[str, Any]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ.setdefault("AIRFLOW__ASYNCQ__BROKER_URL", URL)
    os.environ.setdefault("AIRFLOW__ASYNCQ__KEY_PREFIX", f"bench-scale-{uuid.uuid4().hex[:8]}")
    # sync() of an idle scheduler's only executor waits up to event_wait for the next outcome, in place
    # of the scheduler's idle sleep; what is measured here is the cost of the sync itself.
    os.environ.setdefault("AIRFLOW__ASYNCQ__EVENT_WAIT", "0")
    counter = RoundTrips()
    counter.install()
    results: dict[str, Any] = {}
    for count in args.counts:
        runs, memory = [], []
        for repeat in range(1, args.repeats + 1):
            log(f"AsyncQ: {count} tasks, repeat {repeat}/{args.repeats}")
            runs.append(asyncq_speed(count, args.per_worker, args.inner, counter))
            memory.append(asyncq_memory(count, args.per_worker, counter))
            log(f"  common sync {summarize(runs[-1]['common_sync'])['ms']} ms, periodic "
                f"{summarize(runs[-1]['periodic_sync'])['ms']} ms, outcomes "
                f"{runs[-1]['outcomes']['seconds'] * 1000:.1f} ms, memory {memory[-1]}")
        results[str(count)] = summarize_asyncq(count, runs, memory)
    return results


def summarize_asyncq(count: int, runs: list[dict[str, Any]], memory: list[dict[str, float]]) -> dict[str, Any]:
    full = [s for r in runs for s in r["publish"] if s["size"] == min(PUBLISH_BATCH, count)]
    per_repeat = {
        name: [summarize(r[name]) for r in runs] for name in ("common_sync", "periodic_sync")
    }
    out: dict[str, Any] = {"workers": runs[0]["workers"]}
    for name, rows in per_repeat.items():
        out[name] = {
            "ms": median([row["ms"] for row in rows]),
            "cpu_ms": median([row["cpu_ms"] for row in rows]),
            "round_trips": median([row["round_trips"] for row in rows]),
            "commands": median([row["commands"] for row in rows]),
            "by_command": rows[len(rows) // 2]["by_command"],
            "per_repeat_ms": [row["ms"] for row in rows],
        }
    out["publish"] = {**summarize(full), "size": min(PUBLISH_BATCH, count),
                      "per_call_ms": [round(s["seconds"] * 1000, 1) for s in full]}
    out["outcomes"] = {**summarize([r["outcomes"] for r in runs]), "size": min(OUTCOMES, count)}
    scale = 10_000 / count
    out["memory"] = {
        "published_mib": median([m["published_mib"] for m in memory]),
        "started_mib": median([m["started_mib"] for m in memory]),
        "published_mib_per_10k": round(median([m["published_mib"] for m in memory]) * scale, 2),
        "started_mib_per_10k": round(median([m["started_mib"] for m in memory]) * scale, 2),
        "rss_delta_started_mib": median([r["rss_delta_started_mib"] for r in runs]),
    }
    return out


# ---------------------------------------------------------------- Celery side (runs in .venv-celery)
def celery_env(prefix: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHONPATH"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR",
        "AIRFLOW__CELERY__BROKER_URL": URL,
        "AIRFLOW__CELERY__RESULT_BACKEND": URL,
        "AIRFLOW__CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": f"{prefix}:",
    })
    return env


def celery_side(args: argparse.Namespace) -> dict[str, Any]:
    script = CELERY_VENV / "bin" / "python"
    subprocess.run(["bash", str(REPO / "bench" / "setup_celery_venv.sh")], check=True,
                   stdout=sys.stderr)
    prefix = f"bench-scale-celery-{uuid.uuid4().hex[:8]}"
    home = Path("/tmp/asyncq-bench-executor-scale") / prefix
    home.mkdir(parents=True, exist_ok=True)
    cmd = [str(script), str(Path(__file__).resolve()), "--celery-child", "--counts",
           ",".join(map(str, args.counts)), "--repeats", str(args.repeats), "--inner", str(args.inner)]
    if args.site:
        cmd += ["--site", str(args.site.resolve())]
    proc = subprocess.run(cmd, env=celery_env(prefix, home), stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the CeleryExecutor child failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def celery_child(args: argparse.Namespace) -> int:
    """In .venv-celery: CeleryExecutor.sync() over N tasks whose Redis results say STARTED."""
    import tracemalloc

    import redis
    from airflow.models.taskinstancekey import TaskInstanceKey
    from airflow.providers.celery.executors.celery_executor import CeleryExecutor
    from celery.result import AsyncResult

    counter = RoundTrips()
    counter.install()
    ex = CeleryExecutor()
    ex.start()
    app = ex.celery_app
    backend = app.backend
    prefix = os.environ["AIRFLOW__CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX"]
    assert backend.get_key_for_task("x").decode().startswith(prefix), "results must live under our prefix"
    results: dict[str, Any] = {}

    def track(count: int) -> list[str]:
        ids = []
        for i in range(count):
            task_id = str(uuid.uuid4())
            key = TaskInstanceKey("bench_executor_scale", "work", "manual__1", 1, i)
            ex.workloads[key] = AsyncResult(task_id, app=app)  # what apply_async returns
            ex.running.add(key)
            ids.append(task_id)
        return ids

    try:
        for count in args.counts:
            syncs, outcomes, memory = [], [], []
            for repeat in range(1, args.repeats + 1):
                log(f"Celery: {count} tasks, repeat {repeat}/{args.repeats}")
                ids = track(count)
                for n, task_id in enumerate(ids):  # a worker with task_track_started writes this
                    backend.store_result(task_id, {"pid": 10_000 + n, "hostname": "celery@sim"}, "STARTED")
                samples = []
                for _ in range(args.inner):
                    with counter.measuring() as sample:
                        ex.sync()
                    assert not ex.get_event_buffer(), "nothing changed"
                    samples.append(sample)
                syncs.append(summarize(samples))
                finished = ids[:min(OUTCOMES, count)]
                for task_id in finished:
                    backend.store_result(task_id, None, "SUCCESS")
                with counter.measuring() as sample:
                    ex.sync()
                buffer = ex.get_event_buffer()
                assert len(buffer) == len(finished), len(buffer)
                outcomes.append(sample)
                ex.workloads.clear()
                ex.running.clear()
                tracemalloc.start()
                base = traced_now()
                track(count)
                memory.append((traced_now() - base) / MIB)
                tracemalloc.stop()
                ex.workloads.clear()
                ex.running.clear()
                client = redis.Redis.from_url(URL)
                for start in range(0, len(ids), 5000):
                    client.delete(*[backend.get_key_for_task(t) for t in ids[start:start + 5000]])
                client.close()
            results[str(count)] = {
                "sync": {"ms": median([s["ms"] for s in syncs]),
                         "cpu_ms": median([s["cpu_ms"] for s in syncs]),
                         "round_trips": median([s["round_trips"] for s in syncs]),
                         "commands": median([s["commands"] for s in syncs]),
                         "by_command": syncs[len(syncs) // 2]["by_command"],
                         "per_repeat_ms": [s["ms"] for s in syncs]},
                "outcomes": {**summarize(outcomes), "size": min(OUTCOMES, count)},
                "memory": {"tracked_mib": round(median(memory), 2),
                           "tracked_mib_per_10k": round(median(memory) * 10_000 / count, 2)},
            }
    finally:
        client = redis.Redis.from_url(URL)
        leftovers = list(client.scan_iter(match=f"{prefix}*", count=5000))
        if leftovers:
            client.delete(*leftovers)
        client.close()
    import importlib.metadata as md

    results["versions"] = {p: md.version(p) for p in ("apache-airflow", "apache-airflow-providers-celery",
                                                      "celery", "kombu", "redis")}
    results["versions"]["hiredis"] = hiredis_available()
    print(json.dumps(results))
    return 0


# ---------------------------------------------------------------- report
def verdict(metric: str, value: float | None) -> str:
    limit = TARGETS[metric][0]
    if value is None:
        return "not measured"
    return "met" if value <= limit else "MISSED"


def table(report: dict[str, Any]) -> str:
    counts = report["meta"]["counts"]
    ours, theirs = report.get("asyncq", {}), report.get("celery", {})

    def cell(side: dict[str, Any], count: int, *path: str) -> str:
        value: Any = side.get(str(count))
        for part in path:
            value = None if value is None else value.get(part)
        if value is None:
            return "-"
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return f"{int(value):,}"
        return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"

    rows: list[tuple[str, str, Callable[[int], str]]] = [
        ("AsyncQ common sync: round trips", "<= 2 @10k", lambda c: cell(ours, c, "common_sync", "round_trips")),
        ("AsyncQ common sync: ms", "<= 2 @10k", lambda c: cell(ours, c, "common_sync", "ms")),
        ("AsyncQ periodic sync: round trips", "", lambda c: cell(ours, c, "periodic_sync", "round_trips")),
        ("AsyncQ periodic sync: commands", "", lambda c: cell(ours, c, "periodic_sync", "commands")),
        ("AsyncQ periodic sync: ms", "", lambda c: cell(ours, c, "periodic_sync", "ms")),
        ("Celery sync: round trips", "", lambda c: cell(theirs, c, "sync", "round_trips")),
        ("Celery sync: ms", "", lambda c: cell(theirs, c, "sync", "ms")),
        ("AsyncQ min(N,1000) outcomes, one sync: ms", "<= 50 @1k", lambda c: cell(ours, c, "outcomes", "ms")),
        ("Celery min(N,1000) outcomes, one sync: ms", "", lambda c: cell(theirs, c, "outcomes", "ms")),
        ("AsyncQ publish min(N,1000), one call: ms", "<= 100 @1k", lambda c: cell(ours, c, "publish", "ms")),
        ("AsyncQ publish: round trips", "", lambda c: cell(ours, c, "publish", "round_trips")),
        ("AsyncQ memory, started, per 10k: MiB", "<= 20", lambda c: cell(ours, c, "memory", "started_mib_per_10k")),
        ("AsyncQ memory, published, per 10k: MiB", "", lambda c: cell(ours, c, "memory", "published_mib_per_10k")),
        ("Celery memory, tracked, per 10k: MiB", "", lambda c: cell(theirs, c, "memory", "tracked_mib_per_10k")),
        ("simulated workers", "", lambda c: cell(ours, c, "workers")),
    ]
    header = ["metric (median of repeats)", "target", *[f"N={c:,}" for c in counts]]
    lines = [header, *[[title, target, *[fn(c) for c in counts]] for title, target, fn in rows]]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(row))
           for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    for target in report.get("targets", []):
        out.append(f"target {target['metric']} <= {target['at_most']:g}{target['unit']} at N={target['count']:,}: "
                   f"{target['value']} -> {target['verdict']}")
    return "\n".join(out)


def targets(asyncq: dict[str, Any]) -> list[dict[str, Any]]:
    paths = {"common_sync_round_trips": ("common_sync", "round_trips"), "common_sync_ms": ("common_sync", "ms"),
             "outcomes_ms": ("outcomes", "ms"), "publish_ms": ("publish", "ms"),
             "memory_started_mib_per_10k": ("memory", "started_mib_per_10k")}
    out = []
    for metric, (limit, count, unit) in TARGETS.items():
        section, field = paths[metric]
        value = asyncq.get(str(count), {}).get(section, {}).get(field)
        out.append({"metric": metric, "at_most": limit, "unit": unit, "count": count, "value": value,
                    "verdict": verdict(metric, value)})
    return out


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="100,1000,10000", help="tracked tasks per run (default 100,1000,10000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per count (default 5)")
    parser.add_argument("--inner", type=int, default=5,
                        help="sync() calls measured per run and kind; a run's figure is their median (default 5)")
    parser.add_argument("--per-worker", type=int, default=50, help="tasks per simulated worker (default 50)")
    parser.add_argument("--executors", default="asyncq,celery", help="asyncq, celery or both (default both)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "executor_scale.json")
    parser.add_argument("--site", type=Path, metavar="DIR",
                        help="put DIR first on the path of every process of the benchmark (side experiments, "
                        "e.g. a `pip install --target DIR hiredis`; the figures in docs/BENCHMARKS.md say when)")
    parser.add_argument("--celery-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.counts = [int(c) for c in args.counts.split(",") if c.strip()]
    args.names = [n.strip() for n in args.executors.split(",") if n.strip()]
    if not args.counts or min(args.counts) < 1 or args.repeats < 1 or args.inner < 1 or args.per_worker < 1:
        parser.error("--counts, --repeats, --inner and --per-worker must be positive")
    if set(args.names) - {"asyncq", "celery"}:
        parser.error("--executors takes asyncq, celery or both")
    return args


def hiredis_available() -> bool:
    import redis.utils

    return bool(redis.utils.HIREDIS_AVAILABLE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.site:
        sys.path.insert(0, str(args.site.resolve()))
    if args.celery_child:
        return celery_child(args)
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "ERROR")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench.run import machine

    started = time.monotonic()
    report: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "bench/executor_scale.py", *(argv or sys.argv[1:])]),
        "code": {"commit": git("rev-parse", "HEAD"),
                 "working_tree_changes": git("status", "--porcelain", "--", "airflow_asyncq_provider")},
        "machine": {**machine(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "counts": args.counts, "repeats": args.repeats, "inner": args.inner, "per_worker": args.per_worker,
        "publish_batch": PUBLISH_BATCH, "outcomes": OUTCOMES,
        "site": str(args.site) if args.site else None, "hiredis": hiredis_available(),
    }}
    if "asyncq" in args.names:
        report["asyncq"] = asyncq_side(args)
        report["targets"] = targets(report["asyncq"])
    if "celery" in args.names:
        report["celery"] = celery_side(args)
        report["meta"]["celery_versions"] = report["celery"].pop("versions")
    report["meta"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    log(f"raw results in {args.out}; took {report['meta']['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
