"""The warm fork parent: a single-threaded process that has imported Airflow's task SDK once.

Every Airflow workload runs under a supervisor forked from it, so a workload starts in milliseconds and
shares the parent's frozen heap copy-on-write, instead of paying a fresh interpreter's imports (about
3 s and 120 MB here). It is a separate process, not the Celery worker, because forking a process that
runs threads can deadlock on locks held by the other threads. The worker forks it at start, while the
worker is still single-threaded, so the Airflow modules the worker had already imported are shared by
both (see ForkClient); a restart later runs ``python -m``.

Supervisor hosts. The supervisor does not exit after its workload: it stays, as a *host*, and runs the
next workload this server hands it, the way a Celery prefork child runs one task after another. A task
then costs one fork (the host forks the task process) instead of two, and no exit of a large process.
A host that stays idle for ``[asyncq] supervisor_idle_timeout`` seconds exits, so an idle worker holds
no hosts; 0 gives every workload a fresh supervisor that exits after it. A host also exits after
``HOST_MAX_WORKLOADS`` workloads and after any supervisor crash, and the worker's kills (memory limit,
revoke, fence) take the host's whole group: the next workload gets a new host.

Protocol with the worker: one Unix-socket connection per workload, JSON lines.
  request   {"id": "<task id>", "payload": "<workload JSON>"}
  replies   {"pid": 1234}  or  {"error": "..."}     then, when the supervisor is done,
            {"exit": {"code": int | null, "signal": int | null, "result": {...} | null}}
The pid is the host's: the root of the workload's process tree while it runs. The worker closes the
connection once it has stopped tracking that pid; only then does the host take another workload, so
a late kill meant for one workload can never reach the next.

Protocol with a host: a socket pair, JSON lines. This server sends the request (plus ``"last"``: exit
after it); the host answers ``{"done": {"code": ..., "result": ..., "exiting": bool}}`` (``exiting``:
it exits now, told to or after a crash, and is handed nothing more). A host that dies instead is
reaped here and its workload's exit carries the signal. If the worker that started this process dies
(its end of our stdin closes), every host is killed: a task whose worker is gone is reported lost and
retried by Airflow, and must not keep running beside its retry.
"""

from __future__ import annotations

import contextlib
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
EXIT_CRASHED = 201  # the supervisor raised; the host's "done" carries the error

#: Workloads one supervisor host runs before it exits and a fresh fork replaces it, so that whatever a
#: supervisor leaves behind (a cache, a leak in a provider's hook) cannot grow without bound. Celery's
#: own knob for its prefork children is ``worker_max_tasks_per_child``.
HOST_MAX_WORKLOADS = 100
IDLE_TITLE = "airflow asyncq supervisor host: idle"

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


class Host:
    """A supervisor host as the server sees it: idle, running one workload, or waiting for the worker to
    release that workload's connection."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock  # the server's end of the pair
        self.buffer = b""
        self.conn: socket.socket | None = None  # the worker's connection of the workload it runs
        self.done = False  # it answered "done"; it is free once the worker releases the connection
        self.last = False  # it exits after the workload it runs (or was told to)
        self.workloads = 0
        self.idle_since = time.monotonic()

    @property
    def idle(self) -> bool:
        return self.conn is None and not self.last


class ForkServer:
    def __init__(self, socket_path: str, idle_timeout: float) -> None:
        self.socket_path = socket_path
        self.idle_timeout = idle_timeout
        self.selector = selectors.DefaultSelector()
        self.hosts: dict[int, Host] = {}
        self.buffers: dict[socket.socket, bytes] = {}
        self._decoder: Any = None
        self._sigchld_r, self._sigchld_w = os.pipe()

    def preload(self, extra: list[str]) -> None:
        import_preloads(extra)
        from airflow.executors.workloads import ExecutorWorkload
        from pydantic import TypeAdapter

        self._decoder = TypeAdapter(ExecutorWorkload)
        from airflow_asyncq_provider.worker.compat import (
            shorten_exit_detection,
            warm_listener_manager,
            warm_shared_caches,
        )

        shorten_exit_detection()  # patched once here, inherited by every fork
        warm_shared_caches()
        warm_listener_manager()
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
                elif key.data == "conn":
                    self._read_request(key.fileobj)  # type: ignore[arg-type]
                elif isinstance(key.data, Host):
                    self._read_host(key.data)
                else:
                    self._released(key.fileobj, key.data[1])  # type: ignore[arg-type,index]
            self._reap()
            self._retire_idle()

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
            self._decoder.validate_json(request["payload"])
        except Exception as exc:  # malformed input must not reach a fork
            self._send(conn, {"error": f"invalid workload: {_short(exc)}"})
            conn.close()
            return
        host = next((h for h in self.hosts.values() if h.idle), None) or self._fork_host(conn)
        host.conn, host.done, host.workloads = conn, False, host.workloads + 1
        host.last = self.idle_timeout <= 0 or host.workloads >= HOST_MAX_WORKLOADS
        try:
            host.sock.sendall(json.dumps({"id": request.get("id", ""), "payload": request["payload"],
                                          "last": host.last}).encode() + b"\n")
        except OSError:  # it died since it last answered: the reaper reports this workload's end
            host.last = True
        self._send(conn, {"pid": host.pid})
        # The worker never writes again: readable means it closed the connection (it stopped tracking)
        self.selector.register(conn, selectors.EVENT_READ, ("release", host))

    def _fork_host(self, conn: socket.socket) -> Host:
        ours, theirs = socket.socketpair()
        inherited = self._inherited_fds(conn) + [ours.fileno()]
        pid = os.fork()
        if pid == 0:
            _host(theirs, self._decoder, inherited)
        theirs.close()
        ours.setblocking(False)
        host = Host(pid, ours)
        self.hosts[pid] = host
        self.selector.register(ours, selectors.EVENT_READ, host)
        return host

    def _inherited_fds(self, conn: socket.socket) -> list[int]:
        fds = [conn.fileno(), self._sigchld_r, self._sigchld_w]
        fds += [key.fd for key in self.selector.get_map().values()]
        fds += [h.sock.fileno() for h in self.hosts.values() if h.sock.fileno() >= 0]
        return sorted(set(fds) - {0, 1, 2})

    def _read_host(self, host: Host) -> None:
        try:
            chunk = host.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # it exited or is exiting: the reaper has the rest
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(host.sock)
            return
        host.buffer += chunk
        while b"\n" in host.buffer:
            line, _, host.buffer = host.buffer.partition(b"\n")
            try:
                done = json.loads(line)["done"]
            except (ValueError, KeyError, TypeError):
                continue
            host.done = True
            host.last = host.last or bool(done.get("exiting"))
            if host.conn is not None:
                self._send(host.conn, {"exit": {"code": done.get("code"), "signal": None,
                                                "result": done.get("result")}})
            else:
                self._free(host)

    def _released(self, conn: socket.socket, host: Host) -> None:
        """The worker closed a workload's connection: it no longer tracks the host's pid."""
        self.selector.unregister(conn)
        conn.close()
        if self.hosts.get(host.pid) is host and host.conn is conn:
            host.conn = None
            if host.done:
                self._free(host)
            else:  # given up while it still runs: never hand it another workload
                host.last = True

    def _free(self, host: Host) -> None:
        host.done, host.idle_since = False, time.monotonic()
        if host.last:
            self._retire(host)

    def _retire_idle(self) -> None:
        now = time.monotonic()
        for host in list(self.hosts.values()):
            if host.idle and now - host.idle_since > self.idle_timeout:
                self._retire(host)

    def _retire(self, host: Host) -> None:
        """Closing its end is a host's stop signal (it reads EOF when idle); it is reaped when it exits."""
        host.last = True
        if host.sock.fileno() >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(host.sock)
            host.sock.close()

    def _reap(self) -> None:
        while self.hosts:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            host = self.hosts.pop(pid, None)
            if host is None:
                continue
            if host.conn is not None and not host.done and host.sock.fileno() >= 0:
                self._read_host(host)  # a last host writes "done" just before it exits
            self._retire(host)
            if host.conn is not None and not host.done:
                self._send(host.conn, {"exit": _death(status)})

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
        busy = [h for h in self.hosts.values() if h.conn is not None and not h.done]
        if busy:
            print(f"asyncq fork server: worker is gone; killing its {len(busy)} workload(s)",
                  file=sys.stderr, flush=True)
        self._kill_children(signal.SIGKILL)
        self._shutdown(listener)

    def _kill_children(self, sig: int) -> None:
        """Each host's whole tree: the host's supervisor starts the task process in a group of its own."""
        from airflow_asyncq_provider.memory.processes import signal_tree

        for pid in list(self.hosts):
            signal_tree(pid, sig)

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


def _death(status: int) -> dict[str, Any]:
    """The exit of a workload whose host died before it reported the end."""
    if os.WIFSIGNALED(status):
        return {"code": None, "signal": os.WTERMSIG(status), "result": None}
    code = os.WEXITSTATUS(status)
    return {"code": code, "signal": None,
            "result": {"error": f"supervisor host exited with code {code} before it reported the workload's end"}}


def _host(sock: socket.socket, decoder: Any, inherited: list[int]) -> None:
    """Runs in a forked host: become a process group, then run one supervisor after another."""
    status = 1
    try:
        for fd in inherited:  # the server's sockets and pipes are not the workload's business
            try:
                os.close(fd)
            except OSError:
                pass
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # stdin was the worker's lifeline pipe
        os.setsid()  # one group for host + task, so a revoke or memory kill takes both
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        reader = sock.makefile("rb")
        while True:
            _title(IDLE_TITLE)
            line = reader.readline()
            if not line:  # the server retired this host, or is gone
                break
            request = json.loads(line)
            code, result = _supervise(decoder.validate_json(request["payload"]), str(request.get("id", "")))
            sys.stdout.flush()
            sys.stderr.flush()
            # Said with the end, so the server hands this host nothing more while it exits.
            exiting = bool(request.get("last")) or code == EXIT_CRASHED
            sock.sendall(json.dumps({"done": {"code": code, "result": result or None,
                                              "exiting": exiting}}).encode() + b"\n")
            if exiting:
                break
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _supervise(workload: Any, task_id: str) -> tuple[int, dict[str, Any]]:
    """One workload's supervisor: (exit code as encode_supervisor_return gives it, result)."""
    from airflow.executors.base_executor import BaseExecutor
    from airflow.sdk.exceptions import TaskAlreadyRunningError

    try:
        returned = BaseExecutor.run_workload(workload, proctitle=f"airflow asyncq supervisor: {task_id}")
        return encode_supervisor_return(int(returned or 0)), {}
    except TaskAlreadyRunningError:
        return EXIT_DUPLICATE, {"duplicate": True}
    except BaseException as exc:  # the supervisor itself failed: only we can say so
        return EXIT_CRASHED, {"error": _short(exc), "traceback": traceback.format_exc()[-8000:]}


def _title(title: str) -> None:
    with contextlib.suppress(ImportError):
        from setproctitle import setproctitle

        setproctitle(title)


def run(socket_path: str, extra: list[str], idle_timeout: float) -> None:
    started = time.monotonic()
    server = ForkServer(socket_path, idle_timeout)
    server.preload(extra)
    print(f"asyncq fork server preloaded in {time.monotonic() - started:.2f}s", flush=True)
    server.serve()


def main() -> None:
    socket_path, preload, idle_timeout = sys.argv[1:4]  # as ForkClient starts it
    run(socket_path, [m for m in preload.split(",") if m], float(idle_timeout))


if __name__ == "__main__":
    main()
