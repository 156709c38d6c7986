"""Chunk planning: how many bytes per chunk fit a memory budget, and the plan of a whole file.

A sample from the head of the file is parsed with the same reader the chunk tasks use, which gives
bytes per record and the *expansion*: in-memory bytes of the DataFrame per byte of input. Then::

    chunk_bytes = (memory_budget - overhead) / (expansion * work_factor)

``overhead`` is what the task process holds before it reads any data (interpreter, Airflow's task
runner, pandas and pyarrow; measured in the planning process by default), and ``work_factor`` is the
peak-to-DataFrame ratio of one chunk's life: the parser's buffers, the ``process`` callable's copies and
the Parquet conversion. A budget that leaves room for less than one record is an error that names the
size to ask for.

Where a chunk may start and end is ``boundaries``' question; the plan cuts the file there in one
sequential scan. The sample doubles as a check of the file's quoting: the scanner and the parser must
count the same records in it (``check_sample``).

Nothing here imports pandas: parsing the sample is a function passed in (``reading.sample_parser``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import IO

from airflow_asyncq_provider.operators.boundaries import (
    BLOCK,
    RecordLayout,
    header_end,
    next_record_end,
    record_ranges,
)
from airflow_asyncq_provider.operators.chunk import Chunk
from airflow_asyncq_provider.operators.errors import ChunkPlanningError, MalformedInputError
from airflow_asyncq_provider.sizes import MIB, format_size

DEFAULT_WORK_FACTOR = 3.0
DEFAULT_SAMPLE_BYTES = MIB
MIN_OVERHEAD = 64 * MIB


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
            f"no record ends within the first {format_size(len(data))} after byte {start}: one record is "
            f"larger than the whole memory_budget ({format_size(budget)}); raise memory_budget above the "
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
            f"memory_budget {format_size(budget)} leaves no room for data after the task's own "
            f"{format_size(overhead)} (interpreter, Airflow, pandas){hint}; raise memory_budget to at "
            f"least {format_size(overhead + 64 * MIB)}"
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
        return (f"{self.path}: {format_size(self.size)} in {len(self.chunks)} chunk(s) of about "
                f"{format_size(self.chunk_bytes)} input each (memory_budget {format_size(self.budget)}, "
                f"overhead {format_size(self.overhead)}, expansion {self.sample.expansion:.2f}x in memory, "
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
            f"{format_size(budget)} allows {max_chunk_bytes} input bytes per chunk (overhead "
            f"{format_size(overhead)}, expansion {sample.expansion:.2f}x, work factor {work_factor:g}); "
            f"raise memory_budget to at least "
            f"{format_size(overhead + int(sample.max_record * max(sample.expansion, 1) * work_factor) + MIB)}"
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


def check_record_fits(path: str, start: int, end: int, *, chunk_bytes: int, max_chunk_bytes: int,
                      budget: int) -> None:
    """Refuse the range ``[start, end)``, cut for ``chunk_bytes``, when its last record is longer than
    one chunk may hold. The sample cannot see every record: this is the check for the rest of the file.

    The range ends at the end of the record holding byte ``start + chunk_bytes - 1``, so that record is
    at least ``end - start - chunk_bytes + 1`` bytes long.
    """
    if end - start - chunk_bytes + 1 > max_chunk_bytes:
        raise ChunkPlanningError(
            f"{path}: the record ending at byte {end} is longer than {max_chunk_bytes} bytes, the most one "
            f"chunk may hold under memory_budget {format_size(budget)}; raise memory_budget"
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
        check_record_fits(path, a, b, chunk_bytes=chunk_bytes, max_chunk_bytes=sizing.max_chunk_bytes,
                          budget=budget)
        ranges.append((a, b))
        if len(ranges) > max_chunks:
            raise ChunkPlanningError(
                f"{path} ({format_size(size)}) needs more than max_chunks={max_chunks} chunks of "
                f"{format_size(chunk_bytes)} under memory_budget {format_size(budget)}; raise "
                f"memory_budget, or raise max_chunks (and [core] max_map_length to match)"
            )
    chunks = tuple(Chunk(path=path, format=layout.format, index=i, count=len(ranges), start=a, end=b,
                         header_end=h_end) for i, (a, b) in enumerate(ranges))
    return ChunkPlan(path=path, format=layout.format, size=size, header_end=h_end, budget=budget,
                     overhead=overhead, work_factor=work_factor, chunk_bytes=chunk_bytes,
                     sample=sizing.sample, chunks=chunks)
