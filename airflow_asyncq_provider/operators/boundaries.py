"""Record boundaries: where in a CSV or JSONL file a chunk may start and end.

Only at a record boundary, and in CSV a newline inside a quoted field is not one. A byte offset alone
cannot tell whether it sits inside quotes: that depends on every quote character before it. So the
scanner reads the file once from the start, in 1 MiB blocks, carrying the quote state: it counts quote
characters with ``bytes.count`` (C speed, so the scan runs at I/O speed) up to each target offset, then
walks newlines from there and takes the first one outside quotes. Memory stays at one block whatever
the file size; time is one sequential read, less than parsing costs. This is exact for RFC 4180 CSV,
the dialect pandas, Python's csv module and spreadsheets write, where a field that contains quotes is
quoted and its quotes are doubled (doubling keeps the parity). Sampling-based guesses (look around the
offset for something that looks like a record start) are faster on huge files but can be fooled by a
quoted field that itself contains CSV, and a wrong boundary silently corrupts two chunks; exactness
wins here. Two escape hatches:

* ``boundary="newline"``: every newline ends a record. No scan at all (a seek per chunk); right for
  files that have no newlines inside fields, and always used for JSONL, where a raw newline cannot
  occur inside a JSON string.
* ``quoting=csv.QUOTE_NONE`` in the read options: quote characters are data, so they are not counted.

Files that break RFC 4180 (a bare quote inside an unquoted field, backslash-escaped quotes) would
mislead the parity. ``RecordLayout`` refuses ``escapechar``, the planner checks that the scanner's
record count agrees with the parser's on the sample (``chunking.check_sample``), and a misplaced chunk
start shows up as malformed rows rather than silently.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterator
from typing import IO, Any

from airflow_asyncq_provider.operators.chunk import Chunk
from airflow_asyncq_provider.operators.errors import ChunkPlanningError, MalformedInputError

BLOCK = 1 << 20
FORMATS = ("csv", "jsonl")
BOUNDARIES = ("quoted", "newline")


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """How records are delimited: by newlines, optionally ignoring those inside ``quotechar`` quotes."""

    format: str = "csv"
    quotechar: bytes | None = b'"'

    @classmethod
    def for_input(cls, file_format: str, read_options: dict[str, Any] | None = None,
                  boundary: str = "quoted") -> RecordLayout:
        options = read_options or {}
        if file_format not in FORMATS:
            raise ChunkPlanningError(f"file_format={file_format!r} is not supported; use one of {FORMATS}")
        if boundary not in BOUNDARIES:
            raise ChunkPlanningError(f"boundary={boundary!r} is not supported; use one of {BOUNDARIES}")
        if file_format == "jsonl" or boundary == "newline" or options.get("quoting") == csv.QUOTE_NONE:
            return cls(format=file_format, quotechar=None)
        if options.get("escapechar"):
            raise ChunkPlanningError(
                f"read_options escapechar={options['escapechar']!r}: escaped quotes make record "
                f"boundaries ambiguous from a byte offset; re-export the file as RFC 4180 CSV (quotes "
                f"doubled), or pass boundary='newline' if no field contains a newline"
            )
        quotechar = options.get("quotechar", '"')
        if not isinstance(quotechar, str) or len(quotechar.encode()) != 1:
            raise ChunkPlanningError(
                f"read_options quotechar={quotechar!r} must be one single-byte character")
        return cls(format=file_format, quotechar=quotechar.encode())


def next_record_end(buf: bytes | bytearray, i: int, inside: bool,
                    quotechar: bytes | None) -> tuple[int, bool]:
    """Index just past the first newline at or after ``i`` that is outside quotes, or -1; and the
    quote state at that point (at the end of ``buf`` when -1). ``inside`` is the state at ``i``."""
    while True:
        j = buf.find(b"\n", i)
        if j < 0:
            if quotechar:
                inside ^= bool(buf.count(quotechar, i) & 1)
            return -1, inside
        if quotechar:
            inside ^= bool(buf.count(quotechar, i, j) & 1)
        if not inside:
            return j + 1, False
        i = j + 1


def find_record_end(fh: IO[bytes], start: int, target: int, stop: int, layout: RecordLayout) -> int:
    """End (exclusive) of the record that contains byte ``target``, reading from ``start``.

    ``start`` must be a record start (outside quotes) and ``stop`` a record end (the file size, or the
    end of a chunk being split). Returns ``stop`` when no record ends between ``target`` and ``stop``.
    Reads ``[start, record end)`` once in blocks; memory is one block.
    """
    q = layout.quotechar
    inside = False
    target = max(start, min(target, stop))
    if q:
        fh.seek(start)
        remaining = target - start
        while remaining > 0:
            buf = fh.read(min(BLOCK, remaining))
            if not buf:
                raise MalformedInputError(f"unexpected end of input at byte {target - remaining}; "
                                          f"did the file change while it was read?")
            inside ^= bool(buf.count(q) & 1)
            remaining -= len(buf)
    else:
        fh.seek(target)
    pos = target
    while pos < stop:
        buf = fh.read(min(BLOCK, stop - pos))
        if not buf:
            break
        end, inside = next_record_end(buf, 0, inside, q)
        if end >= 0:
            return pos + end
        pos += len(buf)
    if inside:
        raise MalformedInputError(
            f"a quoted field opened after byte {start} is still open at byte {stop} (end of "
            f"{'the file' if pos >= stop else 'the range'}): an unterminated quote. Fix the file, or if "
            f"quote characters are plain data here, pass read_options={{'quoting': csv.QUOTE_NONE}}"
        )
    return stop


def record_ranges(fh: IO[bytes], start: int, stop: int, chunk_bytes: int,
                  layout: RecordLayout) -> Iterator[tuple[int, int]]:
    """Consecutive record-aligned ranges covering ``[start, stop)``, each at least ``chunk_bytes`` long
    (but the last) and ending at the end of the record that contains its ``chunk_bytes``-th byte."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    a = start
    while a < stop:
        b = find_record_end(fh, a, a + chunk_bytes - 1, stop, layout)
        yield a, b
        a = b


def header_end(fh: IO[bytes], size: int, layout: RecordLayout, header: bool) -> int:
    if not header or size == 0:
        return 0
    return find_record_end(fh, 0, 0, size, layout)


def split_chunk(fh: IO[bytes], chunk: Chunk, pieces: int, layout: RecordLayout) -> list[Chunk]:
    """``chunk`` cut into up to ``pieces`` record-aligned pieces of about equal size (fewer when its
    records are too big to cut that finely)."""
    if pieces <= 1 or chunk.length == 0:
        return [chunk]
    target = math.ceil(chunk.length / pieces)
    ranges = list(record_ranges(fh, chunk.start, chunk.end, target, layout))
    return [dataclasses.replace(chunk, start=a, end=b, piece=i, pieces=len(ranges))
            for i, (a, b) in enumerate(ranges)]
