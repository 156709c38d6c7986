"""Benchmark of the chunked operators (issue "Chunked, memory-aware operators"), three questions:

1. Peak RSS of a chunk task on a small and a 4x larger CSV: equal within 10 %? (``chunk``: one mapped
   chunk task after planning; ``stream``: ``ChunkedFileOperator`` over the whole file)
2. Throughput of the streaming operator against one plain ``pandas.read_csv`` pass (target >= 0.7x).
3. Wall time of the fan-out on a real deployment with 2 workers against 1 (concurrency 1 each).

    .venv/bin/python bench/chunked/run.py [--sizes 1024,4096] [--repeats 3] [--fanout-repeats 3]
                                          [--skip rss,throughput,fanout]

Each measured pass runs in a fresh process (bench/chunked/task.py) and is repeated; runs of different
configurations are interleaved so slow drifts of this shared machine hit them alike; medians are
reported. Data: the sales CSV of the asyncq_chunked_csv_etl example (pyarrow-written, strings quoted,
quoted multi-line notes), generated once under /tmp/asyncq-bench-chunked. Raw results go to
bench/chunked/results/latest.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devtools.stack import Stack  # noqa: E402

DATA = Path("/tmp/asyncq-bench-chunked")
RESULTS = REPO / "bench" / "chunked" / "results" / "latest.json"
DAGS = REPO / "bench" / "chunked" / "dags"
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"
REDIS_DB = 14
MIB = 1024**2


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def sales_csv(size_mib: int) -> Path:
    from airflow_asyncq_provider.example_dags.asyncq_chunked_csv_etl import generate_sales_csv

    path = DATA / f"sales-{size_mib}MiB.csv"
    if not path.exists() or path.stat().st_size < size_mib * MIB:
        log(f"generating {path}")
        generate_sales_csv(str(path), size_mib * MIB)
    return path


def warm(path: Path) -> None:
    """Read the file once so every measured pass starts from the page cache."""
    with open(path, "rb") as fh:
        while fh.read(16 * MIB):
            pass


def measure(mode: str, path: Path, budget: str = "512MiB") -> dict[str, Any]:
    command = [sys.executable, str(REPO / "bench" / "chunked" / "task.py"), mode, str(path), budget]
    out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} on {path} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"  {mode:6} {path.name}: {result['seconds']:.1f} s ({result['cpu_seconds']:.1f} s CPU), "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    return result


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# ------------------------------------------------------------------ 1 and 2: single process
def bench_rss(paths: list[Path], repeats: int, stream_big_repeats: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for i in range(repeats):
        for path in paths:
            runs.setdefault(f"chunk:{path.name}", []).append(measure("chunk", path))
        for path in paths:
            if path is paths[0] or i < stream_big_repeats:
                runs.setdefault(f"stream:{path.name}", []).append(measure("stream", path))
    return runs


def bench_throughput(path: Path, repeats: int) -> dict[str, Any]:
    """Interleaved (pandas, streaming, pandas, …) so that load from elsewhere hits both alike."""
    runs: dict[str, list[dict[str, Any]]] = {"pandas": [], "stream": []}
    for _ in range(repeats):
        runs["pandas"].append(measure("pandas", path))
        runs["stream"].append(measure("stream", path))
    return runs


# ------------------------------------------------------------------ 3: fan-out on the fleet
def _psql(sql: str) -> None:
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", sql], check=True, capture_output=True)


def concurrency(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def ts(value: str) -> float:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def bench_fanout(path: Path, chunks: int, repeats: int, home: Path) -> dict[str, Any]:
    db = "asyncq_bench_chunked"
    _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    _psql(f"CREATE DATABASE {db}")
    subprocess.run(["redis-cli", "-n", str(REDIS_DB), "FLUSHDB"], check=True, capture_output=True)
    stack = Stack(
        home,
        sql_conn=PG.format(db=db),
        broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
        key_prefix=f"bench-{uuid.uuid4().hex[:6]}",
        dags_folder=DAGS,
    )
    runs: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
    try:
        stack.migrate()
        stack.start_core()
        stack.start_worker("w-a", concurrency=1, serve_logs=True)
        stack.wait_api()
        stack.wait_dag("asyncq_bench_chunked")
        order = ["1", "2"] * repeats
        for n, workers in enumerate(order):
            if workers == "2" and "w-b" not in stack.procs:
                stack.start_worker("w-b", concurrency=1, serve_logs=False)
                time.sleep(8)  # let it register and start consuming
            if workers == "1" and "w-b" in stack.procs:
                stack.kill("w-b", 15)
            run_id = stack.trigger(
                "asyncq_bench_chunked",
                conf={"path": str(path), "chunks": chunks},
                run_id=f"bench_{n}_{workers}w",
            )
            state = stack.wait_run("asyncq_bench_chunked", run_id, timeout=1200)
            run = stack.api("GET", f"/api/v2/dags/asyncq_bench_chunked/dagRuns/{run_id}")
            tis = stack.task_instances("asyncq_bench_chunked", run_id)
            process = [(ts(t["start_date"]), ts(t["end_date"])) for t in tis if t["task_id"] == "agg.process"]
            result = {
                "state": state,
                "run_s": round(ts(run["end_date"]) - ts(run["start_date"]), 2),
                "process_phase_s": round(max(e for _, e in process) - min(s for s, _ in process), 2),
                "chunk_task_s": round(statistics.median(e - s for s, e in process), 2),
                "chunks": len(process),
                "max_concurrent": concurrency(process),
            }
            runs[workers].append(result)
            log(f"  fan-out with {workers} worker(s): {result}")
    finally:
        stack.stop()
        _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1024,4096", help="CSV sizes in MiB, small first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--stream-big-repeats",
        type=int,
        default=1,
        help="streaming passes over the large file (each is long)",
    )
    parser.add_argument("--fanout-size", type=int, default=1024)
    parser.add_argument("--fanout-chunks", type=int, default=8)
    parser.add_argument("--fanout-repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma list of rss, throughput, fanout")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    DATA.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    paths = [sales_csv(s) for s in sizes]
    # phases skipped this time keep their results from the previous report
    report: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    report["when"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                         "python": platform.python_version()}
    report.setdefault("files", {}).update({p.name: p.stat().st_size for p in paths})

    def save() -> None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=1))

    if "rss" not in skip:
        log("peak RSS: one chunk task, and the streaming operator, per file size")
        for path in paths:
            warm(path)
        report["rss"] = bench_rss(paths, args.repeats, args.stream_big_repeats)
        save()
    if "throughput" not in skip:
        log(f"throughput: plain pandas against the streaming operator on {paths[0].name}")
        warm(paths[0])
        report["throughput"] = bench_throughput(paths[0], args.repeats)
        save()
    if "fanout" not in skip:
        fan_path = sales_csv(args.fanout_size)
        warm(fan_path)
        log(f"fan-out: {fan_path.name} in {args.fanout_chunks} chunks, 1 worker against 2 (concurrency 1)")
        home = DATA / f"airflow-home-{os.getpid()}"
        report["fanout"] = bench_fanout(fan_path, args.fanout_chunks, args.fanout_repeats, home)
        save()
    log(f"wrote {RESULTS}")
    print(summary(report, paths))


def summary(report: dict[str, Any], paths: list[Path]) -> str:
    lines = []
    rss = report.get("rss", {})
    if rss:
        small, big = paths[0].name, paths[-1].name
        for mode in ("chunk", "stream"):
            a, b = rss.get(f"{mode}:{small}"), rss.get(f"{mode}:{big}")
            if a and b:
                ra, rb = median(a, "peak_rss_mib"), median(b, "peak_rss_mib")
                lines.append(
                    f"{mode}: peak RSS {small} {ra:.0f} MiB, {big} {rb:.0f} MiB, "
                    f"ratio {rb / ra:.3f} (runs {len(a)}/{len(b)})"
                )
    tp = report.get("throughput", {})
    if tp.get("pandas") and tp.get("stream"):
        p, s = median(tp["pandas"], "seconds"), median(tp["stream"], "seconds")
        lines.append(
            f"throughput: pandas {p:.1f} s, streaming {s:.1f} s, streaming/pandas throughput "
            f"{p / s:.2f}x; peak RSS pandas {median(tp['pandas'], 'peak_rss_mib'):.0f} MiB, "
            f"streaming {median(tp['stream'], 'peak_rss_mib'):.0f} MiB"
        )
        if all("cpu_seconds" in r for r in tp["pandas"] + tp["stream"]):
            pc, sc = median(tp["pandas"], "cpu_seconds"), median(tp["stream"], "cpu_seconds")
            lines.append(f"throughput by CPU time: pandas {pc:.1f} s, streaming {sc:.1f} s, {pc / sc:.2f}x")
    fan = report.get("fanout", {})
    if fan.get("1") and fan.get("2"):
        one, two = median(fan["1"], "process_phase_s"), median(fan["2"], "process_phase_s")
        r1, r2 = median(fan["1"], "run_s"), median(fan["2"], "run_s")
        lines.append(
            f"fan-out: process phase 1 worker {one:.1f} s, 2 workers {two:.1f} s, speed-up "
            f"{one / two:.2f}x; whole run {r1:.1f} s vs {r2:.1f} s ({r1 / r2:.2f}x)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
