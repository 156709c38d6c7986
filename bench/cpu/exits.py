"""Every process' final CPU time as it exits, from the kernel's taskstats netlink interface.

The sampler sees a short-lived process only every ``interval``, so what it used after its last read
(its *tail*) shows up only in its parent's reaped counter, mixed with its siblings' and children's.
The kernel sends a taskstats record for every thread that exits to any listener registered for the
CPUs (Documentation/accounting/taskstats.rst); ``cpu_run_virtual_total`` in it is the thread's whole
run time in ns (``se.sum_exec_runtime``, what /proc's utime+stime are scaled to). Summed by thread
group, that is the process' own final CPU, tail included.

Registering needs CAP_NET_ADMIN (root) and a kernel with CONFIG_TASKSTATS. Without either,
``ExitListener.start`` returns False and the benchmark falls back to the counters alone (the tails stay
in "unattributed reaped children").
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from typing import Any

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
TASKSTATS_CMD_GET = 1
TASKSTATS_CMD_NEW = 2
TASKSTATS_CMD_ATTR_REGISTER_CPUMASK = 3
TASKSTATS_CMD_ATTR_DEREGISTER_CPUMASK = 4
TASKSTATS_TYPE_PID = 1
TASKSTATS_TYPE_STATS = 3
TASKSTATS_TYPE_AGGR_PID = 4
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
# Offsets in struct taskstats (linux/taskstats.h, stable since version 13; newer versions only append).
OFF_VERSION, OFF_RUN_VIRTUAL, OFF_PID, OFF_TGID = 0, 72, 128, 368
MIN_VERSION = 13  # the first with ac_tgid


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _attrs(data: bytes, offset: int, end: int) -> list[tuple[int, bytes]]:
    found = []
    while offset + 4 <= end:
        length, kind = struct.unpack_from("HH", data, offset)
        if length < 4:
            break
        found.append((kind & 0x3FFF, data[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    return found


class ExitListener:
    """``start()``, then per window ``reset()`` at its begin and ``collect()`` at its end."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._family = 0
        self._cpumask = f"0-{(os.cpu_count() or 1) - 1}".encode() + b"\0"
        self._lock = threading.Lock()
        self._ns: dict[int, int] = {}  # tgid -> run time of its threads that exited, ns
        self._leaders: dict[int, int] = {}  # tgid -> how many times its leader thread exited (pid reuse)
        self.records = 0
        self.dropped = 0  # times the socket overflowed (records lost)
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
            sock.bind((0, 0))
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root): 16 MiB
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
            self._sock = sock
            self._family = self._resolve_family()
            self._send(TASKSTATS_CMD_GET, _attr(TASKSTATS_CMD_ATTR_REGISTER_CPUMASK, self._cpumask))
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.stop()
            return False
        self._thread = threading.Thread(target=self._loop, name="taskstats", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if self._family:
                msg = _attr(TASKSTATS_CMD_ATTR_DEREGISTER_CPUMASK, self._cpumask)
                genl = struct.pack("BBH", TASKSTATS_CMD_GET, 1, 0) + msg
                sock.send(struct.pack("IHHII", 16 + len(genl), self._family, NLM_F_REQUEST, 2, 0) + genl)
        except OSError:
            pass
        sock.close()

    def reset(self) -> None:
        with self._lock:
            self._ns.clear()
            self._leaders.clear()

    def collect(self) -> tuple[dict[int, int], set[int]]:
        """(tgid -> ns of its exited threads, tgids whose leader exited more than once: ambiguous)."""
        with self._lock:
            return dict(self._ns), {t for t, n in self._leaders.items() if n > 1}

    def stats(self) -> dict[str, Any]:
        return {"records": self.records, "dropped": self.dropped, "error": self.error}

    # ------------------------------------------------------------ netlink
    def _send(self, cmd: int, attrs: bytes, family: int | None = None) -> None:
        assert self._sock is not None
        genl = struct.pack("BBH", cmd, 1, 0) + attrs
        self._sock.send(
            struct.pack("IHHII", 16 + len(genl), family or self._family, NLM_F_REQUEST, 1, 0) + genl
        )

    def _resolve_family(self) -> int:
        assert self._sock is not None
        self._send(CTRL_CMD_GETFAMILY, _attr(CTRL_ATTR_FAMILY_NAME, b"TASKSTATS\0"), family=GENL_ID_CTRL)
        data = self._sock.recv(65536)
        length, kind = struct.unpack_from("IH", data, 0)
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("i", data, 16)
            raise OSError(-code, f"taskstats family lookup failed: {os.strerror(-code)}")
        for attr_kind, payload in _attrs(data, 20, length):
            if attr_kind == CTRL_ATTR_FAMILY_ID:
                return struct.unpack_from("H", payload)[0]
        raise OSError(errno.ENOENT, "no TASKSTATS generic netlink family")

    def _loop(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(1 << 20)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.dropped += 1
                    continue
                return  # closed
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("IH", data, offset)
                if length < 16:
                    break
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("i", data, offset + 16)
                    if code:
                        self.error = f"taskstats: {os.strerror(-code)}"
                elif kind == self._family and data[offset + 16] == TASKSTATS_CMD_NEW:
                    self._record(data, offset + 20, offset + length)
                offset += (length + 3) & ~3

    def _record(self, data: bytes, start: int, end: int) -> None:
        for kind, payload in _attrs(data, start, end):
            if kind != TASKSTATS_TYPE_AGGR_PID:
                continue  # AGGR_TGID repeats what the threads' own records already said
            for inner, stats in _attrs(payload, 0, len(payload)):
                if inner != TASKSTATS_TYPE_STATS or len(stats) < OFF_TGID + 4:
                    continue
                (version,) = struct.unpack_from("H", stats, OFF_VERSION)
                if version < MIN_VERSION:
                    continue
                (ns,) = struct.unpack_from("Q", stats, OFF_RUN_VIRTUAL)
                pid, tgid = (
                    struct.unpack_from("I", stats, OFF_PID)[0],
                    struct.unpack_from("I", stats, OFF_TGID)[0],
                )
                with self._lock:
                    self.records += 1
                    self._ns[tgid] = self._ns.get(tgid, 0) + ns
                    if pid == tgid:
                        self._leaders[tgid] = self._leaders.get(tgid, 0) + 1
