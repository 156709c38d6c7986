"""``python -m airflow_asyncq_provider.native.lane``: the native lane, a second Celery worker.

``airflow asyncq worker --loop-concurrency N --sync-threads M`` starts it as a child process (node name
``<worker hostname>-native``) and stops it on shutdown. It imports ``[asyncq] task_modules``, publishes
their task names, and consumes the native queues with ``NativePool`` (native/pool.py).

Exit codes: 0 stopped normally; 2 a bad argument, setting or task module (the message names it);
3 Redis could not be reached at start.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import threading
import traceback

from airflow_asyncq_provider import exitcodes
from airflow_asyncq_provider.errors import BrokerUnavailable, ConfigError
from airflow_asyncq_provider.state.keys import NATIVE_QUEUE, Keys

log = logging.getLogger("airflow_asyncq_provider.native.lane")

REGISTRY_INTERVAL = 60.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m airflow_asyncq_provider.native.lane")
    parser.add_argument("--loop-concurrency", type=int, default=None)
    parser.add_argument("--sync-threads", type=int, default=None)
    parser.add_argument("-q", "--queues", default=NATIVE_QUEUE)
    parser.add_argument("-H", "--hostname", default="asyncq@%h-native")
    parser.add_argument("--task-modules", default=None, help="overrides [asyncq] task_modules")
    parser.add_argument("--task-events", action="store_true", help="send Celery task events (Flower)")
    parser.add_argument("--loglevel", default="INFO")
    return parser.parse_args(argv)


def lane_sizes(loop_concurrency: int, sync_threads: int) -> tuple[int, int]:
    """Both sides get at least one slot once the lane runs, so no task kind is stranded."""
    if loop_concurrency < 0 or sync_threads < 0:
        raise ConfigError("--loop-concurrency and --sync-threads must be >= 0, got "
                          f"{loop_concurrency} and {sync_threads}")
    return max(1, loop_concurrency), max(1, sync_threads)


def import_task_modules(modules: tuple[str, ...] | list[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(
                f"[asyncq] task_modules: importing {module!r} failed ({type(exc).__name__}: {exc}); "
                f"fix the module or remove it from AIRFLOW__ASYNCQ__TASK_MODULES\n{traceback.format_exc()}"
            ) from exc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.loglevel, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    from airflow_asyncq_provider.redaction import install_log_filter
    from airflow_asyncq_provider.settings import load_settings, parse_module_list, parse_queue_list

    install_log_filter()
    try:
        settings = load_settings()
        loop_n, threads_m = lane_sizes(
            settings.loop_concurrency if args.loop_concurrency is None else args.loop_concurrency,
            settings.sync_threads if args.sync_threads is None else args.sync_threads)
        queues = list(parse_queue_list(args.queues, "--native-queues"))
        modules = (settings.task_modules if args.task_modules is None
                   else parse_module_list(args.task_modules, "--task-modules"))
        from airflow_asyncq_provider.native.app import fleet

        import_task_modules(modules)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    from celery.utils.nodenames import host_format

    from airflow_asyncq_provider.native.registry import task_kinds
    from airflow_asyncq_provider.redaction import mask_url
    from airflow_asyncq_provider.state import native
    from airflow_asyncq_provider.state.client import connect

    try:
        client = connect(settings, "native lane")
    except BrokerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.BROKER
    hostname = host_format(args.hostname)
    fleet.set_current()
    fleet.set_default()
    fleet.conf.update(worker_pool="airflow_asyncq_provider.native.pool:NativePool",
                      asyncq_loop_concurrency=loop_n, asyncq_sync_threads=threads_m, asyncq_hostname=hostname)
    fleet.finalize(auto=True)
    keys = Keys(settings.key_prefix)
    names = task_kinds(fleet)
    if not names:
        log.warning("no native tasks registered: [asyncq] task_modules is %r; the lane will refuse every "
                    "message", ",".join(modules))
    stop = threading.Event()

    def keep_registry() -> None:
        while True:
            try:
                native.publish_tasks(client, keys, names, queues, hostname)
            except Exception as exc:  # Redis restarting: try again next time
                log.warning("publishing native task names failed (%s)", type(exc).__name__)
            if stop.wait(REGISTRY_INTERVAL):
                return

    threading.Thread(target=keep_registry, name="asyncq-native-registry", daemon=True).start()
    log.info("native lane %s: broker %s, queues %s, %d coroutine slot(s), %d sync thread(s), tasks %s",
             hostname, mask_url(settings.broker_url), ",".join(queues), loop_n, threads_m,
             ", ".join(sorted(names)) or "-")
    argv_worker = ["worker", "--concurrency", str(loop_n + threads_m), "--queues", ",".join(queues),
                   "--hostname", hostname, "--loglevel", args.loglevel, "--without-mingle",
                   "--without-gossip", "--without-heartbeat"]
    if args.task_events:
        argv_worker.append("--task-events")
    try:
        code = fleet.start(argv_worker)
    finally:
        stop.set()
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
