"""CPU seconds per task, per component: AsyncQExecutor vs CeleryExecutor vs LocalExecutor.

    .venv/bin/python -m bench.cpu.run [--n 100] [--repeats 3] [--executors asyncq,celery,local]
                                      [--parallelism 8] [--concurrency 8] [--local-parallelism P]

Each run starts a fresh deployment as ``bench/run.py`` does (same databases, Redis DBs and venvs),
runs a one-task warm-up DAG, measures every component's CPU over an idle window, then triggers
``asyncq_bench`` (N mapped no-op tasks) and measures every component's CPU from the trigger until
the run has ended and the worker has no task left. The idle rate times the run's duration is
subtracted, and the rest is divided by N. Runs are interleaved (A, C, L, A, C, L, ...). Raw results
go to ``bench/results/cpu.json``; docs/BENCHMARKS.md ("CPU per task, per component") has the method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import redis  # noqa: E402

from bench import measure  # noqa: E402
from bench.cpu import attribute, procfs  # noqa: E402
from bench.cpu.exits import ExitListener  # noqa: E402
from bench.cpu.report import (  # noqa: E402
    ROLE_ROWS,
    checks,
    comparison_table,
    executor_table,
    ms,
    per_task,
    summarize,
)
from bench.cpu.tracker import Window, all_ticks, subtree_ticks  # noqa: E402
from bench.run import (  # noqa: E402
    add_run_options,
    ensure_celery_venv,
    export_code,
    flush_redis,
    git,
    kill_strays,
    log,
    machine,
    parallelism_of,
    recreate_database,
    reset_runs,
    resolve_run_options,
    versions,
)
from bench.stacks import EXECUTORS, WORKER, BenchStack, ExecutorSpec  # noqa: E402

DAG_ID = "asyncq_bench"
WARMUP_DAG_ID = (
    "asyncq_bench_sleep"  # with ASYNCQ_BENCH_SLEEPERS=1 and ASYNCQ_BENCH_SLEEP_S=0: one no-op task
)
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer", WORKER)
FORKSERVER_READY = re.compile(rb"asyncq fork server ready pid=(\d+)")
# Task processes (Airflow's task runner) and AsyncQ's supervisors retitle themselves so while they run a
# task; LocalExecutor's long-lived workers ("airflow worker -- LocalExecutor: ...") and AsyncQ's idle
# supervisor hosts ("airflow asyncq supervisor host: idle") are not counted.
TASK_TITLE = re.compile(r"^airflow worker -- (?!LocalExecutor)|^airflow asyncq supervisor:")


# ---------------------------------------------------------------- the deployment's outside processes
def postgres_pids(database: str) -> tuple[int, set[int]]:
    """The postmaster's pid and the pids pg_stat_activity lists for ``database``."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (mine,) = cur.fetchone()
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))
            backends = {pid for (pid,) in cur.fetchall()}
    finally:
        conn.close()
    stat = procfs.read_stat(mine)
    if stat is None:
        raise RuntimeError(
            "could not read the PostgreSQL backend's /proc entry (is PostgreSQL on this host?)"
        )
    return stat.ppid, backends


def redis_pid(spec: ExecutorSpec) -> int:
    client = redis.Redis(host="127.0.0.1", port=6379, db=spec.redis_db)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def forkserver_pid(stack: BenchStack) -> int | None:
    if stack.spec.name != "asyncq":
        return None
    found = FORKSERVER_READY.findall((stack.logs / f"{WORKER}.log").read_bytes())
    return int(found[-1]) if found else None


def task_processes(root: int) -> int:
    """Supervisors and task processes still alive under ``root`` (Airflow retitles both)."""
    try:
        procs = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return 0
    count = 0
    for proc in procs:
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        count += bool(TASK_TITLE.search(cmd))
    return count


def wait_quiet(root: int, timeout: float) -> float:
    """Until no supervisor or task process is left under ``root``; returns the seconds waited."""
    started = time.monotonic()
    while task_processes(root) and time.monotonic() - started < timeout:
        time.sleep(0.2)
    return time.monotonic() - started


# ---------------------------------------------------------------- one window's figures
def role_rows(by_role: dict[str, float], executor: str) -> dict[str, float]:
    """The table's worker rows: all "unattributed ..." in one, Local's root as "scheduler main"."""
    out = {key: 0.0 for key, _label in ROLE_ROWS}
    for role, ticks in by_role.items():
        key = "unattributed" if role.startswith("unattributed") else role
        out[key] = out.get(key, 0.0) + ticks
    if executor == "local":  # its root is the scheduler's main process: no consumer, no fork server
        out.pop(attribute.CONSUMER)
        out.pop(attribute.FORKSERVER)
    return {k: round(v, 2) for k, v in out.items()}


def _rounded(parts: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {k: round(v, 2) for k, v in bucket.items()} for name, bucket in parts.items()}


def window_figures(
    window: Window,
    executor: str,
    worker_root: str,
    fs_pid: int | None,
    postmaster: int,
    dump_records: bool = False,
) -> dict[str, Any]:
    """Ticks per component and per worker role, with the totals the checks need."""
    begin, end = window.begin_snapshot, window.end_snapshot
    assert begin and end
    components = {}
    for name in (*COMPONENTS, "redis"):
        if name in window.roots:
            root = window.roots[name]
            components[name] = subtree_ticks(end.processes, root) - subtree_ticks(begin.processes, root)
    pg = attribute.component_records(window, "postgres")
    components["postgres"] = sum(r.own_delta for r in pg)
    root = attribute.root_key(window, worker_root)
    roles = attribute.worker_roles(executor, window, root, fs_pid)
    parts = attribute.split(window, root, roles.__getitem__)
    sampling_only = attribute.split(window, root, roles.__getitem__, use_exits=False)
    # Everything outside the deployment: other sessions' work on a shared machine, and the kernel.
    machine_delta = {
        f: getattr(end.machine, f) - getattr(begin.machine, f)
        for f in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    }
    total = sum(machine_delta.values())
    busy = total - machine_delta["idle"] - machine_delta["iowait"] - machine_delta["steal"]
    return {
        **({"records": attribute.dump(window, roles)} if dump_records else {}),
        "duration_s": round(window.duration(), 3),
        "components_ticks": components,
        # With taskstats' exit records when the listener runs (else the same as sampling_only).
        "worker_roles_ticks": role_rows(attribute.totals(parts), executor),
        "worker_roles_parts_ticks": _rounded(parts),
        # The counters and the sampler alone: tails of processes that died between two reads are
        # "unattributed" when they cannot be told apart.
        "worker_roles_sampling_only_ticks": role_rows(attribute.totals(sampling_only), executor),
        "worker_roles_sampling_only_parts_ticks": _rounded(sampling_only),
        "worker_split_sum_ticks": round(sum(attribute.totals(parts).values()), 2),
        "taskstats": window.exits.stats() if window.exits is not None else None,
        "worker_tree_ticks_from_counters": components[worker_root],
        "postgres": {
            "backends_tracked": len(pg),
            "backends_started_inside": sum(not r.alive_at_begin for r in pg),
            "backends_ended_inside": sum(r.gone for r in pg),
            "server_ticks": subtree_ticks(end.processes, postmaster)
            - subtree_ticks(begin.processes, postmaster),
        },
        "machine_ticks": machine_delta,
        "machine_busy_ticks": busy,
        "machine_busy_pct": round(100 * busy / total, 1) if total else None,
        "all_processes_ticks": all_ticks(end.processes) - all_ticks(begin.processes),
        "harness_ticks": end.harness - begin.harness,
        # Orphans are reaped by pid 1: CPU of any process that left its component's tree ends up here
        # (with every other session's orphans on a shared machine).
        "init_reaped_ticks": (end.processes[1].reaped - begin.processes[1].reaped)
        if 1 in end.processes and 1 in begin.processes
        else None,
        "sampler": window.sampler_stats(),
        "role_inventory": attribute.role_inventory(window, roles),
    }


class RunWatch:
    """Tells when a DAG run ended by asking PostgreSQL directly, from one connection whose backend the
    windows leave out. Polling the REST API instead would add api-server (and database) CPU to the
    measured components, and more of it for the executor whose run lasts longer."""

    def __init__(self, spec: ExecutorSpec) -> None:
        import psycopg2

        self.conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=spec.database)
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (self.backend_pid,) = cur.fetchone()

    def wait(self, dag_id: str, run_id: str, timeout: float, stack: BenchStack) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stack.check_alive()
            with self.conn.cursor() as cur:
                cur.execute("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id))
                row = cur.fetchone()
            if row and row[0] in ("success", "failed"):
                return str(row[0])
            time.sleep(0.5)
        raise TimeoutError(f"run {dag_id}/{run_id} did not finish within {timeout} s")

    def close(self) -> None:
        self.conn.close()


def open_window(
    stack: BenchStack, spec: ExecutorSpec, args: argparse.Namespace, watch: RunWatch, sample: bool
) -> Window:
    postmaster, backends = postgres_pids(spec.database)
    roots = {name: proc.pid for name, proc in stack.procs.items()}
    roots["redis"] = redis_pid(spec)
    window = Window(
        roots,
        postmaster=postmaster,
        database=spec.database,
        exclude=frozenset({watch.backend_pid}),
        interval=args.interval if sample else None,
        exits=args.exits,
    )
    window.begin(extra_backends=frozenset(backends - {watch.backend_pid}))
    return window


def close_window(
    window: Window, stack: BenchStack, spec: ExecutorSpec, watch: RunWatch, dump_records: bool = False
) -> dict[str, Any]:
    window.end()
    _postmaster, backends = postgres_pids(spec.database)
    tracked = {r.key[0] for r in attribute.component_records(window, "postgres") if r.alive_at_end}
    worker_root = WORKER if WORKER in stack.procs else "scheduler"
    assert window.postmaster is not None
    figures = window_figures(
        window, spec.name, worker_root, forkserver_pid(stack), window.postmaster, dump_records
    )
    figures["postgres"]["pg_stat_activity_not_tracked"] = len(backends - tracked - {watch.backend_pid})
    live = {r.key[0] for r in window.records.values() if r.alive_at_end}
    figures["untracked_deployment_processes"] = [_describe(p) for p in stack.strays() if p.pid not in live]
    return figures


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:80]}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


# ---------------------------------------------------------------- one run
def run_once(spec: ExecutorSpec, repeat: int, args: argparse.Namespace) -> dict[str, Any]:
    home = args.home / f"{spec.name}-{repeat}"
    shutil.rmtree(home, ignore_errors=True)
    reset_runs(spec)
    flush_redis(spec)
    parallelism = parallelism_of(spec, args)
    result: dict[str, Any] = {
        "executor": spec.name,
        "repeat": repeat,
        "home": str(home),
        "parallelism": parallelism,
        "loadavg_before": _load(),
    }
    stack = BenchStack(spec, home, n=args.n, parallelism=parallelism, concurrency=args.concurrency)
    stack.env.update({"ASYNCQ_BENCH_SLEEPERS": "1", "ASYNCQ_BENCH_SLEEP_S": "0", **args.extra_env})
    started = time.monotonic()
    watch: RunWatch | None = None
    try:
        stack.start_core()
        stack.start_bench_workers()
        stack.wait_ready(args.ready_timeout)
        result["startup_s"] = round(time.monotonic() - started, 1)
        worker_root = stack.memory_root()
        watch = RunWatch(spec)
        if args.warmup:
            stack.wait_dag(WARMUP_DAG_ID, args.ready_timeout)
            window = open_window(stack, spec, args, watch, sample=False)
            run_id = f"warmup-{spec.name}-{repeat}-{int(time.time())}"
            stack.trigger(WARMUP_DAG_ID, run_id=run_id)
            state = watch.wait(WARMUP_DAG_ID, run_id, args.run_timeout, stack)
            wait_quiet(worker_root, 30)
            warm = close_window(window, stack, spec, watch)
            result["warmup"] = {
                "state": state,
                "duration_s": warm["duration_s"],
                "components_s": _seconds(warm["components_ticks"]),
            }
        time.sleep(args.settle)
        result["loadavg_at_idle"] = _load()
        window = open_window(stack, spec, args, watch, sample=True)
        time.sleep(args.idle)
        result["idle"] = close_window(window, stack, spec, watch)
        result["loadavg_at_trigger"] = _load()
        window = open_window(stack, spec, args, watch, sample=True)
        window_started = time.time()
        run_id = f"cpu-{spec.name}-{repeat}-{int(time.time())}"
        stack.trigger(DAG_ID, run_id=run_id)
        watch.wait(DAG_ID, run_id, args.run_timeout, stack)
        result["quiet_wait_s"] = round(wait_quiet(worker_root, 30), 2)
        result["run"] = close_window(window, stack, spec, watch, args.dump_records)
        result["run_window_epoch_s"] = [round(window_started, 3), round(time.time(), 3)]
        result["loadavg_after"] = _load()
        dag_run = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
        tis = stack.task_instances(DAG_ID, run_id)
        figures = measure.run_figures(dag_run, tis)
        result.update(
            {k: figures[k] for k in ("state", "wall_s", "ti_states", "max_running", "max_in_flight")}
        )
        result["per_task_s"] = per_task(result, args.n)
        result["checks"] = checks(result)
        result["ok"] = dag_run.get("state") == "success" and result["ti_states"] == {"success": args.n}
        if not result["ok"]:
            result["error"] = f"run state {dag_run.get('state')}, task states {result['ti_states']}"
    except Exception as exc:
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        if watch is not None:
            watch.close()
        stack.stop()
        result["strays"] = kill_strays(stack)
        result["total_s"] = round(time.monotonic() - started, 1)
    return result


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _seconds(ticks: dict[str, int]) -> dict[str, float]:
    return {k: round(procfs.seconds(v), 3) for k, v in ticks.items()}


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser)
    parser.add_argument(
        "--idle",
        type=float,
        default=20.0,
        help="seconds of the idle window measured before the trigger (default 20)",
    )
    parser.add_argument("--interval", type=float, default=0.1, help="sampler period in seconds (default 0.1)")
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds between the warm-up (or readiness) and the idle window (default 10)",
    )
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the one-task warm-up run, so the measured run pays one-time costs "
        "(the api-server's first Execution API request, first imports)",
    )
    parser.add_argument(
        "--no-taskstats",
        dest="taskstats",
        action="store_false",
        help="do not listen for the kernel's per-process exit records (taskstats), even "
        "where it is possible (root, CONFIG_TASKSTATS): the supervisor/task split then "
        "rests on the sampler alone",
    )
    parser.add_argument(
        "--dump-records",
        action="store_true",
        help="store every worker-tree process' counters of each run in the JSON, to check "
        "the attribution by hand",
    )
    parser.add_argument("--ready-timeout", type=float, default=240.0)
    parser.add_argument("--run-timeout", type=float, default=900.0)
    parser.add_argument(
        "--home",
        type=Path,
        default=Path("/tmp/asyncq-bench-cpu"),
        help="AIRFLOW_HOMEs and logs of every run (wiped at start)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu.json")
    parser.add_argument(
        "--code",
        metavar="REV",
        help="measure airflow_asyncq_provider as committed at REV (see bench/run.py --code)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every component (side experiments only)",
    )
    args = parser.parse_args(argv)
    try:
        args.extra_env = dict(item.split("=", 1) for item in args.env)
    except ValueError:
        parser.error("--env takes KEY=VALUE")
    if args.n < 1 or args.repeats < 1 or args.idle <= 0 or args.interval <= 0:
        parser.error("--n, --repeats, --idle and --interval must be positive")
    resolve_run_options(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    specs = [EXECUTORS[n] for n in args.names]
    if "celery" in args.names:
        ensure_celery_venv()
    marker = args.home / ".asyncq-bench-cpu"
    if args.home.exists() and any(args.home.iterdir()) and not marker.exists():
        raise SystemExit(
            f"error: --home {args.home} exists and was not made by bench/cpu/run.py; not wiping it"
        )
    shutil.rmtree(args.home, ignore_errors=True)
    args.home.mkdir(parents=True)
    marker.touch()
    code = {
        "commit_at_start": git("rev-parse", "HEAD"),
        "working_tree_changes": git("status", "--porcelain", "--", "airflow_asyncq_provider", "devtools"),
    }
    if args.code:
        code["measured"] = export_code(args.code, args.home / "src")
        args.extra_env["PYTHONPATH"] = str(args.home / "src")
    else:
        code["measured"] = "working tree"
    args.exits = None
    if args.taskstats:
        listener = ExitListener()
        if listener.start():
            args.exits = listener
            log("taskstats: listening for every process' exit record (exact CPU of short-lived processes)")
        else:
            log(f"taskstats unavailable ({listener.error}); the sampler alone splits short-lived processes")
    for spec in specs:
        log(f"preparing database {spec.database} and Redis DB {spec.redis_db} for {spec.label}")
        recreate_database(spec)
        BenchStack(
            spec,
            args.home / f"{spec.name}-migrate",
            n=args.n,
            parallelism=args.parallelism,
            concurrency=args.concurrency,
        ).migrate()
    runs: list[dict[str, Any]] = []
    for repeat in range(1, args.repeats + 1):
        for spec in specs:
            log(f"run {repeat}/{args.repeats}: {spec.label}, {args.n} mapped tasks")
            result = run_once(spec, repeat, args)
            runs.append(result)
            if result.get("ok"):
                v, c = result["per_task_s"], result["checks"]
                log(
                    f"  window {result['run']['duration_s']:.1f} s, total {ms(v['total'])} ms/task, worker "
                    f"tree {ms(v['worker tree'])} ms/task, busy {result['run']['machine_busy_pct']} %, "
                    f"(components+harness)/machine net {c['components_net_over_machine_net']}"
                )
            else:
                log(f"  FAILED: {result.get('error')} (logs in {result['home']}/logs)")
    summary = summarize(runs, args.names)
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, "-m bench.cpu.run", *(argv or sys.argv[1:])]),
            "code": {**code, "commit_at_end": git("rev-parse", "HEAD")},
            "machine": machine(),
            "clock_ticks_per_s": procfs.CLK_TCK,
            "n": args.n,
            "repeats": args.repeats,
            "parallelism": args.parallelism,
            "local_parallelism": args.local_parallelism,
            "concurrency": args.concurrency,
            "idle_s": args.idle,
            "interval_s": args.interval,
            "settle_s": args.settle,
            "warmup": args.warmup,
            "taskstats": args.exits.stats() if args.exits is not None else None,
            "extra_env": args.extra_env,
            "versions": {s.name: versions(s) for s in specs},
            "duration_s": round(time.monotonic() - started, 1),
        },
        "summary": summary,
        "runs": runs,
    }
    if args.exits is not None:
        args.exits.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    for name in args.names:
        if summary["per_executor"][name]["runs_ok"]:
            print("\n".join(executor_table(name, summary["per_executor"][name])))
            print()
    print("\n".join(comparison_table(summary, args.names)))
    log(f"raw results in {args.out}; logs in {args.home}; took {report['meta']['duration_s']:.0f} s")
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
