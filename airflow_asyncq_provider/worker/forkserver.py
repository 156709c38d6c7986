"""The warm fork parent: a single-threaded process that has imported Airflow's task SDK once.

Every Airflow workload runs in a child forked from it, so a workload starts in milliseconds and shares
the parent's frozen heap copy-on-write, instead of paying a fresh interpreter's imports (about 3 s and
120 MB here) or keeping an idle prefork child per slot. It is a separate process, not the Celery
worker, because forking a process that runs threads can deadlock on locks held by the other threads.
The worker forks it at start, while the worker is still single-threaded, so the Airflow modules the
worker had already imported are shared by both (see ForkClient); a restart later runs ``python -m``.

Protocol: one Unix-socket connection per workload, JSON lines.
  request   {"id": "<task id>", "payload": "<workload JSON>"}
  replies   {"pid": 1234}  or  {"error": "..."}     then, when the child ends,
            {"exit": {"code": int | null, "signal": int | null, "result": {...} | null}}

The child reports *why* it ended on a private pipe (``result``), because an exit status cannot carry
an exception message. If the worker that started this process dies (its end of our stdin closes),
every child is killed: a task whose worker is gone is reported lost and retried by Airflow, and must
not keep running beside its retry.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

# Exit codes of a forked workload child (documented in docs/OPERATIONS.md).
EXIT_SIGNAL_BASE = 64  # 64 + n: the task process was killed by signal n
EXIT_DUPLICATE = 200  # the Execution API said the task already runs elsewhere (HTTP 409)
EXIT_CRASHED = 201  # the supervisor raised; the result pipe carries the error

BASE_PRELOAD = (
    "psutil",
    "airflow.executors.base_executor",
    "airflow.executors.workloads",
    "airflow.sdk",
    "airflow.sdk.execution_time.supervisor",
    "airflow.sdk.execution_time.task_runner",
    "airflow.dag_processing.dagbag",  # every task parses its DAG file: import the parser once
    # What every task process or supervisor otherwise imported for itself, 0.1-0.2 s a task
    # (measured with PYTHONPROFILEIMPORTTIME=1 on the benchmark DAG, docs/BENCHMARKS.md):
    "airflow.sdk.bases.decorator",
    "airflow.sdk.definitions.decorators",
    "airflow.sdk.definitions.decorators.condition",
    "airflow.sdk.definitions.decorators.setup_teardown",
    "airflow.sdk.definitions.asset.metadata",
    "airflow.sdk.definitions.connection",
    "airflow.sdk._shared.logging.remote",
    "airflow.sdk._shared.logging.factory",
    "packaging.requirements",
    "jinja2.ext",
    "airflow.version",
)
# Preloaded when installed (the standard provider holds @task, PythonOperator, BashOperator).
OPTIONAL_PRELOAD = (
    "airflow.providers.standard.decorators.python",
    "airflow.providers.standard.operators.python",
    "airflow.providers.standard.operators.bash",
)


def import_preloads(extra: list[str]) -> None:
    for name in OPTIONAL_PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for name in (*BASE_PRELOAD, *extra):
        try:
            importlib.import_module(name)
        except Exception:  # one bad optional preload must not take the worker down
            print(f"asyncq fork server: could not preload {name!r}:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)


def encode_supervisor_return(code: int) -> int:
    """``supervise_task`` returns the task process' exit code, negative for a signal."""
    if code < 0:
        return EXIT_SIGNAL_BASE + min(-code, 63)
    return min(code, EXIT_SIGNAL_BASE - 1)


def describe_exit(code: int | None, sig: int | None, result: dict[str, Any] | None) -> tuple[bool, str]:
    """(succeeded, reason) for a child's end, in words an operator can act on."""
    if result and result.get("error"):
        return False, f"supervisor crashed: {result['error']}"
    if sig is not None:
        return False, f"supervisor killed by signal {_signame(sig)}"
    if code == 0:
        return True, "exit code 0"
    if code is not None and EXIT_SIGNAL_BASE < code < EXIT_DUPLICATE:
        return False, f"task process killed by signal {_signame(code - EXIT_SIGNAL_BASE)}"
    if code == EXIT_CRASHED:
        return False, "supervisor crashed (no error reported)"
    return False, f"task process exited with code {code}"


def _signame(sig: int) -> str:
    try:
        return f"{signal.Signals(sig).name} ({sig})"
    except ValueError:
        return str(sig)


class ForkServer:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pid -> (client conn, result pipe fd)
        self.buffers: dict[socket.socket, bytes] = {}
        self._decoder: Any = None
        self._sigchld_r, self._sigchld_w = os.pipe()

    def preload(self, extra: list[str]) -> None:
        import_preloads(extra)
        from airflow.executors.workloads import ExecutorWorkload
        from pydantic import TypeAdapter

        self._decoder = TypeAdapter(ExecutorWorkload)
        from airflow_asyncq_provider.worker.compat import shorten_exit_detection, warm_shared_caches

        shorten_exit_detection()  # patched once here, inherited by every fork
        warm_shared_caches()
        if threading.active_count() != 1:
            print(f"asyncq fork server: {threading.active_count()} threads after preload; forking "
                  "may deadlock", file=sys.stderr, flush=True)
        # Move everything imported so far out of the collector's reach, so children never touch
        # (and so never copy) those pages when the GC runs. https://docs.python.org/3/library/gc.html#gc.freeze
        gc.collect()
        gc.freeze()

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, "accept")
        os.set_blocking(self._sigchld_w, False)
        signal.set_wakeup_fd(self._sigchld_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # Signals to the worker's process group (Ctrl-C, a pod stop) must not take the fork server
        # down under running workloads: the worker drains first, then closes our stdin.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.selector.register(self._sigchld_r, selectors.EVENT_READ, "sigchld")
        self.selector.register(sys.stdin, selectors.EVENT_READ, "parent")
        print(f"asyncq fork server ready pid={os.getpid()} socket={self.socket_path}", flush=True)
        while True:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "accept":
                    conn, _addr = listener.accept()
                    conn.setblocking(False)
                    self.buffers[conn] = b""
                    self.selector.register(conn, selectors.EVENT_READ, "conn")
                elif key.data == "sigchld":
                    os.read(self._sigchld_r, 4096)
                elif key.data == "parent":
                    if not sys.stdin.buffer.read1(4096):
                        self._parent_gone(listener)
                else:
                    self._read_request(key.fileobj)  # type: ignore[arg-type]
            self._reap()

    def _read_request(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(1 << 20)
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        self.buffers[conn] += chunk
        if b"\n" not in self.buffers[conn]:
            return
        line, _, _rest = self.buffers.pop(conn).partition(b"\n")
        self.selector.unregister(conn)
        try:
            request = json.loads(line)
            if request.get("op") == "ping":
                self._send(conn, {"pong": os.getpid()})
                conn.close()
                return
            workload = self._decoder.validate_json(request["payload"])
        except Exception as exc:  # malformed input must not reach a fork
            self._send(conn, {"error": f"invalid workload: {_short(exc)}"})
            conn.close()
            return
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(result_r)
            _child(workload, str(request.get("id", "")), result_w, self._inherited_fds(conn))
        os.close(result_w)
        self.children[pid] = (conn, result_r)
        self._send(conn, {"pid": pid})

    def _inherited_fds(self, conn: socket.socket) -> list[int]:
        fds = [conn.fileno(), self._sigchld_r, self._sigchld_w]
        fds += [key.fd for key in self.selector.get_map().values()]
        fds += [result_r for _conn, result_r in self.children.values()]
        return sorted(set(fds) - {0, 1, 2})

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn, result_r = self.children.pop(pid, (None, -1))
            result = _read_result(result_r) if result_r >= 0 else None
            if conn is None:
                continue
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            self._send(conn, {"exit": {"code": code, "signal": sig, "result": result}})
            conn.close()

    def _send(self, conn: socket.socket, message: dict[str, Any]) -> None:
        try:
            conn.setblocking(True)
            conn.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            pass  # the waiting worker thread is gone; the child's end is still recorded by it or lost

    def _drop(self, conn: socket.socket) -> None:
        self.buffers.pop(conn, None)
        self.selector.unregister(conn)
        conn.close()

    def _parent_gone(self, listener: socket.socket) -> None:
        if self.children:
            print(f"asyncq fork server: worker is gone; killing its {len(self.children)} workload(s)",
                  file=sys.stderr, flush=True)
        self._kill_children(signal.SIGKILL)
        self._shutdown(listener)

    def _kill_children(self, sig: int) -> None:
        """Each child's whole tree: the supervisor starts the task process in a group of its own."""
        import psutil

        for pid in list(self.children):
            try:
                procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass

    def _shutdown(self, listener: socket.socket) -> None:
        listener.close()
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass
        os._exit(0)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _read_result(fd: int) -> dict[str, Any] | None:
    try:
        os.set_blocking(fd, False)
        data = os.read(fd, 65536)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _child(workload: Any, task_id: str, result_fd: int, inherited: list[int]) -> None:
    """Runs in the forked child: become a process group, run the supervisor, report, exit."""
    code = EXIT_CRASHED
    result: dict[str, Any] = {}
    try:
        for fd in inherited:  # the server's sockets and pipes are not the workload's business
            try:
                os.close(fd)
            except OSError:
                pass
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # stdin was the worker's lifeline pipe
        os.setsid()  # one group for supervisor + task, so a revoke or memory kill takes both
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        from airflow.executors.base_executor import BaseExecutor
        from airflow.sdk.exceptions import TaskAlreadyRunningError

        try:
            returned = BaseExecutor.run_workload(
                workload, proctitle=f"airflow asyncq supervisor: {task_id}"
            )
            code = encode_supervisor_return(int(returned or 0))
        except TaskAlreadyRunningError:
            code = EXIT_DUPLICATE
            result = {"duplicate": True}
        except BaseException as exc:  # the supervisor itself failed: only we can say so
            code = EXIT_CRASHED
            result = {"error": _short(exc), "traceback": traceback.format_exc()[-8000:]}
    finally:
        try:
            if result:
                os.write(result_fd, json.dumps(result).encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def run(socket_path: str, extra: list[str]) -> None:
    started = time.monotonic()
    server = ForkServer(socket_path)
    server.preload(extra)
    print(f"asyncq fork server preloaded in {time.monotonic() - started:.2f}s", flush=True)
    server.serve()


def main() -> None:
    run(sys.argv[1], [m for m in sys.argv[2].split(",") if m] if len(sys.argv) > 2 else [])


if __name__ == "__main__":
    main()
