"""The Celery worker's side of the fork server: start it, keep it alive, ask it to fork workloads."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from airflow_asyncq_provider.errors import AsyncQError

log = logging.getLogger(__name__)


class ForkServerError(AsyncQError):
    """The fork server could not be started or stopped answering."""


class InvalidWorkload(AsyncQError):
    """The fork server refused the payload before forking (it failed validation)."""


class Child:
    """A forked workload: its pid now, its exit later (``wait`` blocks the calling slot thread)."""

    def __init__(self, conn: socket.socket, reader: Any, pid: int) -> None:
        self._conn = conn
        self._reader = reader
        self.pid = pid

    def wait(self) -> dict[str, Any]:
        try:
            line = self._reader.readline()
        finally:
            self._reader.close()
            self._conn.close()
        if not line:
            return {"code": None, "signal": None, "result": {"error": "fork server died while the task ran"}}
        return json.loads(line)["exit"]


class ForkClient:
    def __init__(self, preload: tuple[str, ...] = (), start_timeout: float = 120.0) -> None:
        self._dir = tempfile.mkdtemp(prefix="asyncq-fork-")
        self.socket_path = os.path.join(self._dir, "fork.sock")
        self._preload = preload
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        # stdin stays a pipe we never write to: when this process dies, the server reads EOF and
        # kills the workloads it forked, so nothing runs on without a worker that reports it.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "airflow_asyncq_provider.worker.forkserver", self.socket_path,
             ",".join(self._preload)],
            stdin=subprocess.PIPE,
        )
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ForkServerError(f"fork server exited with code {self._proc.returncode} at start")
            try:
                self._request({"op": "ping"}).close()
                return
            except OSError:
                time.sleep(0.05)
        raise ForkServerError(f"fork server did not answer within {self._start_timeout:.0f} s")

    def _request(self, message: dict[str, Any]) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.socket_path)
            conn.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            conn.close()
            raise
        return conn

    def spawn(self, task_id: str, payload: str) -> Child:
        try:
            conn = self._request({"id": task_id, "payload": payload})
        except OSError:
            with self._lock:
                if self._proc is None or self._proc.poll() is not None:
                    log.error("Fork server is gone (exit %s); starting a new one",
                              None if self._proc is None else self._proc.returncode)
                    self._start_locked()
            conn = self._request({"id": task_id, "payload": payload})
        reader = conn.makefile("rb")
        first = reader.readline()
        reply = json.loads(first) if first else {"error": "fork server closed the connection"}
        if "pid" not in reply:
            reader.close()
            conn.close()
            if str(reply.get("error", "")).startswith("invalid workload"):
                raise InvalidWorkload(reply["error"])
            raise ForkServerError(str(reply.get("error")))
        return Child(conn, reader, int(reply["pid"]))

    def stop(self, timeout: float = 10.0) -> None:
        """Closing the server's stdin is its stop signal; it kills any workload still running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
