"""What ``bench.cpu.run`` reports: CPU per task (idle subtracted), the self-consistency checks, the
medians over repeats, and the tables it prints."""

from __future__ import annotations

from typing import Any

from bench import measure
from bench.cpu import attribute, procfs
from bench.stacks import EXECUTORS, WORKER

# Rows of the tables: (key, label). Worker rows are the worker tree's roles (for Local: the scheduler
# tree's roles other than its main process, which is where LocalExecutor runs its tasks).
ROLE_ROWS = (
    (attribute.CONSUMER, "consumer (worker main process)"),
    (attribute.FORKSERVER, "fork server"),
    (attribute.SUPERVISOR, "supervisors"),
    (attribute.TASK, "task processes"),
    ("unattributed", "unattributed reaped children"),
    (attribute.OTHER, "other worker processes"),
)
LABELS = {
    "asyncq": {
        attribute.CONSUMER: "consumer (airflow asyncq worker)",
        attribute.SUPERVISOR: "supervisors (the supervisor hosts)",
        "unattributed": "unattributed reaped children of the fork server",
        attribute.OTHER: "other worker processes",
    },
    "celery": {
        attribute.CONSUMER: "consumer (celery MainProcess)",
        attribute.SUPERVISOR: "supervisors (the prefork children)",
        "unattributed": "unattributed reaped children of MainProcess",
        attribute.OTHER: "serve-logs + stale-bundle cleanup",
    },
    "local": {
        "scheduler": "scheduler (with its workers)",
        "scheduler main": "  scheduler main process",
        attribute.SUPERVISOR: "  supervisors (the LocalExecutor workers)",
        attribute.TASK: "  task processes",
        "unattributed": "  unattributed reaped children of the scheduler",
        attribute.OTHER: "  serve-logs",
    },
}


# ---------------------------------------------------------------- per task, idle subtracted
def per_task(result: dict[str, Any], n: int) -> dict[str, float]:
    """CPU seconds per task: (run ticks - idle rate x run duration) / N, for every row of the tables."""
    run, idle = result["run"], result["idle"]
    scale = run["duration_s"] / idle["duration_s"]

    def net(run_ticks: float, idle_ticks: float) -> float:
        return round(procfs.seconds(run_ticks - idle_ticks * scale) / n, 5)

    out = {}
    for name, ticks in run["components_ticks"].items():
        out[name] = net(ticks, idle["components_ticks"].get(name, 0))
    for role, ticks in run["worker_roles_ticks"].items():
        out[f"worker: {role}"] = net(ticks, idle["worker_roles_ticks"].get(role, 0))
    for role, ticks in run["worker_roles_sampling_only_ticks"].items():
        out[f"worker (sampling only): {role}"] = net(
            ticks, idle["worker_roles_sampling_only_ticks"].get(role, 0)
        )
    components = [c for c in run["components_ticks"] if c != "redis"] + ["redis"]
    out["total"] = round(sum(out[c] for c in components), 5)
    out["postgres server (all databases)"] = net(
        run["postgres"]["server_ticks"], idle["postgres"]["server_ticks"]
    )
    out["machine busy"] = net(run["machine_busy_ticks"], idle["machine_busy_ticks"])
    out["harness"] = net(run["harness_ticks"], idle["harness_ticks"])
    if result["executor"] == "local":
        # LocalExecutor's "worker" is the part of the scheduler tree outside its main process.
        out["worker tree"] = round(out["scheduler"] - out["worker: scheduler main"], 5)
        out["scheduler (main process)"] = out["worker: scheduler main"]
    else:
        out["worker tree"] = out[WORKER]
        out["scheduler (main process)"] = out["scheduler"]
    # What running one task costs below the consumer, like for like (the unattributed rest is CPU of
    # supervisors and task processes that cannot be told apart; see docs/BENCHMARKS.md).
    out["supervisors + task processes"] = round(
        sum(out.get(f"worker: {r}", 0.0) for r in (attribute.SUPERVISOR, attribute.TASK, "unattributed")), 5
    )
    return out


def checks(result: dict[str, Any]) -> dict[str, Any]:
    """Is the accounting self-consistent? Each figure compares two independent ways of counting."""
    run, idle = result["run"], result["idle"]
    scale = run["duration_s"] / idle["duration_s"]
    comps = sum(run["components_ticks"].values())
    comps_idle = sum(idle["components_ticks"].values())
    machine_net = run["machine_busy_ticks"] - idle["machine_busy_ticks"] * scale
    comps_net = comps - comps_idle * scale
    harness_net = run["harness_ticks"] - idle["harness_ticks"] * scale
    processes = run["machine_ticks"]["user"] + run["machine_ticks"]["nice"] + run["machine_ticks"]["system"]
    return {
        # 1. The roles of the worker tree add up to the tree's own counters (should be 0 but for races).
        "worker_split_minus_counters_s": procfs.seconds(
            run["worker_split_sum_ticks"] - run["worker_tree_ticks_from_counters"]
        ),
        # 2. Every process' counters, summed over the machine, against /proc/stat's process time.
        "all_processes_over_proc_stat": round(run["all_processes_ticks"] / processes, 3)
        if processes
        else None,
        # 3. The deployment's share of the whole machine during the run, raw and idle-subtracted.
        "components_s": procfs.seconds(comps),
        "machine_busy_s": procfs.seconds(run["machine_busy_ticks"]),
        "components_net_s": round(procfs.seconds(comps_net), 2),
        "harness_net_s": round(procfs.seconds(harness_net), 2),
        "machine_net_s": round(procfs.seconds(machine_net), 2),
        "components_net_over_machine_net": round((comps_net + harness_net) / machine_net, 3)
        if machine_net
        else None,
        "other_load_net_s": round(procfs.seconds(machine_net - comps_net - harness_net), 2),
        # 4. Backends pg_stat_activity listed for the database at the end that the sampler did not follow,
        # live processes with this deployment's AIRFLOW_HOME outside the component trees (only those that
        # did not retitle themselves: setproctitle overwrites /proc/<pid>/environ), and what pid 1 reaped.
        "pg_backends_not_tracked": run["postgres"]["pg_stat_activity_not_tracked"],
        "untracked_deployment_processes": len(run["untracked_deployment_processes"]),
        "init_reaped_s": procfs.seconds(run["init_reaped_ticks"] or 0),
    }


# ---------------------------------------------------------------- summary and tables
RATIO_KEYS = (
    "api-server",
    "scheduler (main process)",
    "worker tree",
    "supervisors + task processes",
    "postgres",
    "total",
)


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for name in names:
        good = [r for r in runs if r["executor"] == name and r.get("ok")]
        keys = sorted({k for r in good for k in r["per_task_s"]})
        per[name] = {
            "per_task_s": {k: measure.median([r["per_task_s"].get(k) for r in good]) for k in keys},
            "busy_pct": measure.median([r["run"]["machine_busy_pct"] for r in good]),
            "idle_busy_pct": measure.median([r["idle"]["machine_busy_pct"] for r in good]),
            "wall_s": measure.median([r["wall_s"] for r in good]),
            "window_s": measure.median([r["run"]["duration_s"] for r in good]),
            "components_net_over_machine_net": measure.median(
                [r["checks"]["components_net_over_machine_net"] for r in good]
            ),
            "runs_ok": len(good),
            "runs_failed": sum(1 for r in runs if r["executor"] == name and not r.get("ok")),
        }
    ratios = {}
    if "asyncq" in per:
        for other in names:
            if other != "asyncq":
                ratios[f"asyncq/{other}"] = {
                    k: measure.ratio(per["asyncq"]["per_task_s"].get(k), per[other]["per_task_s"].get(k))
                    for k in RATIO_KEYS
                }
    return {"per_executor": per, "ratios": ratios}


def _render(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)) for r in rows
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{1000 * value:.1f}"


def executor_table(name: str, s: dict[str, Any]) -> list[str]:
    """One executor: every component's CPU per task (ms), median over its runs."""
    v = s["per_task_s"]
    labels = {**{k: label for k, label in ROLE_ROWS}, **LABELS[name]}
    rows = [[f"{EXECUTORS[name].label}: component", "CPU ms per task"]]
    for comp in ("api-server", "scheduler", "dag-processor", "triggerer"):
        if name == "local" and comp == "scheduler":
            rows.append([labels["scheduler"], ms(v.get("scheduler"))])
            for role in (
                "scheduler main",
                attribute.SUPERVISOR,
                attribute.TASK,
                "unattributed",
                attribute.OTHER,
            ):
                rows.append([labels.get(role, role), ms(v.get(f"worker: {role}"))])
        else:
            rows.append([comp, ms(v.get(comp))])
    if name != "local":
        rows.append(["worker tree", ms(v.get(WORKER))])
        for role, _label in ROLE_ROWS:
            if role == attribute.FORKSERVER and name != "asyncq":
                continue
            rows.append([f"  {labels[role]}", ms(v.get(f"worker: {role}"))])
        rows.append(
            [
                "  (unattributed from the sampler alone, no taskstats)",
                ms(v.get("worker (sampling only): unattributed")),
            ]
        )
    rows.append(["postgres (this database's backends)", ms(v.get("postgres"))])
    rows.append(["redis (redis-server)", ms(v.get("redis"))])
    rows.append(["total", ms(v.get("total"))])
    return _render(rows)


def comparison_table(summary: dict[str, Any], names: list[str]) -> list[str]:
    per = summary["per_executor"]
    others = [n for n in names if n != "asyncq"] if "asyncq" in names else []
    header = [
        "CPU ms per task (median)",
        *[EXECUTORS[n].label for n in names],
        *[f"AsyncQ/{EXECUTORS[o].label}" for o in others],
    ]
    rows = [header]
    for key, label in (
        ("api-server", "api-server"),
        ("scheduler (main process)", "scheduler main process"),
        ("worker tree", "worker tree (Local: scheduler's workers + tasks)"),
        ("worker: consumer", "  consumer (Local: none)"),
        ("worker: fork server", "  fork server"),
        ("supervisors + task processes", "  supervisors + task processes"),
        ("postgres", "postgres (this database's backends)"),
        ("redis", "redis-server"),
        ("total", "total"),
    ):
        line = [label, *[ms(per[n]["per_task_s"].get(key)) for n in names]]
        line += [_ratio(summary["ratios"][f"asyncq/{o}"].get(key)) for o in others]
        rows.append(line)
    rows.append(
        [
            "machine CPU busy % during the run",
            *[_pct(per[n]["busy_pct"]) for n in names],
            *["" for _ in others],
        ]
    )
    rows.append(
        [
            "machine CPU busy % when idle",
            *[_pct(per[n]["idle_busy_pct"]) for n in names],
            *["" for _ in others],
        ]
    )
    rows.append(["DAG run wall time (s)", *[_num(per[n]["wall_s"]) for n in names], *["" for _ in others]])
    rows.append(
        [
            "(components + harness) / machine, net",
            *[_ratio(per[n]["components_net_over_machine_net"]) for n in names],
            *["" for _ in others],
        ]
    )
    rows.append(
        [
            "runs ok / failed",
            *[f"{per[n]['runs_ok']} / {per[n]['runs_failed']}" for n in names],
            *["" for _ in others],
        ]
    )
    return _render(rows)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
