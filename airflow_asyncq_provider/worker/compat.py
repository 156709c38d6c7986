"""Version-guarded adjustments to Airflow's task SDK, made in the fork server and inherited by every
forked workload.

Airflow 3.3's supervisor learns that its task process exited either from socket EOF or from a poll
after ``selector.select(timeout)``. Once the task has closed all its sockets but has not quite exited
(interpreter teardown), the selector has nothing registered and the supervisor sleeps for the whole
heartbeat interval (5 s) before it polls again: every task then holds its slot ~5 s longer than it
runs. We shorten only that wait - no sockets open, exit code still unknown - to 50 ms polls.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

EXIT_POLL = 0.05


def shorten_exit_detection() -> bool:
    try:
        from airflow.sdk.execution_time.supervisor import WatchedSubprocess
    except ImportError:
        return False
    original = getattr(WatchedSubprocess, "_service_subprocess", None)
    if original is None or getattr(original, "_asyncq_patched", False):
        return False

    def _service_subprocess(self, max_wait_time, raise_on_timeout=False, expect_signal=None):  # type: ignore[no-untyped-def]
        if getattr(self, "_exit_code", 0) is None and not getattr(self, "_open_sockets", True):
            max_wait_time = min(max_wait_time, EXIT_POLL)
        return original(self, max_wait_time, raise_on_timeout=raise_on_timeout, expect_signal=expect_signal)

    _service_subprocess._asyncq_patched = True  # type: ignore[attr-defined]
    WatchedSubprocess._service_subprocess = _service_subprocess  # type: ignore[method-assign]
    return True


def warm_shared_caches() -> bool:
    """Build once, in the fork server, what each supervisor would otherwise build for itself.

    The Execution API client's SSL context (CA store, certifi included) is cached per process by the
    task SDK; built before the fork, every supervisor and task process shares it copy-on-write instead
    of holding a private 2.4 MiB copy (measured in docs/BENCHMARKS.md, worker memory).
    """
    try:
        from airflow.sdk.api import client

        client.Client._get_ssl_context_cached(client.API_SSL_CA_FILE_PATH, client.API_SSL_CERT_PATH)
    except Exception as exc:  # a bad [api] ssl setting fails each task with its own clear error anyway
        log.warning("Could not pre-build the Execution API SSL context (%s); each task builds its own", exc)
        return False
    return True


def warm_listener_manager() -> bool:
    """Load the plugins' listeners once, in the fork server, instead of once per task process.

    The task runner calls the task SDK's ``get_listener_manager()`` (``functools.cache``d) when it
    starts, which loads every plugin and imports the models their listeners use. Built before the
    fork, every task process inherits the loaded manager and shares its pages. As with every other
    preload, a plugin changed on disk is picked up when the worker restarts.
    """
    try:
        from airflow.sdk.listener import get_listener_manager

        get_listener_manager()
    except Exception as exc:  # a broken plugin fails each task with its own traceback anyway
        log.warning("Could not load the plugins' listeners in the fork server (%s); each task loads them", exc)
        return False
    return True
