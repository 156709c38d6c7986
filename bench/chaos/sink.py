"""The chaos DAG's side effect as a network write: a small TCP server that appends lines to a file.

A user's side effect needs the network: an INSERT into a database, a POST to a service. A file that
every namespace can write does not, so a host cut off from everything could still write its ``done``
line (docs/RELIABILITY.md, "Findings", item 2). Here the tries send their lines over TCP to this server
instead. It runs in the harness's process in the root namespace, on the bridge's address, the address
the hosts reach the core on. A partition or a slow link between a host and the core therefore cuts or
slows the host's side effects too. As a thread of the harness, it ends with the harness and leaves
nothing behind after a crash.

The protocol is one exchange per connection. The client sends one line of ``FIELDS`` fields that starts
with a tag in ``TAGS``: ``<tag> <dag_id> <task_id> <map_index> <try_number> <run_id> <hostname> <worker>
<time>``, the line account.read_effects parses. The server appends the line to the file (O_APPEND, one
write) and only then answers ``ok``. A line in the file is therefore a side effect that happened,
whether or not its ``ok`` reached the try. Anything else is logged, answered ``error`` and not
written: a line that is longer than ``MAX_LINE`` bytes, that is not UTF-8 text, or that has the wrong
shape. Every connection is bounded. A client that has not sent a whole line within ``read_timeout``
seconds is dropped, and beyond ``max_clients`` connections at once, a new one is answered ``error``
and closed.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIELDS = 9
TAGS = ("start", "done")
MAX_LINE = 1024  # bytes, newline included; a real line is about 100
READ_TIMEOUT = 10.0  # seconds for a client to send its whole line
MAX_CLIENTS = 64  # connections served at once; the fleet has 12 task slots
OK, ERROR = b"ok\n", b"error\n"

logger = logging.getLogger(__name__)


def problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a side-effect line, or None when it is one."""
    if len(raw) > MAX_LINE:
        return f"longer than {MAX_LINE} bytes"
    if not raw.endswith(b"\n") or raw.count(b"\n") != 1:
        return "not one whole line"
    try:
        text = raw[:-1].decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    if not text.isprintable():
        return "control characters"
    parts = text.split()
    if len(parts) != FIELDS or parts[0] not in TAGS:
        return f"not {FIELDS} fields starting with one of {'/'.join(TAGS)}"
    try:  # what account.read_effects converts: a line it cannot read would stop the counting
        int(parts[3]), int(parts[4]), float(parts[8])
    except ValueError:
        return "map_index, try_number or time is not a number"
    return None


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        self.server.owner.serve(self.request, self.client_address)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True  # a client that hangs must not hold up stop()
    block_on_close = False
    request_queue_size = MAX_CLIENTS  # the backlog: a burst of connections must not wait for SYN retries

    def __init__(self, owner: SideEffectServer, address: tuple[str, int]) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.owner.slots.acquire(blocking=False):
            self.owner.note("busy", client_address, f"more than {self.owner.max_clients} connections at once")
            self.owner.reply(request, ERROR)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner.slots.release()


class SideEffectServer:
    """Serves on a thread of its own from ``start()``; ``stop()`` closes it and may run twice.

    ``port`` 0 takes a free one; ``url`` is then what the tries are given as ``$ASYNCQ_SIDE_EFFECTS``.
    """

    def __init__(self, path: Path, host: str, port: int = 0, *, read_timeout: float = READ_TIMEOUT,
                 max_clients: int = MAX_CLIENTS, log: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.address = (host, port)
        self.read_timeout = read_timeout
        self.max_clients = max_clients
        self.slots = threading.BoundedSemaphore(max_clients)
        self.counts = {"written": 0, "rejected": 0, "timed_out": 0, "busy": 0, "reply_failed": 0}
        self._log = log or (lambda message: logger.warning("%s", message))
        self._lock = threading.Lock()  # the file and the counts
        self._fd: int | None = None
        self._server: _TCPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"tcp://{self.address[0]}:{self.address[1]}"

    def start(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._server = _TCPServer(self, self.address)
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="side-effect-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:  # a handler still running finds no file, and answers error
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    # ------------------------------------------------------------------ one connection
    def serve(self, sock: socket.socket, peer: Any) -> None:
        try:
            raw = self._read_line(sock)
        except TimeoutError:
            self.note("timed_out", peer, f"no whole line within {self.read_timeout:g} s; dropped")
            return
        except OSError as exc:
            self.note("rejected", peer, f"read failed: {exc}")
            return
        why = problem(raw)
        if why is None:
            why = self._append(raw)
        if why is not None:
            self.note("rejected", peer, f"{why}: {raw[:80]!r}")
            self.reply(sock, ERROR)
            return
        if not self.reply(sock, OK):  # written all the same: the try will fail and run again
            self.note("reply_failed", peer, f"ok not sent after writing {raw[:80]!r}")

    def _read_line(self, sock: socket.socket) -> bytes:
        """Up to the first newline, or ``MAX_LINE`` + 1 bytes, or what came before the client closed,
        all within ``read_timeout`` (a deadline for the whole line, not for each chunk)."""
        deadline = time.monotonic() + self.read_timeout
        data = bytearray()
        while b"\n" not in data and len(data) <= MAX_LINE:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(MAX_LINE + 1 - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def _append(self, raw: bytes) -> str | None:
        with self._lock:
            if self._fd is None:
                return "the server is stopping"
            try:
                written = os.write(self._fd, raw)  # one write with O_APPEND: the line stays whole
            except OSError as exc:
                return f"write failed: {exc}"
            if written != len(raw):
                return f"short write ({written} of {len(raw)} bytes)"
            self.counts["written"] += 1
        return None

    def reply(self, sock: socket.socket, answer: bytes) -> bool:
        try:
            sock.settimeout(self.read_timeout)
            sock.sendall(answer)
        except OSError:
            return False
        return True

    def note(self, kind: str, peer: Any, message: str) -> None:
        with self._lock:
            self.counts[kind] += 1
        self._log(f"side-effect server: {kind} from {peer[0] if peer else '?'}: {message}")
