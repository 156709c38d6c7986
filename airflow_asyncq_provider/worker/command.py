"""``airflow asyncq worker``: a real Celery worker whose slots fork workloads from a warm parent.

Exit codes: 0 after a normal shutdown, 2 for a bad argument or setting, 3 when Redis cannot be
reached at start, 4 when the fork server cannot start.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from airflow_asyncq_provider import __version__
from airflow_asyncq_provider.errors import BrokerUnavailable, ConfigError
from airflow_asyncq_provider.settings import AsyncQSettings, load_settings, validate_queue_name
from airflow_asyncq_provider.state.urls import mask_url

log = logging.getLogger("airflow_asyncq_provider.worker")

EXIT_OK, EXIT_CONFIG, EXIT_BROKER, EXIT_FORKSERVER = 0, 2, 3, 4


def parse_queues(raw: str | None, default: str) -> list[str]:
    if raw is None:
        return [default]
    names = raw.split(",")
    return [validate_queue_name(name, "airflow asyncq worker -q") for name in names]


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


def worker(args: argparse.Namespace) -> None:
    try:
        settings = load_settings()
        queues = parse_queues(args.queues, settings.default_queue)
        concurrency = parse_concurrency(args.concurrency, settings.worker_concurrency)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    from celery.utils.nodenames import host_format

    hostname = host_format(args.hostname or "asyncq@%h")
    sys.exit(run_worker(settings, queues, concurrency, hostname, serve_logs=not args.skip_serve_logs,
                        loglevel="DEBUG" if args.verbose else "INFO"))


def run_worker(settings: AsyncQSettings, queues: list[str], concurrency: int, hostname: str,
               serve_logs: bool = True, loglevel: str = "INFO") -> int:
    from airflow_asyncq_provider.celery_app import make_celery_app
    from airflow_asyncq_provider.state.client import make_redis, ping_or_raise
    from airflow_asyncq_provider.worker.celery_tasks import register_tasks
    from airflow_asyncq_provider.worker.forkclient import ForkClient, ForkServerError
    from airflow_asyncq_provider.worker.runner import WorkloadRunner

    logging.basicConfig(level=loglevel, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    client = make_redis(settings)
    try:
        ping_or_raise(client, settings, "airflow asyncq worker")
    except BrokerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BROKER
    forks = ForkClient(settings.fork_preload_modules)
    try:
        forks.start()
    except ForkServerError as exc:
        print(f"error: the warm fork parent could not start: {exc}", file=sys.stderr)
        return EXIT_FORKSERVER
    runner = WorkloadRunner(settings, hostname, forks, client)
    app = make_celery_app(settings)
    register_tasks(app, runner)
    log.info("asyncq worker %s: broker %s, queues %s, %d slots, fork server pid %s",
             hostname, mask_url(settings.broker_url), ",".join(queues), concurrency, forks.pid)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat_loop, name="asyncq-heartbeat", daemon=True,
        args=(stop, settings, client, runner, hostname, queues, concurrency, forks),
    )
    try:
        with _serve_logs(serve_logs):  # forks: start it before any thread of ours exists
            beat.start()
            app.worker_main([
                "worker", "--pool", "threads", "--concurrency", str(concurrency),
                "--queues", ",".join(queues), "--hostname", hostname, "--loglevel", loglevel,
                "--task-events", "--without-mingle", "--without-gossip",
            ])
    finally:
        stop.set()
        from airflow_asyncq_provider.state import registry

        with contextlib.suppress(Exception):
            registry.unregister(client, runner.keys, hostname)
        forks.stop()
    return EXIT_OK


def _heartbeat_loop(stop: threading.Event, settings: AsyncQSettings, client: Any, runner: Any,
                    hostname: str, queues: list[str], concurrency: int, forks: Any) -> None:
    from airflow_asyncq_provider.state import registry

    started_at = time.time()
    while not stop.is_set():
        try:
            running = len(runner.running)
            registry.heartbeat(client, runner.keys, hostname, {
                "queues": queues, "slots": concurrency, "running": running,
                "free": concurrency - running, "version": __version__, "pid": os.getpid(),
                "forkserver_pid": forks.pid, "started_at": f"{started_at:.3f}",
                "last_claim_at": f"{runner.last_claim_at:.3f}",
            }, ttl=settings.worker_lost_timeout)
            runner.kill_revoked()
        except Exception as exc:  # Redis restarting must not kill the heartbeat thread
            log.warning("Heartbeat to Redis failed (%s); retrying in %.0f s",
                        type(exc).__name__, settings.worker_heartbeat_interval)
        stop.wait(settings.worker_heartbeat_interval)


@contextlib.contextmanager
def _serve_logs(enabled: bool) -> Iterator[None]:
    """Serve running tasks' logs on [logging] worker_log_server_port, as Celery workers do."""
    if not enabled:
        yield
        return
    from multiprocessing import get_context

    from airflow.utils.serve_logs import serve_logs

    proc = get_context("fork").Process(target=serve_logs, name="asyncq-serve-logs", daemon=True)
    proc.start()
    try:
        yield
    finally:
        proc.terminate()
