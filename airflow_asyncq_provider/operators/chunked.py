"""Chunked, memory-aware operators: stream a big file in one task, or fan its chunks out over the fleet.

``ChunkedFileOperator``
    One task that reads a CSV/JSONL file chunk by chunk, calls ``process(frame, chunk)`` on each and
    folds the results with ``combine(accumulated, result)``. Chunk size comes from ``memory_budget``;
    progress is logged with rows/s, percent done and ETA.

``chunked_fan_out(...)``
    A task group of three steps: ``split`` plans record-aligned byte ranges (descriptors well under
    1 KB each) → ``process``, dynamically mapped over them, each instance asking the fleet for
    ``memory_budget`` through ``executor_config`` and writing DataFrame results as Parquet parts →
    ``combine`` folds the parts in chunk order. XCom carries only descriptors, paths and small values.

Adaptive retry: a ``process`` try that dies of memory (killed by the worker's memory watchdog, by the
kernel's OOM killer, or raising MemoryError) leaves an attempt marker without an end; the next try sees
it and processes the chunk as 2 (then 4, …) record-aligned pieces in sequence, so it needs half the
memory instead of failing the same way again. See ``results.Attempts`` and docs/OPERATORS.md.

pandas and pyarrow are imported inside ``execute`` only (the ``data`` extra).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, TaskGroup

from airflow_asyncq_provider.memory.sizes import parse_size
from airflow_asyncq_provider.operators import chunking, reading, results, storage
from airflow_asyncq_provider.operators.chunking import Chunk, RecordLayout, human_size
from airflow_asyncq_provider.operators.errors import ChunkingError, ChunkPlanningError
from airflow_asyncq_provider.operators.progress import Progress, current_rss, peak_rss

if TYPE_CHECKING:
    from airflow.sdk import Context

ProcessFn = Callable[[Any, Chunk], Any]
CombineFn = Callable[[Any, Any], Any]
MAX_PIECES = 64
MIB = 1024**2


# ------------------------------------------------------------------ shared helpers
def memory_budget_bytes(value: Any, what: str) -> int:
    """``memory_budget`` in bytes; a plain number under 1 MiB is almost surely a unit mistake."""
    size = parse_size(value, what)
    if size < MIB:
        raise ChunkPlanningError(
            f"{what}: {value!r} is {size} bytes, too small for any chunk task; sizes without a unit are "
            f"bytes, so write e.g. '{value}MiB' or '{value}GiB'"
        )
    return size


def resolve_overhead(value: Any, what: str) -> int:
    """``"auto"``: this process' resident memory with pandas and pyarrow imported, i.e. what a task
    holds before it reads any data. Otherwise a human size."""
    if value == "auto":
        import pandas  # noqa: F401  (counted in the overhead, as in every chunk task)
        import pyarrow  # noqa: F401

        return max(current_rss(), chunking.MIN_OVERHEAD)
    return parse_size(value, what)


def size_str(size: int) -> str:
    """A byte count as the ``NNNMiB`` string executor_config expects (rounded up)."""
    return f"{math.ceil(size / MIB)}MiB"


def memory_executor_config(request: int, limit: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``executor_config`` asking the fleet for ``request`` bytes with a hard ``limit``; the caller's
    own ``asyncq`` keys win."""
    config = dict(base or {})
    asyncq = {"memory_request": size_str(request), "memory_limit": size_str(limit)}
    asyncq.update(config.get("asyncq") or {})
    config["asyncq"] = asyncq
    return config


def work_dir_for(output_dir: str | None, context: Context, name: str) -> str:
    if output_dir:
        return output_dir
    return storage.default_work_dir(context["dag"].dag_id, context["run_id"], name)


def _apply(process: ProcessFn | None, frame: Any, chunk: Chunk) -> Any:
    return frame if process is None else process(frame, chunk)


@dataclasses.dataclass
class _Reader:
    """Everything needed to read chunks of one input: layout, columns, parsing options."""

    layout: RecordLayout
    header: bool
    names: list[str] | None
    read_options: dict[str, Any]
    on_bad_rows: str

    @classmethod
    def build(cls, *, file_format: str, header: bool, names: Sequence[str] | None,
              read_options: dict[str, Any] | None, boundary: str, on_bad_rows: str) -> _Reader:
        options = reading.validate_read_options(read_options, file_format)
        return cls(layout=RecordLayout.for_input(file_format, options, boundary),
                   header=header if file_format == "csv" else False,
                   names=list(names) if names else None, read_options=options,
                   on_bad_rows=reading.check_on_bad_rows(on_bad_rows))

    def columns(self, fh: Any, header_end: int) -> list[str] | None:
        return self.names or reading.read_columns(fh, header_end, self.read_options)

    def sample_parser(self, columns: list[str] | None) -> chunking.SampleParser:
        return reading.sample_parser(file_format=self.layout.format, columns=columns,
                                     read_options=self.read_options)

    def read(self, fh: Any, chunk: Chunk, columns: list[str] | None) -> reading.ChunkFrame:
        return reading.read_chunk(fh, chunk, columns=columns, read_options=self.read_options,
                                  on_bad_rows=self.on_bad_rows)


class _Tally:
    def __init__(self) -> None:
        self.rows = 0
        self.bad_rows = 0
        self.bad_examples: list[str] = []

    def add(self, rows: int, bad_rows: int, examples: Sequence[str], where: str = "") -> None:
        self.rows += rows
        self.bad_rows += bad_rows
        for example in examples:
            if len(self.bad_examples) < reading.MAX_EXAMPLES:
                self.bad_examples.append(f"{where}: {example}" if where else example)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "bad_rows": self.bad_rows, "bad_examples": self.bad_examples}


# ------------------------------------------------------------------ one task, streaming
class ChunkedFileOperator(BaseOperator):
    """Stream a CSV or JSONL file through ``process`` chunk by chunk in one task, within a memory budget.

    Each chunk is a record-aligned byte range sized so that one chunk's DataFrame and the work on it
    fit ``memory_budget``; after each chunk the task checks its resident memory and halves the chunk
    size if it went over. The results are folded with ``combine(accumulated, result)`` as they come,
    so ``combine`` should reduce (sums, counts, top-k), not concatenate everything.

    Without ``combine``, DataFrame results are written as Parquet parts under ``output_dir`` and the
    return value lists them. A DataFrame fold result is written as ``<output_dir>/result.parquet``
    and the return value is ``{"parquet": path, "rows": n, "columns": [...]}``; anything else is
    returned as is (it must be small JSON). Row counts and malformed rows are pushed as XCom ``stats``.

    :param path: CSV or JSONL file, local or an object storage URL (templated)
    :param memory_budget: memory for this task, a human size like ``"512MiB"`` (templated)
    :param process: ``process(frame, chunk) -> result``; default: the frame itself
    :param combine: ``combine(accumulated, result) -> accumulated``; default: keep each result as a part
    :param file_format: ``"csv"`` or ``"jsonl"``
    :param header: the CSV's first record is the header
    :param names: column names (instead of, or in the absence of, the header)
    :param read_options: extra ``pandas.read_csv`` options (``sep``, ``dtype``, ``encoding``,
        ``usecols``, ``quotechar``, ``quoting``, ``na_values`` …); ``dtype`` also defines malformed values
        (templated)
    :param boundary: ``"quoted"`` (exact CSV quote-aware boundaries) or ``"newline"``
    :param on_bad_rows: ``"fail"`` (default) or ``"skip"`` to count and drop malformed rows
    :param output_dir: where Parquet outputs go; default a per-run directory under the temp dir (templated)
    :param overhead: memory the task uses before reading data; ``"auto"`` measures it
    :param work_factor: peak memory of one chunk's life per byte of its DataFrame
    :param progress_interval: seconds between progress log lines
    """

    template_fields: Sequence[str] = ("path", "memory_budget", "read_options", "output_dir")
    ui_color = "#e8f4ea"

    def __init__(self, *, path: str, memory_budget: str | int, process: ProcessFn | None = None,
                 combine: CombineFn | None = None, file_format: str = "csv", header: bool = True,
                 names: Sequence[str] | None = None, read_options: dict[str, Any] | None = None,
                 boundary: str = "quoted", on_bad_rows: str = "fail", output_dir: str | None = None,
                 overhead: str | int = "auto", work_factor: float = chunking.DEFAULT_WORK_FACTOR,
                 sample_bytes: int = chunking.DEFAULT_SAMPLE_BYTES, progress_interval: float = 10.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.memory_budget = memory_budget
        self.process = process
        self.combine = combine
        self.file_format = file_format
        self.header = header
        self.names = list(names) if names else None
        self.read_options = dict(read_options or {})
        self.boundary = boundary
        self.on_bad_rows = on_bad_rows
        self.output_dir = output_dir
        self.overhead = overhead
        self.work_factor = work_factor
        self.sample_bytes = sample_bytes
        self.progress_interval = progress_interval
        if not _is_template(memory_budget):
            memory_budget_bytes(memory_budget, f"{self.task_id}: memory_budget")

    def execute(self, context: Context) -> Any:
        what = f"{self.task_id}: memory_budget"
        budget = memory_budget_bytes(self.memory_budget, what)
        reader = _Reader.build(file_format=self.file_format, header=self.header, names=self.names,
                               read_options=self.read_options, boundary=self.boundary,
                               on_bad_rows=self.on_bad_rows)
        overhead = resolve_overhead(self.overhead, f"{self.task_id}: overhead")
        work_dir = work_dir_for(self.output_dir, context, self.task_id)
        size = storage.input_size(self.path)
        tally = _Tally()
        outputs: list[dict[str, Any]] = []
        acc: Any = None
        folded = 0
        with storage.open_input(self.path) as fh:
            columns = reader.columns(fh, chunking.header_end(fh, size, reader.layout, reader.header))
            sizing = chunking.size_chunks(
                path=self.path, fh=fh, size=size, layout=reader.layout, header=reader.header, budget=budget,
                overhead=overhead, work_factor=self.work_factor, sample_bytes=self.sample_bytes,
                parse=reader.sample_parser(columns))
            h_end, chunk_bytes, sample = sizing.header_end, sizing.chunk_bytes, sizing.sample
            self.log.info("Streaming %s (%s) in chunks of about %s input: memory_budget %s, overhead %s, "
                          "expansion %.2fx, work factor %g, ~%.0f bytes/record", self.path,
                          human_size(size), human_size(chunk_bytes), human_size(budget),
                          human_size(overhead), sample.expansion, self.work_factor,
                          sample.bytes_per_record)
            progress = Progress(self.log, total_bytes=size - h_end, interval=self.progress_interval)
            start, index = h_end, 0
            while start < size:
                end = chunking.find_record_end(fh, start, start + chunk_bytes - 1, size, reader.layout)
                if end - start - chunk_bytes + 1 > sizing.max_chunk_bytes:
                    raise ChunkPlanningError(
                        f"{self.path}: the record ending at byte {end} is longer than "
                        f"{sizing.max_chunk_bytes} bytes, the most one chunk may hold under memory_budget "
                        f"{human_size(budget)}; raise memory_budget")
                chunk = Chunk(path=self.path, format=reader.layout.format, index=index, count=0,
                              start=start, end=end, header_end=h_end)
                part = reader.read(fh, chunk, columns)
                tally.add(part.rows, part.bad_rows, part.bad_examples, chunk.label)
                result = _apply(self.process, part.frame, chunk)
                del part
                if self.combine is None:
                    outputs.append(results.store(result, storage.join(work_dir, "parts", f"part-{index:05d}"),
                                                 f"{self.task_id}: process on chunk {index + 1}"))
                else:
                    try:
                        acc = result if folded == 0 else self.combine(acc, result)
                    except Exception:
                        self._keep_partial(acc, work_dir, chunk, folded)
                        raise
                    folded += 1
                del result
                start, index = end, index + 1
                progress.update(start - h_end, tally.rows, index)
                chunk_bytes = self._adapt(chunk_bytes, budget, sample.max_record)
            progress.update(size - h_end, tally.rows, index, final=True)
        self._report_bad_rows(tally)
        stats = {**tally.as_dict(), "chunks": index, "bytes": size, "peak_rss": peak_rss(),
                 "budget": budget}
        context["ti"].xcom_push(key="stats", value=stats)
        if self.combine is None:
            return {"parts": [o["parquet"] for o in outputs if "parquet" in o],
                    "values": [o["value"] for o in outputs if "value" in o]}
        return results.publish(acc, work_dir, "result", f"{self.task_id}: combine")

    def _adapt(self, chunk_bytes: int, budget: int, max_record: int) -> int:
        if current_rss() <= budget or chunk_bytes <= 2 * max(max_record, 1):
            return chunk_bytes
        gc.collect()  # about 0.1 s with Airflow loaded: only when memory is already over
        rss = current_rss()
        if rss <= budget:
            return chunk_bytes
        self.log.warning("Resident memory %s is over memory_budget %s after a chunk; halving the chunk size "
                         "to %s", human_size(rss), human_size(budget), human_size(chunk_bytes // 2))
        return chunk_bytes // 2

    def _keep_partial(self, acc: Any, work_dir: str, chunk: Chunk, folded: int) -> None:
        kept = ""
        if acc is not None:
            try:
                output = results.store(acc, storage.join(work_dir, "partial-accumulated"), "partial result")
                kept = f"; the result folded so far is kept at {output.get('parquet', output)}"
            except Exception:  # keep the user's error as the one that fails the task
                self.log.exception("Could not keep the partial result")
        self.log.error("combine raised on %s after folding %d result(s)%s", chunk.label, folded, kept)

    def _report_bad_rows(self, tally: _Tally) -> None:
        if tally.bad_rows:
            self.log.warning("Skipped %d malformed row(s) of %d read (on_bad_rows='skip'); first: %s",
                             tally.bad_rows, tally.rows + tally.bad_rows, "; ".join(tally.bad_examples))


# ------------------------------------------------------------------ fan-out: split → process → combine
class ChunkSplitOperator(BaseOperator):
    """Plan the chunks of a file: returns one small descriptor per record-aligned byte range.

    An empty input (or a header only) gives one empty chunk, so the mapped step and ``combine`` still
    run and produce an empty result instead of being skipped.

    :param path: CSV or JSONL file, local or an object storage URL (templated)
    :param min_chunks: cut into at least this many chunks, for parallelism (templated)
    :param max_chunks: refuse plans with more chunks (keep it ≤ ``[core] max_map_length``)
    """

    template_fields: Sequence[str] = ("path", "read_options", "min_chunks")
    ui_color = "#fdf2d0"

    def __init__(self, *, path: str, memory_budget: str | int, file_format: str = "csv", header: bool = True,
                 names: Sequence[str] | None = None, read_options: dict[str, Any] | None = None,
                 boundary: str = "quoted", overhead: str | int = "auto",
                 work_factor: float = chunking.DEFAULT_WORK_FACTOR, min_chunks: int | str = 1,
                 max_chunks: int = 1024, sample_bytes: int = chunking.DEFAULT_SAMPLE_BYTES,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.memory_budget = memory_budget
        self.budget = memory_budget_bytes(memory_budget, f"{self.task_id}: memory_budget")
        self.file_format = file_format
        self.header = header
        self.names = list(names) if names else None
        self.read_options = dict(read_options or {})
        self.boundary = boundary
        self.overhead = overhead
        self.work_factor = work_factor
        self.min_chunks = min_chunks
        self.max_chunks = max_chunks
        self.sample_bytes = sample_bytes

    def execute(self, context: Context) -> list[dict[str, Any]]:
        reader = _Reader.build(file_format=self.file_format, header=self.header, names=self.names,
                               read_options=self.read_options, boundary=self.boundary, on_bad_rows="skip")
        overhead = resolve_overhead(self.overhead, f"{self.task_id}: overhead")
        try:
            min_chunks = max(1, int(self.min_chunks))
        except (TypeError, ValueError) as exc:
            raise ChunkPlanningError(
                f"{self.task_id}: min_chunks={self.min_chunks!r} is not a number") from exc
        size = storage.input_size(self.path)
        with storage.open_input(self.path) as fh:
            h_end = chunking.header_end(fh, size, reader.layout, reader.header)
            columns = reader.columns(fh, h_end)
            plan = chunking.plan_chunks(
                self.path, fh, size, layout=reader.layout, header=reader.header, budget=self.budget,
                overhead=overhead, parse=reader.sample_parser(columns), work_factor=self.work_factor,
                min_chunks=min_chunks, max_chunks=self.max_chunks, sample_bytes=self.sample_bytes)
        self.log.info("Plan: %s", plan.describe())
        chunks = plan.chunks or (Chunk(path=self.path, format=reader.layout.format, index=0, count=1,
                                       start=plan.header_end, end=plan.header_end,
                                       header_end=plan.header_end),)
        if not plan.chunks:
            self.log.info("The input holds no records; mapping one empty chunk so the result is empty")
        descriptors = [c.to_descriptor() for c in chunks]
        context["ti"].xcom_push(key="plan", value={
            "size": size, "chunks": len(chunks), "chunk_bytes": plan.chunk_bytes, "budget": self.budget,
            "overhead": overhead, "expansion": round(plan.sample.expansion, 3),
            "bytes_per_record": round(plan.sample.bytes_per_record, 1)})
        return descriptors


class ChunkProcessOperator(BaseOperator):
    """Read one chunk, call ``process(frame, chunk)``, store the result (mapped over descriptors).

    DataFrame results are written as ``<output_dir>/parts/part-<chunk>-t<try>-p<piece>.parquet``; the
    return value is a small record with the paths (or small values), row counts and malformed rows.

    Adaptive retry: before reading, the task looks at the attempt markers of earlier tries of this
    chunk; each try that died of memory doubles the number of record-aligned pieces this try processes
    one after another (up to 64). Give the task ``retries`` for this to help.

    :param chunk: a descriptor from ``ChunkSplitOperator`` (usually through ``.expand(chunk=...)``)
    :param output_dir: shared directory for parts and attempt markers (templated)
    """

    template_fields: Sequence[str] = ("chunk", "read_options", "output_dir")
    ui_color = "#dbe9f6"

    def __init__(self, *, chunk: dict[str, Any], process: ProcessFn | None = None,
                 names: Sequence[str] | None = None, read_options: dict[str, Any] | None = None,
                 boundary: str = "quoted", on_bad_rows: str = "fail", output_dir: str | None = None,
                 work_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunk = chunk
        self.process = process
        self.names = list(names) if names else None
        self.read_options = dict(read_options or {})
        self.boundary = boundary
        self.on_bad_rows = on_bad_rows
        self.output_dir = output_dir
        self.work_name = work_name

    def execute(self, context: Context) -> dict[str, Any]:
        chunk = Chunk.from_descriptor(self.chunk)
        reader = _Reader.build(file_format=chunk.format, header=chunk.header_end > 0, names=self.names,
                               read_options=self.read_options, boundary=self.boundary,
                               on_bad_rows=self.on_bad_rows)
        work_dir = work_dir_for(self.output_dir, context, self.work_name or self.task_id)
        try_number = int(context["ti"].try_number)
        attempts = results.Attempts(work_dir, chunk.index)
        pieces = self._pieces(attempts, try_number, chunk)
        try:
            attempts.mark(try_number, "running", pieces=pieces)
        except OSError:
            self.log.warning("Could not write the attempt marker under %s; a memory kill of this try will "
                             "not be recognised by the next one", work_dir, exc_info=True)
        try:
            record = self._run(chunk, reader, work_dir, try_number, pieces)
        except MemoryError:
            self._mark(attempts, try_number, "memory", pieces)
            self.log.error("MemoryError on %s in %d piece(s); the next try splits it further", chunk.label,
                           pieces)
            raise
        except BaseException as exc:
            self._mark(attempts, try_number, "error", pieces, error=f"{type(exc).__name__}: {exc}"[:500])
            raise
        self._mark(attempts, try_number, "success", pieces)
        return record

    def _mark(self, attempts: results.Attempts, try_number: int, status: str, pieces: int,
              **fields: Any) -> None:
        try:
            attempts.mark(try_number, status, pieces=pieces, **fields)
        except OSError:
            self.log.warning("Could not update the attempt marker", exc_info=True)

    def _pieces(self, attempts: results.Attempts, try_number: int, chunk: Chunk) -> int:
        if try_number <= 1:
            return 1
        try:
            history = attempts.history(try_number)
        except OSError:
            self.log.warning("Attempt markers unreadable; assuming every earlier try failed on memory",
                             exc_info=True)
            return min(2 ** (try_number - 1), MAX_PIECES)
        failures = [r for r in history if r.get("status") in ("running", "memory")]
        for record in history:
            how = {"running": "ended without reporting back (killed: memory limit exceeded, OOM killer or a "
                              "lost worker)", "memory": "raised MemoryError"}.get(record.get("status", ""),
                                                                                   record.get("status", ""))
            self.log.info("Earlier try %s of %s in %s piece(s): %s", record.get("try"), chunk.label,
                          record.get("pieces", 1), how)
        if not failures:
            return 1
        pieces = min(2 ** len(failures), MAX_PIECES)
        self.log.warning("Adaptive retry: %d earlier tr%s of this chunk died of memory; processing it as %d "
                         "record-aligned pieces, one after another", len(failures),
                         "y" if len(failures) == 1 else "ies", pieces)
        return pieces

    def _run(self, chunk: Chunk, reader: _Reader, work_dir: str, try_number: int,
             pieces: int) -> dict[str, Any]:
        tally = _Tally()
        outputs: list[dict[str, Any]] = []
        with storage.open_input(chunk.path) as fh:
            columns = reader.columns(fh, chunk.header_end)
            parts = chunking.split_chunk(fh, chunk, pieces, reader.layout)
            if pieces > 1 and len(parts) < 2:
                raise ChunkPlanningError(
                    f"{chunk.label} died of memory before but cannot be split: it is one record of "
                    f"{chunk.length} bytes. Raise memory_budget / memory_limit")
            self.log.info("Processing %s of %s%s", chunk.label, chunk.path,
                          f" as {len(parts)} pieces" if len(parts) > 1 else "")
            for part in parts:
                if part.length == 0:
                    continue
                frame = reader.read(fh, part, columns)
                tally.add(frame.rows, frame.bad_rows, frame.bad_examples, part.label)
                result = _apply(self.process, frame.frame, part)
                del frame
                name = f"part-{chunk.index:05d}-t{try_number:02d}-p{part.piece:03d}"
                outputs.append(results.store(result, storage.join(work_dir, "parts", name),
                                             f"process on {part.label}"))
                del result
                if len(parts) > 1:
                    gc.collect()  # a split retry is short of memory: free the piece before the next
        if tally.bad_rows:
            self.log.warning("%s: skipped %d malformed row(s); first: %s", chunk.label, tally.bad_rows,
                             "; ".join(tally.bad_examples))
        self.log.info("%s: %d rows, peak RSS %s", chunk.label, tally.rows, human_size(peak_rss()))
        return {"index": chunk.index, "count": chunk.count, "pieces": len(parts), "outputs": outputs,
                **tally.as_dict()}


class ChunkCombineOperator(BaseOperator):
    """Fold the chunk results in chunk order with ``combine(accumulated, result)``.

    Parquet parts are loaded one at a time, so memory holds the accumulator and one part. If ``combine``
    raises, the task fails with that traceback and every part stays where it is: fix ``combine`` and
    clear only this task. Without ``combine`` the return value is the manifest (part paths and values).

    :param results: the mapped process step's output (templated, so an XComArg resolves)
    :param output_dir: where the combined Parquet file goes (templated)
    """

    template_fields: Sequence[str] = ("results", "output_dir")
    ui_color = "#e6def5"

    def __init__(self, *, results: Any, combine: CombineFn | None = None, output_dir: str | None = None,
                 work_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.results = results
        self.combine = combine
        self.output_dir = output_dir
        self.work_name = work_name

    def execute(self, context: Context) -> Any:
        records = sorted(_materialize(self.results), key=lambda r: int(r["index"]))
        self._check_complete(records)
        work_dir = work_dir_for(self.output_dir, context, self.work_name or self.task_id)
        tally = _Tally()
        for r in records:
            tally.add(int(r.get("rows", 0)), int(r.get("bad_rows", 0)), r.get("bad_examples", []))
        outputs = [o for r in records for o in r.get("outputs", [])]
        stats = {**tally.as_dict(), "chunks": len(records), "outputs": len(outputs),
                 "pieces": sum(int(r.get("pieces", 1)) for r in records)}
        context["ti"].xcom_push(key="stats", value=stats)
        if tally.bad_rows:
            self.log.warning("%d malformed row(s) were skipped across %d chunks; first: %s", tally.bad_rows,
                             len(records), "; ".join(tally.bad_examples))
        self.log.info("Combining %d output(s) of %d chunk(s): %d rows", len(outputs), len(records),
                      tally.rows)
        if self.combine is None:
            return {"parts": [o["parquet"] for o in outputs if "parquet" in o],
                    "values": [o["value"] for o in outputs if "value" in o], "rows": tally.rows}
        acc: Any = None
        for n, output in enumerate(outputs):
            value = results.load(output)
            if n == 0:
                acc = value
                continue
            try:
                acc = self.combine(acc, value)
            except Exception:
                self.log.error("combine raised while folding output %d of %d (%s); all chunk outputs are "
                               "kept under %s. Fix combine and clear only this task to redo the fold", n + 1,
                               len(outputs), output.get("parquet", "a value"), work_dir)
                raise
        return results.publish(acc, work_dir, "combined", f"{self.task_id}: combine")

    @staticmethod
    def _check_complete(records: list[dict[str, Any]]) -> None:
        if not records:
            raise ChunkingError("combine received no chunk results; did the split step map zero chunks?")
        count = int(records[0].get("count", len(records)))
        seen = [int(r["index"]) for r in records]
        missing = sorted(set(range(count)) - set(seen))
        if missing or len(seen) != count:
            raise ChunkingError(f"chunk results are incomplete: {len(seen)} of {count}, missing chunk(s) "
                                f"{[m + 1 for m in missing]}; clear the process step for them")


@dataclasses.dataclass(frozen=True)
class ChunkedFanOut:
    """What ``chunked_fan_out`` built. Use ``group`` for dependencies (``a >> fan.group >> b``) and
    ``output`` for the combined result (passing it to a task makes that task depend on ``combine``)."""

    group: TaskGroup
    split: ChunkSplitOperator
    process: Any  # a MappedOperator
    combine: ChunkCombineOperator

    @property
    def output(self) -> Any:
        return self.combine.output


def chunked_fan_out(*, group_id: str, path: str, memory_budget: str | int, process: ProcessFn | None = None,
                    combine: CombineFn | None = None, file_format: str = "csv", header: bool = True,
                    names: Sequence[str] | None = None, read_options: dict[str, Any] | None = None,
                    boundary: str = "quoted", on_bad_rows: str = "fail", output_dir: str | None = None,
                    min_chunks: int | str = 1, max_chunks: int = 1024,
                    memory_limit: str | int | None = None, overhead: str | int = "auto",
                    work_factor: float = chunking.DEFAULT_WORK_FACTOR, queue: str | None = None,
                    process_retries: int = 2,
                    process_retry_delay: datetime.timedelta = datetime.timedelta(seconds=5),
                    max_active_tis_per_dagrun: int | None = None, tooltip: str = "") -> ChunkedFanOut:
    """Build split → mapped process → combine in a task group (see the module docstring).

    ``memory_budget`` is not templated: the scheduler must know each chunk task's memory request before
    it runs. Every step asks for ``memory_budget``; the chunk tasks get ``memory_limit`` (default 1.5×
    the budget) as their hard limit.
    """
    budget = memory_budget_bytes(memory_budget, f"chunked_fan_out(group_id={group_id!r}): memory_budget")
    limit = (parse_size(memory_limit, f"chunked_fan_out(group_id={group_id!r}): memory_limit")
             if memory_limit is not None else int(budget * 1.5))
    if limit < budget:
        raise ChunkPlanningError(f"chunked_fan_out(group_id={group_id!r}): memory_limit {human_size(limit)} "
                                 f"is below memory_budget {human_size(budget)}")
    # fail at parse time, not in the first task
    reading.validate_read_options(read_options, file_format)
    reading.check_on_bad_rows(on_bad_rows)
    RecordLayout.for_input(file_format, read_options, boundary)
    common: dict[str, Any] = {"queue": queue} if queue else {}
    config = memory_executor_config(budget, limit)
    tooltip = tooltip or f"chunked fan-out within {human_size(budget)}"
    with TaskGroup(group_id=group_id, tooltip=tooltip) as tg:
        split = ChunkSplitOperator(
            task_id="split", path=path, memory_budget=budget, file_format=file_format, header=header,
            names=names, read_options=read_options, boundary=boundary, overhead=overhead,
            work_factor=work_factor, min_chunks=min_chunks, max_chunks=max_chunks, executor_config=config,
            **common)
        mapped = ChunkProcessOperator.partial(
            task_id="process", process=process, names=names, read_options=read_options, boundary=boundary,
            on_bad_rows=on_bad_rows, output_dir=output_dir, work_name=group_id, retries=process_retries,
            retry_delay=process_retry_delay, executor_config=config,
            max_active_tis_per_dagrun=max_active_tis_per_dagrun, **common,
        ).expand(chunk=split.output)
        fold = ChunkCombineOperator(task_id="combine", results=mapped.output, combine=combine,
                                    output_dir=output_dir, work_name=group_id, executor_config=config,
                                    **common)
    return ChunkedFanOut(group=tg, split=split, process=mapped, combine=fold)


def _materialize(values: Any) -> list[dict[str, Any]]:
    """The mapped step's results as a list. Indexing up to ``len`` instead of iterating, because
    iterating a lazy XCom sequence probes one past the end and logs an "XCom not found" error."""
    if isinstance(values, (list, tuple)):
        return [dict(v) for v in values]
    return [dict(values[i]) for i in range(len(values))]


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value
