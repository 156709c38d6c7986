"""``airflow asyncq worker``: a real Celery worker whose slots fork workloads from a warm parent.

Exit codes (also in docs/OPERATIONS.md):
  0  stopped normally: every running task finished within the drain timeout
  2  a bad argument or ``[asyncq]`` setting (the message names it)
  3  Redis could not be reached at start (the message shows the masked URL)
  4  the warm fork parent could not start
  5  drained, but the drain timeout ran out and running tasks were terminated
  6  a second SIGTERM: running tasks were killed at once
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from airflow_asyncq_provider import __version__
from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.settings import AsyncQSettings, load_settings, validate_queue_name
from airflow_asyncq_provider.state.urls import mask_secrets, mask_url

log = logging.getLogger("airflow_asyncq_provider.worker")

EXIT_OK, EXIT_CONFIG, EXIT_BROKER, EXIT_FORKSERVER, EXIT_DRAIN_TIMEOUT, EXIT_FORCED = 0, 2, 3, 4, 5, 6

_JWT = re.compile(r"eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+")


class SecretsFilter(logging.Filter):
    """Defence in depth: no token or broker password reaches a log line, whatever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = mask_secrets(_JWT.sub("<token>", message)) if ("eyJ" in message or "://" in message) else message
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def parse_queues(raw: str | None, default: str) -> list[str]:
    if raw is None:
        return [default]
    return [validate_queue_name(name, "airflow asyncq worker -q") for name in raw.split(",")]


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
    from airflow_asyncq_provider.memory.sizes import parse_size

    try:
        settings = load_settings()
        queues = parse_queues(args.queues, settings.default_queue)
        concurrency = parse_concurrency(args.concurrency, settings.worker_concurrency)
        budget = (parse_size(args.memory_budget, "airflow asyncq worker --memory-budget")
                  if getattr(args, "memory_budget", None) else settings.worker_memory_budget)
        # --- native lane (docs/NATIVE_TASKS.md) ---
        from airflow_asyncq_provider.native.child import lane_spec

        native = lane_spec(getattr(args, "loop_concurrency", None), getattr(args, "sync_threads", None),
                           getattr(args, "native_queues", None), settings.loop_concurrency,
                           settings.sync_threads, queues)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    from celery.utils.nodenames import host_format

    hostname = host_format(args.hostname or "asyncq@%h")
    sys.exit(run_worker(settings, queues, concurrency, hostname, budget=budget,
                        serve_logs=not args.skip_serve_logs, loglevel="DEBUG" if args.verbose else "INFO",
                        native=native))


class Drain:
    """SIGTERM: stop taking work, let running tasks finish within the drain timeout, then terminate
    them with a reason. A second SIGTERM kills them at once."""

    def __init__(self, runner: Any, settings: AsyncQSettings, hostname: str) -> None:
        self.runner = runner
        self.settings = settings
        self.hostname = hostname
        self.signals = 0
        self.exit_code = EXIT_OK

    def on_shutdown(self, sig: Any = None, **_: Any) -> None:
        self.signals += 1
        self.runner.draining = True
        if self.signals == 1:
            log.warning("%s: draining %d running task(s), up to %.0f s ([asyncq] worker_drain_timeout)",
                        sig, len(self.runner.running), self.settings.worker_drain_timeout)
            threading.Thread(target=self._wait_then_terminate, name="asyncq-drain", daemon=True).start()
        else:
            self.exit_code = EXIT_FORCED
            log.warning("%s again: killing %d running task(s) now", sig, len(self.runner.running))
            self.runner.stop_all(f"worker {self.hostname} was stopped by a second SIGTERM", kill_now=True)

    def _wait_then_terminate(self) -> None:
        deadline = time.monotonic() + self.settings.worker_drain_timeout
        while self.runner.running and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.runner.running and self.exit_code == EXIT_OK:
            self.exit_code = EXIT_DRAIN_TIMEOUT
            self.runner.stop_all(f"worker {self.hostname} drained: [asyncq] worker_drain_timeout of "
                                 f"{self.settings.worker_drain_timeout:g} s ran out")


def run_worker(settings: AsyncQSettings, queues: list[str], concurrency: int, hostname: str,
               budget: int | None = None, serve_logs: bool = True, loglevel: str = "INFO",
               native: Any = None) -> int:
    from celery import signals

    from airflow_asyncq_provider.celery_app import make_celery_app
    from airflow_asyncq_provider.cli.connect import redis_or_exit
    from airflow_asyncq_provider.memory.admission import Admission, detect_budget
    from airflow_asyncq_provider.memory.watchdog import Watchdog
    from airflow_asyncq_provider.worker.celery_tasks import register_tasks
    from airflow_asyncq_provider.worker.forkclient import ForkClient, ForkServerError
    from airflow_asyncq_provider.worker.runner import WorkloadRunner

    logging.basicConfig(level=loglevel, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(SecretsFilter())
    client = redis_or_exit(settings, "airflow asyncq worker")  # exits 3 (EXIT_BROKER) when Redis is down
    _import_worker_modules(serve_logs)
    forks = ForkClient(settings.fork_preload_modules, fork_here=True)
    try:
        forks.start()
    except ForkServerError as exc:
        print(f"error: the warm fork parent could not start: {exc}", file=sys.stderr)
        return EXIT_FORKSERVER
    from airflow.configuration import conf

    admission = Admission(detect_budget(budget, settings.worker_memory_fraction),
                          settings.default_memory_request)
    runner = WorkloadRunner(settings, hostname, forks, client, admission,
                            log_folder=conf.get("logging", "base_log_folder", fallback=None))
    watchdog = Watchdog(settings.watchdog_interval, runner.watch_list, runner.over_limit)
    runner.peak_of = watchdog.pop_peak
    app = make_celery_app(settings)
    register_tasks(app, runner)
    drain = Drain(runner, settings, hostname)
    signals.worker_shutting_down.connect(drain.on_shutdown, weak=False)
    log.info("asyncq worker %s: broker %s, queues %s, %d slots, memory budget %d MiB, fork server pid %s",
             hostname, mask_url(settings.broker_url), ",".join(queues), concurrency,
             admission.budget // 1024**2, forks.pid)
    stop = threading.Event()
    lane = None
    if native is not None and native.enabled:  # --- native lane: a child process of its own ---
        from airflow_asyncq_provider.native.child import LaneProcess

        lane = LaneProcess(native, hostname, loglevel)
        lane.start()
    beat = threading.Thread(
        target=_heartbeat_loop, name="asyncq-heartbeat", daemon=True,
        args=(stop, settings, client, runner, watchdog, hostname, queues, concurrency, forks, lane),
    )
    try:
        with _serve_logs(serve_logs):
            beat.start()
            watchdog.start()
            # app.start, not worker_main: worker_main drops Celery's own exit code.
            celery_code = app.start([
                "worker", "--pool", "threads", "--concurrency", str(concurrency),
                "--queues", ",".join(queues), "--hostname", hostname, "--loglevel", loglevel,
                "--task-events", "--without-mingle", "--without-gossip",
            ])
            if celery_code not in (0, None):
                return int(celery_code)
    finally:
        stop.set()
        watchdog.stop()
        from airflow_asyncq_provider.state import registry

        with contextlib.suppress(Exception):
            registry.unregister(client, runner.keys, hostname)
        if lane is not None:  # --- native lane ---
            lane.stop(settings.worker_drain_timeout + settings.kill_grace_period)
        forks.stop()
    return drain.exit_code


def _import_worker_modules(serve_logs: bool) -> None:
    """Import what the Celery worker and the log server need before the fork server is forked.

    Measured, not derived: with these imported before the fork, the idle worker + fork server pair
    has 6-9 MiB less PSS than when Celery imports them after it (docs/BENCHMARKS.md, worker memory).
    """
    import importlib

    modules = ["celery.apps.worker", "celery.bin.celery", "celery.concurrency.thread", "celery.worker.consumer",
               "celery.worker.components", "celery.worker.autoscale", "celery.worker.strategy",
               "celery.events.dispatcher", "celery.backends.base", "celery.app.routes", "billiard.pool",
               "kombu.transport.redis", "kombu.pidbox", "kombu.matcher"]
    if serve_logs:
        modules += ["uvicorn", "uvicorn.protocols.http.auto", "uvicorn.protocols.websockets.auto",
                    "uvicorn.lifespan.on", "uvicorn.loops.auto", "uvicorn.loops.uvloop"]
    for name in modules:
        with contextlib.suppress(ImportError):  # an optional speed-up (httptools, uvloop) may be absent
            importlib.import_module(name)
    if serve_logs:
        from airflow.utils.serve_logs.log_server import get_app

        get_app()


def _heartbeat_loop(stop: threading.Event, settings: AsyncQSettings, client: Any, runner: Any,
                    watchdog: Any, hostname: str, queues: list[str], concurrency: int, forks: Any,
                    lane: Any = None) -> None:
    from airflow_asyncq_provider.state import registry

    started_at = time.time()
    while not stop.is_set():
        if lane is not None:
            lane.supervise()
        try:
            running = len(runner.running)
            registry.heartbeat(client, runner.keys, hostname, {
                "queues": queues, "slots": concurrency, "running": running,
                "free": concurrency - running, "version": __version__, "pid": os.getpid(),
                "forkserver_pid": forks.pid, "started_at": f"{started_at:.3f}",
                "last_claim_at": f"{runner.last_claim_at:.3f}",
                "consumer_tick_at": f"{runner.consumer_tick_at:.3f}",
                "draining": runner.draining,
                "memory_budget": runner.admission.budget,
                "memory_reserved": runner.admission.used,
                "memory_in_use": watchdog.in_use(),
                "tasks": {task_id: {"pid": pid, "pss": watchdog.current.get(task_id, 0), "limit": limit}
                          for task_id, pid, limit in runner.watch_list()},
                "native": lane.status() if lane is not None else None,
            }, ttl=settings.worker_lost_timeout)
            runner.renew_leases()
        except Exception as exc:  # Redis restarting must not kill the heartbeat thread
            log.warning("Heartbeat to Redis failed (%s); retrying in %.0f s",
                        type(exc).__name__, settings.worker_heartbeat_interval)
        stop.wait(settings.worker_heartbeat_interval)


@contextlib.contextmanager
def _serve_logs(enabled: bool) -> Iterator[None]:
    """Serve running tasks' logs on [logging] worker_log_server_port, as Celery workers do.

    Airflow's log server app runs on a thread of this process, not as an ``airflow serve-logs`` child:
    the child cost 70 MiB PSS at idle, the thread about 8 MiB (docs/BENCHMARKS.md). Uvicorn installs
    no signal handlers off the main thread, so Celery keeps its own.
    """
    if not enabled:
        yield
        return
    import uvicorn
    from airflow.configuration import conf
    from airflow.utils.serve_logs.log_server import get_app

    port = conf.getint("logging", "worker_log_server_port")
    server = uvicorn.Server(uvicorn.Config(
        get_app(), host="", port=port, log_config=None, access_log=False,
        log_level=conf.get("logging", "uvicorn_logging_level", fallback="info").lower(),
    ))
    thread = threading.Thread(target=server.run, name="asyncq-serve-logs", daemon=True)
    thread.start()
    log.info("Serving task logs on port %d ([logging] worker_log_server_port)", port)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(5)
