"""Side-by-side benchmark: AsyncQExecutor vs CeleryExecutor vs LocalExecutor on one mapped DAG.

    .venv/bin/python bench/run.py [--n 100] [--repeats 3] [--executors asyncq,celery,local]
                                  [--parallelism 8] [--local-parallelism P] [--concurrency 8] [--workers 1]

Each run starts a fresh deployment (api-server, scheduler, dag-processor, triggerer and, except for
LocalExecutor, ``--workers`` workers at ``--concurrency``) on its own PostgreSQL database and Redis DB,
measures the worker trees' idle PSS, triggers ``asyncq_bench`` (N mapped no-op tasks), waits for it,
reads the run's and the task instances' timestamps over REST, and stops everything. Runs are interleaved
(A, C, L, A, C, L, ...) so that slow drifts of a shared machine hit every executor alike.
Raw results go to ``bench/results/latest.json``; see docs/BENCHMARKS.md for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import redis  # noqa: E402

from bench import measure  # noqa: E402
from bench.stacks import EXECUTORS, BenchStack, ExecutorSpec  # noqa: E402

DAG_ID = "asyncq_bench"
# (setting, ((metric, versus, at most), ...)) from the issues. The first is the headline: [core]
# parallelism twice the fleet's slots, as production runs (Local keeps its 8 processes). The second is
# the defaults, parallelism equal to the slots.
HEADLINE = {"parallelism": 16, "local_parallelism": 8, "concurrency": 8, "workers": 1}
TARGETS = (
    (HEADLINE, (("wall_s", "celery", 0.85), ("wall_s", "local", 0.9))),
    (
        {"parallelism": 8, "local_parallelism": 8, "concurrency": 8, "workers": 1},
        (("wall_s", "celery", 0.5), ("wall_s", "local", 0.8), ("idle_pss_mib", "celery", 0.25)),
    ),
)


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ---------------------------------------------------------------- preparation
def ensure_celery_venv() -> None:
    subprocess.run(["bash", str(REPO / "bench" / "setup_celery_venv.sh")], check=True)


def recreate_database(spec: ExecutorSpec) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{spec.database}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{spec.database}"')
    conn.close()


def reset_runs(spec: ExecutorSpec) -> None:
    """Forget earlier runs, so a new scheduler has nothing to adopt or re-queue from a run cut short."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=spec.database)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DELETE FROM dag_run")  # task instances go with their run (ON DELETE CASCADE)
        cur.execute("SELECT to_regclass('celery_taskmeta')")
        if cur.fetchone()[0]:
            cur.execute("DELETE FROM celery_taskmeta")
    conn.close()


def flush_redis(spec: ExecutorSpec) -> None:
    assert spec.redis_db in (10, 11, 12), "the benchmark owns Redis DBs 10-12 only"
    client = redis.Redis(host="127.0.0.1", port=6379, db=spec.redis_db)
    client.flushdb()
    client.close()


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions(spec: ExecutorSpec) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
        "('apache-airflow', 'celery', 'kombu')}))"
    )
    python = spec.airflow.with_name("python")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


# ---------------------------------------------------------------- one run
def run_once(spec: ExecutorSpec, repeat: int, args: argparse.Namespace) -> dict[str, Any]:
    home = args.home / f"{spec.name}-{repeat}"
    shutil.rmtree(home, ignore_errors=True)
    reset_runs(spec)
    flush_redis(spec)
    stack = BenchStack(
        spec,
        home,
        n=args.n,
        parallelism=parallelism_of(spec, args),
        concurrency=args.concurrency,
        workers=args.workers,
    )
    stack.env.update(args.extra_env)
    result: dict[str, Any] = {
        "executor": spec.name,
        "repeat": repeat,
        "home": str(home),
        "parallelism": parallelism_of(spec, args),
        "workers": len(stack.worker_nodes),  # 0: LocalExecutor, whose scheduler runs the tasks
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    started = time.monotonic()
    try:
        stack.start_core()
        stack.start_bench_workers()
        stack.wait_ready(args.ready_timeout)
        result["startup_s"] = round(time.monotonic() - started, 1)
        time.sleep(args.settle)
        roots = stack.memory_roots()
        result.update(idle_figures(stack, roots))
        result["scheduler_idle_pss_mib"] = measure.tree_pss(stack.procs["scheduler"].pid)["pss_mib"]
        result["loadavg_at_trigger"] = [round(x, 2) for x in os.getloadavg()]
        run_id = f"bench-{spec.name}-{repeat}-{int(time.time())}"
        triggered = time.time()
        with contextlib.ExitStack() as sampling:
            samplers = [sampling.enter_context(measure.PeakSampler(root)) for root in roots]
            stack.trigger(DAG_ID, run_id=run_id)
            stack.wait_run(DAG_ID, run_id, timeout=args.run_timeout)
        # The sum of each tree's own peak: an upper bound of the trees' peak together when K > 1.
        result["peak_pss_mib"] = round(sum(s.peak_mib for s in samplers), 1)
        result["peak_pss_per_tree_mib"] = [s.peak_mib for s in samplers]
        dag_run = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
        tis = stack.task_instances(DAG_ID, run_id)
        result.update(measure.run_figures(dag_run, tis))
        result.update(measure.supervisor_tail(str(supervisor_log(stack)), tis))
        end = measure.parse_ts(dag_run.get("end_date"))
        result["trigger_to_end_s"] = round(end.timestamp() - triggered, 3) if end else None
        result["ok"] = (
            dag_run.get("state") == "success"
            and result["ti_states"] == {"success": args.n}
            and not result["idle_supervisors"]
        )
        if not result["ok"]:
            result["error"] = (
                f"run state {dag_run.get('state')}, task states {result['ti_states']}, "
                f"{result['idle_supervisors']} task supervisor(s) in the idle worker tree"
            )
    except Exception as exc:
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        stopping = time.monotonic()
        stack.stop()
        result["strays"] = kill_strays(stack)
        result["stop_s"] = round(time.monotonic() - stopping, 1)
        result["total_s"] = round(time.monotonic() - started, 1)
    return result


def idle_figures(stack: BenchStack, roots: list[int]) -> dict[str, Any]:
    """Idle PSS of the task-running trees: with K workers, the sum of each tree's median sample."""
    idle = [measure.idle_pss(root) for root in roots]
    processes = [p for tree in idle for p in tree["processes"]]
    figures: dict[str, Any] = {
        "idle_pss_mib": round(sum(tree["pss_mib"] for tree in idle), 1),
        "idle_pss_per_tree_mib": [tree["pss_mib"] for tree in idle],
        # Each tree's samples come sorted; summed rank by rank, the middle one is idle_pss_mib.
        "idle_pss_samples_mib": [
            round(sum(rank), 1) for rank in zip(*(tree["samples_mib"] for tree in idle), strict=True)
        ],
        "idle_pss_processes": processes,
        # An "idle" tree that holds a task supervisor is running leftovers: the PSS figure is wrong.
        "idle_supervisors": sum("supervisor" in p["cmd"] for p in processes),
        "worker_tree_is": "worker" if stack.worker_nodes else "scheduler",
    }
    if not stack.worker_nodes:  # the scheduler forks `parallelism` of them at start: check it did
        figures["local_executor_processes"] = sum("LocalExecutor" in p["cmd"] for p in processes)
    return figures


def supervisor_log(stack: BenchStack) -> Path:
    """The log that has every task's "Workload finished" line; K workers' logs are joined into one."""
    logs = [stack.logs / f"{name}.log" for name in stack.task_trees()]
    if len(logs) == 1:
        return logs[0]
    joined = stack.logs / "workers-joined.log"
    joined.write_bytes(b"".join(path.read_bytes() for path in logs))
    return joined


def kill_strays(stack: BenchStack) -> list[str]:
    """Processes of this deployment that outlived Stack.stop() (they left its process groups)."""
    found = stack.strays()
    described = []
    for proc in found:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
    psutil.wait_procs(found, timeout=10)
    if described:
        log(f"  killed {len(described)} process(es) left after stop: {described}")
    return described


# ---------------------------------------------------------------- summary
def summarize(
    runs: list[dict[str, Any]], names: list[str], setting: dict[str, int] | None = None
) -> dict[str, Any]:
    """Medians per executor, AsyncQ's ratios, and the targets of ``setting`` (see TARGETS). At a setting
    no target was set for, the headline's targets are shown for reference (``applies`` false)."""
    metrics = (
        "wall_s",
        "latency_median_s",
        "latency_p95_s",
        "idle_pss_mib",
        "peak_pss_mib",
        "scheduler_idle_pss_mib",
        "trigger_to_end_s",
        "ti_runtime_median_s",
        "max_in_flight",
        "max_running",
        "supervisor_tail_median_s",
        "supervisor_tail_over_4s",
    )
    per_executor: dict[str, dict[str, Any]] = {}
    for name in names:
        good = [r for r in runs if r["executor"] == name and r.get("ok")]
        per_executor[name] = {m: measure.median([r.get(m) for r in good]) for m in metrics}
        per_executor[name]["runs_ok"] = len(good)
        per_executor[name]["runs_failed"] = sum(1 for r in runs if r["executor"] == name and not r.get("ok"))
        per_executor[name]["wall_s_all"] = [r.get("wall_s") for r in good]
    ratios: dict[str, dict[str, float | None]] = {}
    if "asyncq" in names:
        for other in names:
            if other == "asyncq":
                continue
            ratios[f"asyncq/{other}"] = {
                m: measure.ratio(per_executor["asyncq"][m], per_executor[other][m]) for m in metrics
            }
    applies, goals = targets_for(setting or TARGETS[0][0])
    targets = []
    for metric, versus, limit in goals:
        value = ratios.get(f"asyncq/{versus}", {}).get(metric)
        targets.append(
            {
                "metric": metric,
                "versus": versus,
                "at_most": limit,
                "ratio": value,
                "met": None if value is None else value <= limit,
                "applies": applies,
            }
        )
    return {"per_executor": per_executor, "ratios": ratios, "targets": targets}


def setting_of(args: argparse.Namespace) -> dict[str, int]:
    return {option: getattr(args, option) for option in HEADLINE}


def targets_for(setting: dict[str, int]) -> tuple[bool, tuple[tuple[str, str, float], ...]]:
    for target_setting, goals in TARGETS:
        if target_setting == setting:
            return True, goals
    return False, TARGETS[0][1]


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(summary: dict[str, Any], names: list[str], workers: int = 1) -> str:
    labels = [EXECUTORS[n].label for n in names]
    others = [n for n in names if n != "asyncq"] if "asyncq" in names else []
    rows = [  # (title, key, digits, show the ratio)
        ("DAG run wall time (s)", "wall_s", 1, True),
        ("trigger -> run end (s)", "trigger_to_end_s", 1, True),
        ("TI queued->start median (s)", "latency_median_s", 2, True),
        ("TI queued->start p95 (s)", "latency_p95_s", 2, True),
        ("TI start->end median (s)", "ti_runtime_median_s", 2, True),
        ("max TIs queued+running at once", "max_in_flight", 0, False),
        ("max TIs running at once", "max_running", 0, False),
        ("TI end -> supervisor exit median (s)", "supervisor_tail_median_s", 2, False),
        ("supervisors exiting > 4 s after TI end", "supervisor_tail_over_4s", 0, False),
        ("idle worker tree PSS (MiB)*", "idle_pss_mib", 0, True),
        ("peak worker tree PSS in run (MiB)*", "peak_pss_mib", 0, True),
        ("idle scheduler tree PSS (MiB)", "scheduler_idle_pss_mib", 0, True),
    ]
    header = ["metric (median of runs)", *labels, *[f"AsyncQ/{EXECUTORS[o].label}" for o in others]]
    lines = [header]
    for title, key, digits, with_ratio in rows:
        line = [title, *[fmt(summary["per_executor"][n][key], digits) for n in names]]
        line += [fmt(summary["ratios"][f"asyncq/{o}"][key], 2) if with_ratio else "" for o in others]
        lines.append(line)
    lines.append(
        [
            "runs ok / failed",
            *[
                f"{summary['per_executor'][n]['runs_ok']} / {summary['per_executor'][n]['runs_failed']}"
                for n in names
            ],
            *["" for _ in others],
        ]
    )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append(
        "* LocalExecutor has no worker: its column is the scheduler process tree, which holds "
        "its task-running processes."
    )
    if workers > 1:
        out.append(
            f"* AsyncQ and Celery: the sum over their {workers} worker trees (peak: of each tree's own peak)."
        )
    if not all(target["applies"] for target in summary["targets"]):
        setting = ", ".join(f"{option} {value}" for option, value in HEADLINE.items())
        out.append(
            f"no target is set for this run's setting; the headline's ({setting}) are shown for reference"
        )
    for target in summary["targets"]:
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[target["met"]]
        out.append(
            f"target {target['metric']} AsyncQ/{EXECUTORS[target['versus']].label} <= "
            f"{target['at_most']}: {fmt(target['ratio'], 2)} -> {verdict}"
        )
    return "\n".join(out)


# ---------------------------------------------------------------- main
def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def export_code(rev: str, dest: Path) -> str:
    """``git archive`` the provider package at ``rev`` into ``dest``; returns the full commit id."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    if not commit:
        raise SystemExit(f"error: --code {rev!r} is not a commit of {REPO}")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "airflow_asyncq_provider"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="K",
        help="worker processes of the AsyncQ and Celery deployments, each at --concurrency and with its "
        "own node name bench-w1 .. bench-wK (default 1, named bench); ignored for Local. Idle and peak "
        "PSS are summed over the K worker trees (each tree's figure is stored too)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds to wait after the stack is ready before measuring idle PSS",
    )
    parser.add_argument("--ready-timeout", type=float, default=240.0)
    parser.add_argument("--run-timeout", type=float, default=600.0)
    parser.add_argument(
        "--home",
        type=Path,
        default=Path("/tmp/asyncq-bench"),
        help="AIRFLOW_HOMEs and logs of every run (wiped at start)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--code",
        metavar="REV",
        help="measure airflow_asyncq_provider as committed at git revision REV (e.g. HEAD) instead of "
        "the working tree: it is exported under --home and put first on every component's PYTHONPATH, "
        "so edits made while the benchmark runs cannot change what it measures",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every component (side experiments only: the "
        "figures in docs/BENCHMARKS.md use none)",
    )
    args = parser.parse_args(argv)
    try:
        args.extra_env = dict(item.split("=", 1) for item in args.env)
    except ValueError:
        parser.error("--env takes KEY=VALUE")
    if args.n < 1 or args.repeats < 1 or args.workers < 1:
        parser.error("--n, --repeats and --workers must be positive")
    resolve_run_options(parser, args)
    return args


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What every run of this script and of bench/cpu/run.py is made of: N, repeats, which executors, and
    each deployment's parallelism and worker concurrency."""
    parser.add_argument("--n", type=int, default=100, help="mapped task instances per run (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per executor (default 3)")
    parser.add_argument(
        "--executors",
        default="asyncq,celery,local",
        help="comma-separated subset of asyncq,celery,local, in interleaving order",
    )
    parser.add_argument(
        "--parallelism",
        type=int,
        default=8,
        help="[core] parallelism of the AsyncQ and Celery deployments (default 8)",
    )
    parser.add_argument(
        "--local-parallelism",
        type=int,
        default=None,
        help="[core] parallelism of the Local deployment, i.e. its number of worker "
        "processes (default: --parallelism)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="-c of the AsyncQ and Celery workers (default 8)"
    )


def resolve_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.names`` from ``--executors``, and ``--local-parallelism`` defaulted to ``--parallelism``."""
    args.names = [n.strip() for n in args.executors.split(",") if n.strip()]
    unknown = sorted(set(args.names) - set(EXECUTORS))
    if unknown or not args.names:
        parser.error(f"unknown executor(s) {unknown}; choose from {', '.join(EXECUTORS)}")
    if args.local_parallelism is None:
        args.local_parallelism = args.parallelism
    if args.parallelism < 1 or args.local_parallelism < 1:
        parser.error("--parallelism and --local-parallelism must be positive")


def parallelism_of(spec: ExecutorSpec, args: argparse.Namespace) -> int:
    """``[core] parallelism`` of ``spec``'s deployment: LocalExecutor's is ``--local-parallelism``."""
    return args.local_parallelism if spec.name == "local" else args.parallelism


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    specs = [EXECUTORS[n] for n in args.names]
    if "celery" in args.names:
        ensure_celery_venv()
    marker = args.home / ".asyncq-bench"
    if args.home.exists() and any(args.home.iterdir()) and not marker.exists():
        raise SystemExit(f"error: --home {args.home} exists and was not made by bench/run.py; not wiping it")
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
        log(f"measuring airflow_asyncq_provider at {code['measured']} (exported to {args.home / 'src'})")
    else:
        code["measured"] = "working tree"
    for spec in specs:
        log(f"preparing database {spec.database} and Redis DB {spec.redis_db} for {spec.label}")
        recreate_database(spec)
        stack = BenchStack(
            spec,
            args.home / f"{spec.name}-migrate",
            n=args.n,
            parallelism=args.parallelism,
            concurrency=args.concurrency,
        )
        stack.migrate()
    runs: list[dict[str, Any]] = []
    for repeat in range(1, args.repeats + 1):
        for spec in specs:
            shape = "" if spec.name == "local" else f", {args.workers} worker(s) at -c {args.concurrency}"
            log(
                f"run {repeat}/{args.repeats}: {spec.label}, {args.n} mapped tasks, "
                f"parallelism {parallelism_of(spec, args)}{shape}"
            )
            result = run_once(spec, repeat, args)
            runs.append(result)
            if result.get("ok"):
                log(
                    f"  wall {fmt(result['wall_s'], 2)} s, queued->start median "
                    f"{fmt(result['latency_median_s'], 2)} s p95 {fmt(result['latency_p95_s'], 2)} s, "
                    f"idle PSS {fmt(result['idle_pss_mib'], 0)} MiB (startup {result['startup_s']} s)"
                )
            else:
                log(f"  FAILED: {result.get('error')} (logs in {result['home']}/logs)")
    summary = summarize(runs, args.names, setting_of(args))
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, "bench/run.py", *(argv or sys.argv[1:])]),
            "code": {**code, "commit_at_end": git("rev-parse", "HEAD")},
            "machine": machine(),
            "n": args.n,
            "repeats": args.repeats,
            "parallelism": args.parallelism,
            "local_parallelism": args.local_parallelism,
            "concurrency": args.concurrency,
            "workers": args.workers,
            "settle_s": args.settle,
            "extra_env": args.extra_env,
            "versions": {s.name: versions(s) for s in specs},
            "duration_s": round(time.monotonic() - started, 1),
        },
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(summary, args.names, args.workers))
    log(f"raw results in {args.out}; logs in {args.home}; took {report['meta']['duration_s']:.0f} s")
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
