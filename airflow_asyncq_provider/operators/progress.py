"""Progress of a long streaming pass, logged as rows/s, percent done and ETA, at most every few seconds."""

from __future__ import annotations

import datetime
import logging
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

from airflow_asyncq_provider.sizes import MIB, format_size


def current_rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """Call ``update`` after each chunk; it logs when ``interval`` seconds passed since the last line."""

    def __init__(self, log: logging.Logger | Any, *, total_bytes: int, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.total_bytes = max(total_bytes, 0)
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.last_logged = self.started
        self.lines = 0

    def line(self, done_bytes: int, rows: int, chunks: int) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        percent = 100.0 * done_bytes / self.total_bytes if self.total_bytes else 100.0
        byte_rate = done_bytes / elapsed
        eta = (self.total_bytes - done_bytes) / byte_rate if byte_rate > 0 else None
        return (f"{percent:5.1f}% ({format_size(done_bytes)} of {format_size(self.total_bytes)}), "
                f"{chunks} chunk(s), {rows:,} rows, {rows / elapsed:,.0f} rows/s, "
                f"{byte_rate / MIB:.1f} MiB/s, ETA {format_eta(eta)}, peak RSS {format_size(peak_rss())}")

    def update(self, done_bytes: int, rows: int, chunks: int, *, final: bool = False) -> None:
        now = self.clock()
        if final or now - self.last_logged >= self.interval:
            self.last_logged = now
            self.lines += 1
            self.log.info("Progress: %s", self.line(done_bytes, rows, chunks))
