"""Worker memory benchmark: PSS of an AsyncQ worker tree and a CeleryExecutor worker tree, side by side.

    .venv/bin/python bench/memory/run.py [--concurrency 8,32] [--repeats 2] [--sleepers 8]

For each repeat, for each concurrency, for each executor (interleaved, so that drifts of a shared
machine hit both alike): a fresh deployment (api-server, scheduler, dag-processor, triggerer, one
worker at that concurrency) on its own PostgreSQL database and Redis DB; the worker tree's PSS when
idle; then ``asyncq_bench_sleep`` (8 mapped sleeping tasks) is triggered and the tree's PSS is sampled
again once all 8 run. PSS charges shared pages in equal parts, so the sum over a tree is what the
tree costs the machine. Raw results go to ``bench/memory/results.json``; docs/BENCHMARKS.md has the
method and figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import measure  # noqa: E402
from bench.run import (  # noqa: E402
    ensure_celery_venv,
    flush_redis,
    git,
    kill_strays,
    log,
    machine,
    recreate_database,
    reset_runs,
    versions,
)
from bench.stacks import EXECUTORS, BenchStack, ExecutorSpec  # noqa: E402

DAG_ID = "asyncq_bench_sleep"
TARGETS = {"idle": 0.25, "loaded": 0.6}  # AsyncQ / Celery, at most (the targets)
# Both executors' supervisors fork the task process, which Airflow's task runner retitles this way
# (airflow/sdk/execution_time/task_runner.py).
TASK_MARKER = "airflow worker -- "


def wait_running(stack: BenchStack, run_id: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, int] = {}
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            tis = stack.task_instances(DAG_ID, run_id)
        except (OSError, RuntimeError):
            time.sleep(1)
            continue
        states = {}
        for ti in tis:
            states[str(ti.get("state"))] = states.get(str(ti.get("state")), 0) + 1
        if states.get("running", 0) >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"{n} tasks of {run_id} were not all running within {timeout:.0f} s: {states}")


def sample(root: int) -> dict[str, Any]:
    reading = measure.idle_pss(root)
    reading["task_processes"] = sum(TASK_MARKER in p["cmd"] for p in reading["processes"])
    return reading


def run_once(spec: ExecutorSpec, concurrency: int, repeat: int, args: argparse.Namespace) -> dict[str, Any]:
    home = args.home / f"{spec.name}-c{concurrency}-{repeat}"
    shutil.rmtree(home, ignore_errors=True)
    reset_runs(spec)
    flush_redis(spec)
    result: dict[str, Any] = {"executor": spec.name, "concurrency": concurrency, "repeat": repeat,
                              "home": str(home), "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    stack = BenchStack(spec, home, n=1, parallelism=max(concurrency, args.sleepers), concurrency=concurrency)
    stack.env.update({"ASYNCQ_BENCH_SLEEPERS": str(args.sleepers), "ASYNCQ_BENCH_SLEEP_S": "600"})
    try:
        stack.start_core()
        stack.start_bench_worker()
        stack.wait_ready(args.ready_timeout)
        stack.wait_dag(DAG_ID, args.ready_timeout)
        time.sleep(args.settle)
        root = stack.memory_root()
        idle = sample(root)
        result.update(idle_pss_mib=idle["pss_mib"], idle_samples_mib=idle["samples_mib"],
                      idle_processes=idle["processes"])
        run_id = f"mem-{spec.name}-c{concurrency}-{repeat}-{int(time.time())}"
        stack.trigger(DAG_ID, run_id=run_id)
        wait_running(stack, run_id, args.sleepers, args.run_timeout)
        time.sleep(args.settle)
        loaded = sample(root)
        result.update(loaded_pss_mib=loaded["pss_mib"], loaded_samples_mib=loaded["samples_mib"],
                      loaded_processes=loaded["processes"], loaded_task_processes=loaded["task_processes"])
        # Every sleeper must be in the sampled tree, or the "loaded" figure measures something else.
        result["ok"] = loaded["task_processes"] >= args.sleepers
        if not result["ok"]:
            result["error"] = f"{loaded['task_processes']} task processes in the tree, expected {args.sleepers}"
    except Exception as exc:
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        stack.stop()
        result["strays"] = kill_strays(stack)
    return result


def summarize(runs: list[dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for c in concurrencies:
        row: dict[str, Any] = {}
        for state in ("idle", "loaded"):
            medians = {}
            for name in ("asyncq", "celery"):
                values = [r[f"{state}_pss_mib"] for r in runs
                          if r["executor"] == name and r["concurrency"] == c and r.get("ok")]
                medians[name] = round(statistics.median(values), 1) if values else None
            ratio = measure.ratio(medians["asyncq"], medians["celery"])
            row[state] = {**medians, "ratio": None if ratio is None else round(ratio, 3),
                          "target": TARGETS[state], "met": ratio is not None and ratio <= TARGETS[state]}
        summary[f"c{c}"] = row
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = ["| concurrency | state | AsyncQ tree PSS (MiB) | Celery tree PSS (MiB) | AsyncQ/Celery | target |",
             "|---:|---|---:|---:|---:|---|"]
    for key, row in summary.items():
        for state, cell in row.items():
            verdict = "met" if cell["met"] else "missed"
            lines.append(f"| {key[1:]} | {state} | {cell['asyncq']} | {cell['celery']} | {cell['ratio']} | "
                         f"<= {cell['target']} ({verdict}) |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="8,32", help="comma-separated worker concurrencies")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sleepers", type=int, default=8, help="sleeping tasks in the loaded sample")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait before each sample")
    parser.add_argument("--ready-timeout", type=float, default=240.0)
    parser.add_argument("--run-timeout", type=float, default=240.0)
    parser.add_argument("--home", type=Path, default=Path("/tmp/asyncq-bench-memory"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "memory" / "results.json")
    args = parser.parse_args(argv)
    try:
        args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency takes integers, e.g. 8,32")
    if not args.concurrencies or min(args.concurrencies) < 1 or args.repeats < 1 or args.sleepers < 1:
        parser.error("--concurrency, --repeats and --sleepers must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    specs = [EXECUTORS["asyncq"], EXECUTORS["celery"]]
    ensure_celery_venv()
    shutil.rmtree(args.home, ignore_errors=True)
    args.home.mkdir(parents=True)
    for spec in specs:
        log(f"preparing database {spec.database} and Redis DB {spec.redis_db} for {spec.label}")
        recreate_database(spec)
        BenchStack(spec, args.home / f"{spec.name}-migrate", n=1, parallelism=8, concurrency=8).migrate()
    runs = []
    for repeat in range(1, args.repeats + 1):
        for c in args.concurrencies:
            for spec in specs:
                log(f"run {repeat}/{args.repeats}: {spec.label} worker at -c {c}")
                result = run_once(spec, c, repeat, args)
                runs.append(result)
                if result["ok"]:
                    log(f"  idle {result['idle_pss_mib']} MiB, {args.sleepers} sleeping {result['loaded_pss_mib']} MiB")
                else:
                    log(f"  FAILED: {result.get('error')} (logs in {result['home']}/logs)")
    summary = summarize(runs, args.concurrencies)
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", "bench/memory/run.py", *(argv if argv is not None else sys.argv[1:])]),
            "commit": git("rev-parse", "HEAD"),
            "working_tree_changes": git("status", "--porcelain", "--", "airflow_asyncq_provider"),
            "machine": machine(),
            "sleepers": args.sleepers, "repeats": args.repeats, "settle_s": args.settle,
            "versions": {s.name: versions(s) for s in specs},
            "duration_s": round(time.monotonic() - started, 1),
        },
        "summary": summary,
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(summary))
    log(f"raw results in {args.out}; logs in {args.home}")
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
