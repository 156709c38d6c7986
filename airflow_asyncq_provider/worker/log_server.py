"""Serve running tasks' logs on ``[logging] worker_log_server_port``, as Celery workers do.

Airflow's log server app runs on a thread of the worker, not as an ``airflow serve-logs`` child: the
child cost 70 MiB PSS at idle, the thread about 8 MiB (docs/BENCHMARKS.md). Uvicorn installs no signal
handlers off the main thread, so Celery keeps its own.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("airflow_asyncq_provider.worker")

#: Imported before the fork server is forked, so both processes share their pages (see Worker).
RUNTIME_MODULES = ("uvicorn", "uvicorn.protocols.http.auto", "uvicorn.protocols.websockets.auto",
                   "uvicorn.lifespan.on", "uvicorn.loops.auto", "uvicorn.loops.uvloop")


def preload() -> None:
    from airflow.utils.serve_logs.log_server import get_app

    get_app()


class LogServer:
    def __init__(self, port: int, log_level: str = "info") -> None:
        self.port = port
        self._log_level = log_level
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import uvicorn
        from airflow.utils.serve_logs.log_server import get_app

        self._server = uvicorn.Server(uvicorn.Config(
            get_app(), host="", port=self.port, log_config=None, access_log=False, log_level=self._log_level,
        ))
        self._thread = threading.Thread(target=self._server.run, name="asyncq-serve-logs", daemon=True)
        self._thread.start()
        log.info("Serving task logs on port %d ([logging] worker_log_server_port)", self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
