"""``airflow asyncq worker``: argparse -> settings -> ``Worker`` -> exit code.

Exit codes (``airflow_asyncq_provider.exitcodes``, also in docs/OPERATIONS.md):
  0  stopped normally: every running task finished within the drain timeout
  2  a bad argument or ``[asyncq]`` setting (the message names it)
  3  Redis could not be reached at start (the message shows the masked URL)
  4  the warm fork parent could not start
  5  drained, but the drain timeout ran out and running tasks were terminated
  6  a second SIGTERM: running tasks were killed at once
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from airflow_asyncq_provider import exitcodes
from airflow_asyncq_provider.errors import BrokerUnavailable, ConfigError
from airflow_asyncq_provider.redaction import install_log_filter
from airflow_asyncq_provider.settings import AsyncQSettings, load_settings, parse_queue_list


def parse_queues(raw: str | None, default: str) -> list[str]:
    if raw is None:
        return [default]
    return list(parse_queue_list(raw, "airflow asyncq worker -q"))


def names_the_fleet(core_executor: str) -> bool:
    """Whether ``[core] executor`` lists an AsyncQExecutor: globally or for a team, with or without an
    alias (``LocalExecutor,AsyncQ:airflow_asyncq_provider.executors.AsyncQExecutor;team_a=...``)."""
    entries = (e.strip() for team in core_executor.split(";") for e in team.split("=")[-1].split(","))
    return any(e.rsplit(":", 1)[-1].endswith("AsyncQExecutor") for e in entries)


def executor_warning(core_executor: str) -> str | None:
    """apache/airflow#71175: a task parses its DAG file again on the worker, and Airflow checks every
    ``executor=`` against the worker's own ``[core] executor``."""
    if names_the_fleet(core_executor):
        return None
    return (f"[core] executor is {core_executor!r} on this worker, without AsyncQExecutor. A task parses "
            "its DAG file again here, and Airflow checks every executor= in it against this setting "
            "(apache/airflow#71175): a DAG with a task that names the fleet's executor fails to load on "
            "this worker, and the task fails. Give the workers the scheduler's [core] executor "
            "(AIRFLOW__CORE__EXECUTOR).")


def kombu_warning(kombu_version: str) -> str | None:
    """kombu 5.7 drops a BRPOP connection whose reply is overdue; before it, a consumer whose connection
    went half-open in a partition can wait for minutes, or for ever (docs/OPERATIONS.md, "A healed
    partition"). pyproject allows 5.6 for deployments whose other packages pin it, so say it here."""
    try:
        major, minor = (int(part) for part in kombu_version.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) >= (5, 7):
        return None
    return (f"kombu {kombu_version} cannot drop a half-open Redis connection: after a network partition "
            "this worker's consumer may stay silent for minutes. Install kombu>=5.7 on workers that can be "
            "partitioned from Redis (docs/OPERATIONS.md, 'A healed partition').")


def parse_concurrency(raw: Any, default: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise ConfigError(f"airflow asyncq worker -c must be a positive integer, got {raw!r}")
    return value


def worker_options(args: argparse.Namespace, settings: AsyncQSettings) -> Any:
    """The command line resolved against ``[asyncq]``; a ``ConfigError`` names the bad flag."""
    from celery.utils.nodenames import host_format

    from airflow_asyncq_provider.sizes import parse_size
    from airflow_asyncq_provider.worker.native_lane import lane_spec
    from airflow_asyncq_provider.worker.service import WorkerOptions

    queues = parse_queues(args.queues, settings.default_queue)
    budget = (parse_size(args.memory_budget, "airflow asyncq worker --memory-budget")
              if getattr(args, "memory_budget", None) else settings.worker_memory_budget)
    native = lane_spec(getattr(args, "loop_concurrency", None), getattr(args, "sync_threads", None),
                       getattr(args, "native_queues", None), settings.loop_concurrency,
                       settings.sync_threads, queues)
    return WorkerOptions(queues=tuple(queues), concurrency=parse_concurrency(args.concurrency,
                                                                             settings.worker_concurrency),
                         hostname=host_format(args.hostname or "asyncq@%h"), memory_budget=budget,
                         serve_logs=not args.skip_serve_logs, loglevel="DEBUG" if args.verbose else "INFO",
                         native=native)


def worker(args: argparse.Namespace) -> None:
    try:
        settings = load_settings()
        options = worker_options(args, settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exitcodes.CONFIG) from None
    sys.exit(run(settings, options))


def run(settings: AsyncQSettings, options: Any) -> int:
    from airflow.configuration import conf

    from airflow_asyncq_provider.worker.log_server import LogServer
    from airflow_asyncq_provider.worker.service import ForkServerFailed, Worker

    logging.basicConfig(level=options.loglevel, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    install_log_filter()
    from importlib.metadata import version

    for warning in (executor_warning(conf.get("core", "executor", fallback="")), kombu_warning(version("kombu"))):
        if warning:
            logging.getLogger(__name__).warning("%s", warning)
    try:
        log_server = LogServer(conf.getint("logging", "worker_log_server_port"),
                               conf.get("logging", "uvicorn_logging_level", fallback="info").lower())
        service = Worker(settings, options, log_server=log_server if options.serve_logs else None,
                         log_folder=conf.get("logging", "base_log_folder", fallback=None))
    except BrokerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.BROKER
    try:
        service.start()
    except ForkServerFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        service.stop()
        return exitcodes.FORKSERVER
    try:
        celery_code = service.join()
    finally:
        drained = service.stop()
    return celery_code if celery_code != exitcodes.OK else drained
