"""``airflow asyncq ...`` command definitions. Commands load lazily, so ``airflow --help`` stays fast."""

from __future__ import annotations

from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand, lazy_load_command

ARG_QUEUES = Arg(("-q", "--queues"), help="Comma-separated queues to consume (default: [operators] default_queue)")
ARG_CONCURRENCY = Arg(("-c", "--concurrency"), help="Airflow workload slots (default: [asyncq] worker_concurrency)")
ARG_HOSTNAME = Arg(("-H", "--hostname"), help="Celery node name (default: asyncq@%%h)")
ARG_SKIP_SERVE_LOGS = Arg(("-s", "--skip-serve-logs"), action="store_true",
                          help="Do not serve running tasks' logs (another process on this host does)")
ARG_MEMORY_BUDGET = Arg(("-m", "--memory-budget"),
                        help="Memory this worker hands out to task requests, e.g. 12GiB "
                             "(default: [asyncq] worker_memory_budget, else a fraction of memory)")
# --- native lane (docs/NATIVE_TASKS.md) ---
ARG_LOOP_CONCURRENCY = Arg(("--loop-concurrency",),
                           help="async def native tasks run at once on the native lane's event loop "
                                "(default: [asyncq] loop_concurrency; 0 with --sync-threads 0: no lane)")
ARG_SYNC_THREADS = Arg(("--sync-threads",),
                       help="def native tasks run at once on the native lane's threads "
                            "(default: [asyncq] sync_threads)")
ARG_NATIVE_QUEUES = Arg(("--native-queues",),
                        help="Comma-separated queues the native lane consumes (default: native)")
ARG_VERBOSE = Arg(("-v", "--verbose"), action="store_true", help="Log at DEBUG level")
ARG_JSON = Arg(("--json",), action="store_true", help="Print JSON instead of a table")

ARG_DLQ_ACTION = Arg(("action",), choices=("list", "show", "replay", "purge"),
                     help="list: table of dead letters; show N: one, token masked; replay N: publish it "
                          "again and remove it; purge --yes: delete all")
ARG_DLQ_INDEX = Arg(("index",), nargs="?", type=int, default=0, help="dead letter number from `list`")
ARG_DLQ_QUEUE = Arg(("--queue",), help="replay to this queue instead of the recorded one")
ARG_YES = Arg(("-y", "--yes"), action="store_true", help="confirm purge")

ARG_WORKER = Arg(("worker",), help="Worker node name, as the WORKER column of `airflow asyncq status` shows it")
ARG_MAINTENANCE_STATE = Arg(("state",), choices=("on", "off"),
                            help="on: take no new work, finish what runs; off: take work again")
ARG_COMMENT = Arg(("--comment",), help="Why, shown with the worker in status and on the fleet page")
ARG_PROBE_HOSTNAME = Arg(("-H", "--hostname"),
                         help="Node name of the worker to check, %%h for this host's name (default: every "
                              "worker registered from this host)")

ASYNCQ_COMMANDS = (
    ActionCommand(
        name="worker",
        help="Start an AsyncQ worker (a Celery worker that forks Airflow workloads from a warm parent)",
        func=lazy_load_command("airflow_asyncq_provider.worker.command.worker"),
        args=(ARG_QUEUES, ARG_CONCURRENCY, ARG_HOSTNAME, ARG_MEMORY_BUDGET, ARG_SKIP_SERVE_LOGS, ARG_VERBOSE,
              ARG_LOOP_CONCURRENCY, ARG_SYNC_THREADS, ARG_NATIVE_QUEUES),
    ),
    ActionCommand(
        name="status",
        help="Show the fleet: each live worker, its queues, slots and running tasks",
        func=lazy_load_command("airflow_asyncq_provider.cli.status.status"),
        args=(ARG_JSON,),
    ),
    ActionCommand(
        name="dlq",
        help="Inspect, replay or purge the dead-letter list",
        func=lazy_load_command("airflow_asyncq_provider.cli.dlq.dlq"),
        args=(ARG_DLQ_ACTION, ARG_DLQ_INDEX, ARG_DLQ_QUEUE, ARG_YES, ARG_JSON),
    ),
    ActionCommand(
        name="maintenance",
        help="Put a worker in maintenance (no new work, running tasks finish) or take it out",
        func=lazy_load_command("airflow_asyncq_provider.cli.maintenance.maintenance"),
        args=(ARG_WORKER, ARG_MAINTENANCE_STATE, ARG_COMMENT),
    ),
    ActionCommand(
        name="probe",
        help="Liveness check: exit 0 if this host's worker heartbeats and its consumer ticks, else 1 and why",
        func=lazy_load_command("airflow_asyncq_provider.cli.probe.probe"),
        args=(ARG_PROBE_HOSTNAME,),
    ),
)


def get_asyncq_cli_commands() -> list[GroupCommand]:
    return [GroupCommand(name="asyncq", help="AsyncQ executor fleet", subcommands=ASYNCQ_COMMANDS)]
