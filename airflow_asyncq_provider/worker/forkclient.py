"""The Celery worker's side of the fork server: start it, keep it alive, ask it to fork workloads."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

from airflow_asyncq_provider.errors import AsyncQError

log = logging.getLogger(__name__)


class ForkServerError(AsyncQError):
    """The fork server could not be started or stopped answering."""


class InvalidWorkload(AsyncQError):
    """The fork server refused the payload before forking (it failed validation)."""


class Child:
    """A workload's supervisor: its pid now, its exit later (``wait`` blocks the calling slot thread).

    ``release`` once the pid is no longer tracked: only then may its supervisor host (forkserver.py)
    take another workload, so no kill meant for this one can reach the next."""

    def __init__(self, conn: socket.socket, reader: Any, pid: int) -> None:
        self._conn = conn
        self._reader = reader
        self.pid = pid

    def wait(self) -> dict[str, Any]:
        try:
            line = self._reader.readline()
        except OSError:
            line = b""
        if not line:
            return {"code": None, "signal": None, "result": {"error": "fork server died while the task ran"}}
        return json.loads(line)["exit"]

    def release(self) -> None:
        self._reader.close()
        self._conn.close()


class ForkedServer:
    """The part of ``subprocess.Popen`` that ForkClient uses, for a fork server forked from this process."""

    def __init__(self, pid: int, lifeline: int) -> None:
        self.pid = pid
        self.stdin = os.fdopen(lifeline, "wb")  # closing it is the server's stop signal, as with Popen
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: it is gone either way
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"fork server {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.wait(10)


class ForkClient:
    """``fork_here``: the first start forks the server from this process instead of running ``python -m``.

    The worker imports most of Airflow before it starts the server. Forked, the server shares those
    pages with the worker, and the PSS of the pair drops by about what the worker imported (see
    docs/BENCHMARKS.md). Forking is only safe while this process has one thread, so a restart after a
    crash, when Celery's threads run, always spawns a fresh interpreter.
    """

    def __init__(self, preload: tuple[str, ...] = (), start_timeout: float = 120.0,
                 fork_here: bool = False, *, idle_timeout: float) -> None:
        self._dir = tempfile.mkdtemp(prefix="asyncq-fork-")
        self.socket_path = os.path.join(self._dir, "fork.sock")
        self._preload = preload
        self._start_timeout = start_timeout
        self._fork_here = fork_here
        self._idle_timeout = idle_timeout  # [asyncq] supervisor_idle_timeout
        self._proc: subprocess.Popen[bytes] | ForkedServer | None = None
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
        if self._fork_here and self._proc is None and threading.active_count() == 1:
            self._proc = self._fork()
            log.info("Fork server forked from the worker (pid %d), sharing its imports", self._proc.pid)
        else:
            if self._fork_here and self._proc is None:
                log.warning("%d threads run in the worker, so the fork server starts as a fresh "
                            "interpreter; the worker's imports are not shared", threading.active_count())
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "airflow_asyncq_provider.worker.forkserver", self.socket_path,
                 ",".join(self._preload), str(self._idle_timeout)],
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

    def _fork(self) -> ForkedServer:
        from airflow_asyncq_provider.worker import forkserver

        # Import the server's modules here first: pages imported before the fork are shared by both
        # processes, so the worker carries them at half their PSS instead of the server at full.
        forkserver.import_preloads(list(self._preload))
        lifeline_r, lifeline_w = os.pipe()
        # Freeze what is imported now, so that neither side's collector writes to (and so copies) the
        # shared pages. https://docs.python.org/3/library/gc.html#gc.freeze
        gc.collect()
        gc.freeze()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the fork server: never return into the worker's code (run() exits by itself)
            try:
                os.close(lifeline_w)
                os.dup2(lifeline_r, 0)
                os.close(lifeline_r)
                forkserver.run(self.socket_path, list(self._preload), self._idle_timeout)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(lifeline_r)
        return ForkedServer(pid, lifeline_w)

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
