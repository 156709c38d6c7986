"""``Worker``: the one object that owns a fleet worker's parts (the dramatiq habit).

    worker = Worker(settings, options)
    worker.start()          # Redis, fork server, watchdog, heartbeat, log server, native lane
    code = worker.join()    # Celery's consumer runs in this (the main) thread until it shuts down
    worker.stop()           # everything started, in reverse order; the exit code says how it ended

Process and thread picture: docs/OPERATIONS.md, "Inside a worker".
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from airflow_asyncq_provider import __version__, metrics
from airflow_asyncq_provider.errors import AsyncQError
from airflow_asyncq_provider.redaction import mask_url
from airflow_asyncq_provider.sizes import MIB
from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.state.registry import RunningTask, WorkerInfo

if TYPE_CHECKING:
    import redis

    from airflow_asyncq_provider.settings import AsyncQSettings
    from airflow_asyncq_provider.worker.log_server import LogServer
    from airflow_asyncq_provider.worker.native_lane import LaneProcess, LaneSpec

log = logging.getLogger("airflow_asyncq_provider.worker")

# What the Celery worker needs at run time, imported before the fork server is forked. Measured, not
# derived: with these imported first, the idle worker + fork server pair has 6-9 MiB less PSS than
# when Celery imports them after the fork (docs/BENCHMARKS.md, worker memory).
CELERY_RUNTIME_MODULES = (
    "celery.apps.worker", "celery.bin.celery", "celery.concurrency.thread", "celery.worker.consumer",
    "celery.worker.components", "celery.worker.autoscale", "celery.worker.strategy",
    "celery.events.dispatcher", "celery.backends.base", "celery.app.routes", "billiard.pool",
    "kombu.transport.redis", "kombu.pidbox", "kombu.matcher",
)


class ForkServerFailed(AsyncQError):
    """The warm fork parent could not start; the worker exits with ``exitcodes.FORKSERVER``."""


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """The command line, resolved against ``[asyncq]`` (worker/command.py)."""

    queues: tuple[str, ...]
    concurrency: int
    hostname: str
    memory_budget: int | None = None
    serve_logs: bool = True
    loglevel: str = "INFO"
    native: LaneSpec | None = None


class Worker:
    """``client``: a Redis client that answered (connected here when not given); ``log_server``: serves
    running tasks' logs, or None (``--skip-serve-logs``); ``log_folder``: where task logs are written,
    so the worker can append its verdict (a memory kill, a drain) to the task's own log."""

    def __init__(self, settings: AsyncQSettings, options: WorkerOptions, client: redis.Redis | None = None,
                 log_server: LogServer | None = None, log_folder: str | None = None) -> None:
        from airflow_asyncq_provider.broker.config import make_celery_app
        from airflow_asyncq_provider.memory.admission import Admission, detect_budget
        from airflow_asyncq_provider.memory.watchdog import Watchdog
        from airflow_asyncq_provider.state.client import connect
        from airflow_asyncq_provider.worker.celery_tasks import register_tasks, requeue_to
        from airflow_asyncq_provider.worker.drain import Drain
        from airflow_asyncq_provider.worker.fencing import Fence
        from airflow_asyncq_provider.worker.forkclient import ForkClient
        from airflow_asyncq_provider.worker.heartbeat import Heartbeat
        from airflow_asyncq_provider.worker.runner import WorkloadRunner

        self.settings = settings
        self.options = options
        self.hostname = options.hostname
        self.keys = Keys(settings.key_prefix)
        self.client = client if client is not None else connect(settings, "airflow asyncq worker")
        self.started_at = time.time()
        self.forks = ForkClient(settings.fork_preload_modules, fork_here=True,
                                idle_timeout=settings.supervisor_idle_timeout)
        self.admission = Admission(detect_budget(options.memory_budget, settings.worker_memory_fraction),
                                   settings.default_memory_request)
        self.app = make_celery_app(settings)
        self.watchdog = Watchdog(settings.watchdog_interval, self._watch_list, self._over_limit)
        self.runner = WorkloadRunner(settings, self.hostname, self.forks, self.client, self.admission,
                                     requeue=requeue_to(self.client), log_folder=log_folder,
                                     peak_of=self.watchdog.pop_peak)
        register_tasks(self.app, self.runner)
        self.lane: LaneProcess | None = None
        if options.native is not None and options.native.enabled:
            from airflow_asyncq_provider.worker.native_lane import LaneProcess

            self.lane = LaneProcess(options.native, self.hostname, options.loglevel)
        self.drain = Drain(self.runner, settings, self.hostname,
                           on_first_signal=self.lane.begin_stop if self.lane is not None else None)
        self.fence = Fence(settings, self.hostname, self.runner)
        self.heartbeat = Heartbeat(settings, self.client, self.keys, self.hostname, self.info,
                                   renew=self.runner.renew_leases, duties=self._duties(),
                                   renewed=self.fence.renewed)
        self.log_server = log_server

    # ------------------------------------------------------------------ wiring the runner and watchdog
    def _watch_list(self) -> list[tuple[str, int, int | None]]:
        return self.runner.watch_list()

    def _over_limit(self, task_id: str, used: int, limit: int) -> None:
        self.runner.over_limit(task_id, used, limit)

    def _duties(self) -> list[Any]:
        """Best-effort work of each heartbeat, after the leases are renewed."""
        duties = [self.runner.refresh_maintenance]
        if self.lane is not None:
            duties.insert(0, self.lane.supervise)
        return duties

    def info(self) -> WorkerInfo:
        """What this worker's registry record says now (``airflow asyncq status`` shows it)."""
        tasks = {task_id: RunningTask(e.pid, self.watchdog.usage(task_id), e.limit, e.request,
                                      round(e.started_at, 3), e.key)
                 for task_id, e in self.runner.running_entries().items()}
        return WorkerInfo(
            queues=list(self.options.queues), slots=self.options.concurrency, running=len(tasks),
            version=__version__, pid=os.getpid(), forkserver_pid=self.forks.pid, started_at=self.started_at,
            last_claim_at=self.runner.last_claim_at, consumer_tick_at=self.runner.consumer_tick_at,
            draining=self.runner.draining, memory_budget=self.admission.budget,
            memory_reserved=self.admission.used, memory_in_use=self.watchdog.in_use(), tasks=tasks,
            native=self.lane.status() if self.lane is not None else None,
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Fork the fork server first, while this process is still single-threaded, then the threads."""
        from celery import signals

        from airflow_asyncq_provider.worker.forkclient import ForkServerError

        self._import_runtime_modules()
        metrics.prepare()  # Stats, configured from [metrics], imported before the fork: pages are shared
        try:
            self.forks.start()
        except ForkServerError as exc:
            raise ForkServerFailed(f"the warm fork parent could not start: {exc}") from exc
        signals.worker_shutting_down.connect(self.drain.on_shutdown, weak=False)
        with contextlib.suppress(Exception):  # before the consumer starts: maintenance survives restarts
            self.runner.refresh_maintenance()
        log.info("asyncq worker %s: broker %s, queues %s, %d slots, memory budget %d MiB, fork server pid %s",
                 self.hostname, mask_url(self.settings.broker_url), ",".join(self.options.queues),
                 self.options.concurrency, self.admission.budget // MIB, self.forks.pid)
        if self.lane is not None:
            self.lane.start()
        if self.log_server is not None:
            self.log_server.start()
        self.heartbeat.start()
        self.fence.start()
        self.watchdog.start()

    def join(self) -> int:
        """Run Celery's consumer until it shuts down; Celery's own exit code, 0 when it stopped cleanly."""
        # app.start, not worker_main: worker_main drops Celery's own exit code.
        code = self.app.start([
            "worker", "--pool", "threads", "--concurrency", str(self.options.concurrency),
            "--queues", ",".join(self.options.queues), "--hostname", self.hostname,
            "--loglevel", self.options.loglevel, "--task-events", "--without-mingle", "--without-gossip",
        ])
        return int(code or 0)

    def stop(self) -> int:
        """Stop what ``start`` started, in reverse; returns how the drain ended (``exitcodes``)."""
        from airflow_asyncq_provider.state import registry

        self.heartbeat.stop()
        self.fence.stop()
        self.watchdog.stop()
        with contextlib.suppress(Exception):
            registry.unregister(self.client, self.keys, self.hostname)
        if self.log_server is not None:
            self.log_server.stop()
        if self.lane is not None:
            self.lane.stop(self.settings.worker_drain_timeout + self.settings.kill_grace_period)
        self.forks.stop()
        return self.drain.exit_code

    def _import_runtime_modules(self) -> None:
        modules = list(CELERY_RUNTIME_MODULES)
        if self.log_server is not None:
            from airflow_asyncq_provider.worker import log_server

            modules += log_server.RUNTIME_MODULES
        for name in modules:
            with contextlib.suppress(ImportError):  # an optional speed-up (httptools, uvloop) may be absent
                importlib.import_module(name)
        if self.log_server is not None:
            from airflow_asyncq_provider.worker import log_server

            log_server.preload()
