"""The process step of a fan-out: read one chunk, call ``process`` on it, and store the result.

Adaptive retry: a try that dies of memory (killed by the worker's memory watchdog, by the kernel's OOM
killer, or raising MemoryError) leaves an attempt marker without an end (``results.Attempts``); the
next try sees it and processes the chunk as 2 (then 4, …) record-aligned pieces in sequence, so it
needs half the memory instead of failing the same way again. See docs/OPERATORS.md.

pandas and pyarrow are imported inside ``execute`` only (the ``data`` extra).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_asyncq_provider.operators import boundaries, results, storage
from airflow_asyncq_provider.operators.chunk import Chunk
from airflow_asyncq_provider.operators.errors import ChunkPlanningError
from airflow_asyncq_provider.operators.hooks import ProcessFn, apply_process
from airflow_asyncq_provider.operators.progress import peak_rss
from airflow_asyncq_provider.operators.reading import InputReader, RowTally
from airflow_asyncq_provider.sizes import format_size

if TYPE_CHECKING:
    from airflow.sdk import Context

MAX_PIECES = 64


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
        reader = InputReader.build(file_format=chunk.format, header=chunk.header_end > 0, names=self.names,
                               read_options=self.read_options, boundary=self.boundary,
                               on_bad_rows=self.on_bad_rows)
        work_dir = storage.work_dir_for(self.output_dir, context, self.work_name or self.task_id)
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

    def _run(self, chunk: Chunk, reader: InputReader, work_dir: str, try_number: int,
             pieces: int) -> dict[str, Any]:
        tally = RowTally()
        outputs: list[dict[str, Any]] = []
        with storage.open_input(chunk.path) as fh:
            columns = reader.columns(fh, chunk.header_end)
            parts = boundaries.split_chunk(fh, chunk, pieces, reader.layout)
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
                result = apply_process(self.process, frame.frame, part)
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
        self.log.info("%s: %d rows, peak RSS %s", chunk.label, tally.rows, format_size(peak_rss()))
        return {"index": chunk.index, "count": chunk.count, "pieces": len(parts), "outputs": outputs,
                **tally.as_dict()}
