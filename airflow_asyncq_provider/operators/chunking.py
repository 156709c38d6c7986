"""Chunk planning: cut a CSV or JSONL file into byte ranges that each fit a memory budget.

Two questions decide a plan.

**How many bytes per chunk?** A sample from the head of the file is parsed with the same reader the
chunk tasks use, which gives bytes per record and the *expansion*: in-memory bytes of the DataFrame per
byte of input. Then::

    chunk_bytes = (memory_budget - overhead) / (expansion * work_factor)

``overhead`` is what the task process holds before it reads any data (interpreter, Airflow's task
runner, pandas and pyarrow; measured in the planning process by default), and ``work_factor`` is the
peak-to-DataFrame ratio of one chunk's life: the parser's buffers, the ``process`` callable's copies and
the Parquet conversion. A budget that leaves room for less than one record is an error that names the
size to ask for.

**Where may a chunk start?** Only at a record boundary, and in CSV a newline inside a quoted field is
not one. A byte offset alone cannot tell whether it sits inside quotes: that depends on every quote
character before it. So the planner scans the file once from the start, in 1 MiB blocks, carrying the
quote state: it counts quote characters with ``bytes.count`` (C speed, so the scan runs at I/O speed)
up to each target offset, then walks newlines from there and takes the first one outside quotes. Memory
stays at one block whatever the file size; time is one sequential read, less than parsing costs. This is
exact for RFC 4180 CSV, the dialect pandas, Python's csv module and spreadsheets write, where a field
that contains quotes is quoted and its quotes are doubled (doubling keeps the parity). Sampling-based
guesses (look around the offset for something that looks like a record start) are faster on huge files
but can be fooled by a quoted field that itself contains CSV, and a wrong boundary silently corrupts two
chunks; exactness wins here. Two escape hatches:

* ``boundary="newline"``: every newline ends a record. No scan at all (a seek per chunk); right for
  files that have no newlines inside fields, and always used for JSONL, where a raw newline cannot
  occur inside a JSON string.
* ``quoting=csv.QUOTE_NONE`` in the read options: quote characters are data, so they are not counted.

Files that break RFC 4180 (a bare quote inside an unquoted field, backslash-escaped quotes) would
mislead the parity. The planner checks that its record count agrees with the parser's on the sample and
refuses ``escapechar``, and a misplaced chunk start shows up as malformed rows rather than silently.

Nothing here imports pandas: parsing the sample is a function passed in (``reading.measure_sample``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from typing import IO, Any

from airflow_asyncq_provider.memory.sizes import format_size
from airflow_asyncq_provider.operators.errors import ChunkPlanningError, MalformedInputError

MIB = 1024**2
BLOCK = 1 << 20
FORMATS = ("csv", "jsonl")
BOUNDARIES = ("quoted", "newline")
DESCRIPTOR_LIMIT = 1024  # bytes of JSON per chunk descriptor in XCom
DEFAULT_WORK_FACTOR = 3.0
DEFAULT_SAMPLE_BYTES = MIB
MIN_OVERHEAD = 64 * MIB


def human_size(size: int) -> str:
    """``format_size`` for log lines, with KiB and bytes below 1 MiB (chunks of small files are small)."""
    if size >= MIB:
        return format_size(size)
    return f"{size / 1024:.0f} KiB" if size >= 10 * 1024 else f"{size} bytes"


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


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One record-aligned byte range ``[start, end)`` of ``path``; what a chunk task is mapped over.

    ``header_end`` is where the header record ends (0 without a header): a chunk task reads
    ``[0, header_end)`` for the column names. ``piece``/``pieces`` are set when a retry splits the
    chunk after a memory failure; they never travel through XCom.
    """

    path: str
    format: str
    index: int
    count: int
    start: int
    end: int
    header_end: int = 0
    piece: int = 0
    pieces: int = 1

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def label(self) -> str:
        piece = f" piece {self.piece + 1}/{self.pieces}" if self.pieces > 1 else ""
        of = f"/{self.count}" if self.count else ""
        return f"chunk {self.index + 1}{of}{piece} (bytes {self.start}-{self.end})"

    def to_descriptor(self) -> dict[str, Any]:
        descriptor = {"path": self.path, "format": self.format, "index": self.index, "count": self.count,
                      "start": self.start, "end": self.end, "header_end": self.header_end}
        size = len(json.dumps(descriptor))
        if size > DESCRIPTOR_LIMIT:
            raise ChunkPlanningError(
                f"the chunk descriptor for {self.path!r} is {size} bytes of JSON, over the "
                f"{DESCRIPTOR_LIMIT}-byte limit for XCom; use a shorter path"
            )
        return descriptor

    @classmethod
    def from_descriptor(cls, descriptor: dict[str, Any]) -> Chunk:
        try:
            return cls(path=str(descriptor["path"]), format=str(descriptor["format"]),
                       index=int(descriptor["index"]), count=int(descriptor["count"]),
                       start=int(descriptor["start"]), end=int(descriptor["end"]),
                       header_end=int(descriptor.get("header_end", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ChunkPlanningError(f"not a chunk descriptor: {descriptor!r} ({exc})") from exc


# ------------------------------------------------------------------ record boundaries
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


# ------------------------------------------------------------------ sampling and sizing
@dataclasses.dataclass(frozen=True)
class Sample:
    """What the head of the input says about it."""

    nbytes: int  # sampled input bytes (whole records)
    records: int  # records the boundary scanner counted, blank lines excluded
    max_record: int  # the longest record seen, in bytes
    memory: int  # deep in-memory size of the parsed sample
    parsed_rows: int  # rows the parser returned (plus rows it reported malformed)

    @property
    def expansion(self) -> float:
        return self.memory / self.nbytes if self.nbytes else 1.0

    @property
    def bytes_per_record(self) -> float:
        return self.nbytes / self.records if self.records else 0.0


# parse(bytes of whole records) -> (rows returned + rows reported malformed, deep memory of the frame)
SampleParser = Callable[[bytes], tuple[int, int]]


def take_sample(fh: IO[bytes], start: int, stop: int, sample_bytes: int, budget: int,
                layout: RecordLayout, parse: SampleParser) -> Sample:
    """Parse whole records from ``start`` until at least ``sample_bytes`` are read. Reads at most
    ``budget`` bytes: a record longer than the whole memory budget can never be processed."""
    fh.seek(start)
    data = bytearray()
    records = blank = max_record = 0
    inside = False
    record_start = i = 0
    limit = min(stop - start, budget)
    full = False
    while not full and len(data) < limit:
        block = fh.read(min(BLOCK, limit - len(data)))
        if not block:
            break
        data += block
        while True:
            end, inside = next_record_end(data, i, inside, layout.quotechar)
            if end < 0:
                i = len(data)
                break
            records += 1
            max_record = max(max_record, end - record_start)
            if not data[record_start:end].strip(b"\r\n"):
                blank += 1
            record_start = i = end
            if end >= sample_bytes:
                full = True
                break
    if not full and record_start < len(data) and start + len(data) >= stop and not inside:
        # the last record of the file has no trailing newline
        records += 1
        max_record = max(max_record, len(data) - record_start)
        if not data[record_start:].strip(b"\r\n"):
            blank += 1
        record_start = len(data)
    if records == 0 and len(data):
        if inside and start + len(data) >= stop:
            raise MalformedInputError(
                f"a quoted field opened after byte {start} never closes before the end of the file: an "
                f"unterminated quote. Fix the file, or if quote characters are plain data here, pass "
                f"read_options={{'quoting': csv.QUOTE_NONE}}"
            )
        raise ChunkPlanningError(
            f"no record ends within the first {human_size(len(data))} after byte {start}: one record is "
            f"larger than the whole memory_budget ({human_size(budget)}); raise memory_budget above the "
            f"size of the largest record"
        )
    whole = bytes(data[:record_start])
    rows, memory = parse(whole) if whole else (0, 0)
    return Sample(nbytes=len(whole), records=records - blank, max_record=max_record, memory=memory,
                  parsed_rows=rows)


def chunk_bytes_for(budget: int, overhead: int, expansion: float, work_factor: float) -> int:
    """Input bytes per chunk such that one chunk's peak memory stays within ``budget``."""
    if work_factor < 1:
        raise ChunkPlanningError(f"work_factor={work_factor} must be at least 1 (the DataFrame itself)")
    room = budget - overhead
    if room <= 0:
        hint = ""
        if budget < MIB:
            hint = f" (memory_budget={budget} is in bytes; did you mean '{budget}MiB'?)"
        raise ChunkPlanningError(
            f"memory_budget {human_size(budget)} leaves no room for data after the task's own "
            f"{human_size(overhead)} (interpreter, Airflow, pandas){hint}; raise memory_budget to at "
            f"least {human_size(overhead + 64 * MIB)}"
        )
    return max(1, int(room / (max(expansion, 0.01) * work_factor)))


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    path: str
    format: str
    size: int
    header_end: int
    budget: int
    overhead: int
    work_factor: float
    chunk_bytes: int
    sample: Sample
    chunks: tuple[Chunk, ...]

    def describe(self) -> str:
        return (f"{self.path}: {human_size(self.size)} in {len(self.chunks)} chunk(s) of about "
                f"{human_size(self.chunk_bytes)} input each (memory_budget {human_size(self.budget)}, "
                f"overhead {human_size(self.overhead)}, expansion {self.sample.expansion:.2f}x in memory, "
                f"work factor {self.work_factor:g}, ~{self.sample.bytes_per_record:.0f} bytes/record)")


@dataclasses.dataclass(frozen=True)
class Sizing:
    """The part of a plan that reads only the head of the file."""

    header_end: int
    chunk_bytes: int  # target input bytes per chunk
    max_chunk_bytes: int  # what the budget allows; chunk_bytes is smaller when min_chunks asks for more
    sample: Sample


def size_chunks(*, path: str, fh: IO[bytes], size: int, layout: RecordLayout, header: bool, budget: int,
                overhead: int, work_factor: float, parse: SampleParser, min_chunks: int = 1,
                sample_bytes: int = DEFAULT_SAMPLE_BYTES) -> Sizing:
    h_end = header_end(fh, size, layout, header)
    sample = take_sample(fh, h_end, size, sample_bytes, budget, layout, parse)
    check_sample(path, sample, layout)
    max_chunk_bytes = chunk_bytes_for(budget, overhead, sample.expansion, work_factor)
    if sample.max_record > max_chunk_bytes:
        raise ChunkPlanningError(
            f"{path}: a record of {sample.max_record} bytes does not fit one chunk: memory_budget "
            f"{human_size(budget)} allows {max_chunk_bytes} input bytes per chunk (overhead "
            f"{human_size(overhead)}, expansion {sample.expansion:.2f}x, work factor {work_factor:g}); "
            f"raise memory_budget to at least "
            f"{human_size(overhead + int(sample.max_record * max(sample.expansion, 1) * work_factor) + MIB)}"
        )
    chunk_bytes = max_chunk_bytes
    if min_chunks > 1 and size > h_end:
        chunk_bytes = min(chunk_bytes, max(1, math.ceil((size - h_end) / min_chunks)))
    return Sizing(header_end=h_end, chunk_bytes=chunk_bytes, max_chunk_bytes=max_chunk_bytes, sample=sample)


def check_sample(path: str, sample: Sample, layout: RecordLayout) -> None:
    """The scanner and the parser must agree on how many records the sample holds; if they do not, the
    quote structure is not RFC 4180 and byte-range boundaries would be wrong."""
    if layout.format != "csv" or not layout.quotechar or not sample.records:
        return
    if sample.records != sample.parsed_rows:
        raise MalformedInputError(
            f"{path}: the first {sample.nbytes} bytes hold {sample.records} records by quote-aware "
            f"newline scanning but the CSV parser read {sample.parsed_rows} rows, so the file's quoting "
            f"is not RFC 4180 (a bare quote inside an unquoted field?). Record boundaries cannot be found "
            f"from byte offsets: pass boundary='newline' if no field contains a newline, or "
            f"read_options={{'quoting': csv.QUOTE_NONE}} if quotes are plain data"
        )


def plan_chunks(path: str, fh: IO[bytes], size: int, *, layout: RecordLayout, header: bool, budget: int,
                overhead: int, parse: SampleParser, work_factor: float = DEFAULT_WORK_FACTOR,
                min_chunks: int = 1, max_chunks: int = 1024,
                sample_bytes: int = DEFAULT_SAMPLE_BYTES) -> ChunkPlan:
    """The whole plan: size the chunks from a sample, then one scan for the boundaries."""
    sizing = size_chunks(path=path, fh=fh, size=size, layout=layout, header=header, budget=budget,
                         overhead=overhead, work_factor=work_factor, parse=parse, min_chunks=min_chunks,
                         sample_bytes=sample_bytes)
    h_end, chunk_bytes = sizing.header_end, sizing.chunk_bytes
    ranges: list[tuple[int, int]] = []
    for a, b in record_ranges(fh, h_end, size, chunk_bytes, layout):
        # the record holding byte a + chunk_bytes - 1 ends at b, so it is at least this long
        if b - a - chunk_bytes + 1 > sizing.max_chunk_bytes:
            raise ChunkPlanningError(
                f"{path}: the record ending at byte {b} is longer than {sizing.max_chunk_bytes} bytes, the "
                f"most one chunk may hold under memory_budget {human_size(budget)}; raise memory_budget"
            )
        ranges.append((a, b))
        if len(ranges) > max_chunks:
            raise ChunkPlanningError(
                f"{path} ({human_size(size)}) needs more than max_chunks={max_chunks} chunks of "
                f"{human_size(chunk_bytes)} under memory_budget {human_size(budget)}; raise "
                f"memory_budget, or raise max_chunks (and [core] max_map_length to match)"
            )
    chunks = tuple(Chunk(path=path, format=layout.format, index=i, count=len(ranges), start=a, end=b,
                         header_end=h_end) for i, (a, b) in enumerate(ranges))
    return ChunkPlan(path=path, format=layout.format, size=size, header_end=h_end, budget=budget,
                     overhead=overhead, work_factor=work_factor, chunk_bytes=chunk_bytes,
                     sample=sizing.sample, chunks=chunks)
