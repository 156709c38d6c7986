"""One task that streams a big CSV or JSONL file through ``process`` chunk by chunk, within a memory budget.

The chunk size comes from ``memory_budget`` (see ``chunking``); after each chunk the task checks its
resident memory and halves the chunk size if it went over. The results are folded with
``combine(accumulated, result)`` as they come, and progress is logged with rows/s, percent done and ETA.
For a file that should be spread over the fleet instead, see ``fan_out``.

pandas and pyarrow are imported inside ``execute`` only (the ``data`` extra).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_asyncq_provider.operators import boundaries, chunking, results, storage
from airflow_asyncq_provider.operators.budget import memory_budget_bytes, resolve_overhead
from airflow_asyncq_provider.operators.chunk import Chunk
from airflow_asyncq_provider.operators.hooks import CombineFn, ProcessFn, apply_process
from airflow_asyncq_provider.operators.progress import Progress, current_rss, peak_rss
from airflow_asyncq_provider.operators.reading import InputReader, RowTally
from airflow_asyncq_provider.sizes import format_size

if TYPE_CHECKING:
    from airflow.sdk import Context


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
        reader = InputReader.build(file_format=self.file_format, header=self.header, names=self.names,
                               read_options=self.read_options, boundary=self.boundary,
                               on_bad_rows=self.on_bad_rows)
        overhead = resolve_overhead(self.overhead, f"{self.task_id}: overhead")
        work_dir = storage.work_dir_for(self.output_dir, context, self.task_id)
        size = storage.input_size(self.path)
        tally = RowTally()
        outputs: list[dict[str, Any]] = []
        acc: Any = None
        folded = 0
        with storage.open_input(self.path) as fh:
            columns = reader.columns(fh, boundaries.header_end(fh, size, reader.layout, reader.header))
            sizing = chunking.size_chunks(
                path=self.path, fh=fh, size=size, layout=reader.layout, header=reader.header, budget=budget,
                overhead=overhead, work_factor=self.work_factor, sample_bytes=self.sample_bytes,
                parse=reader.sample_parser(columns))
            h_end, chunk_bytes, sample = sizing.header_end, sizing.chunk_bytes, sizing.sample
            self.log.info("Streaming %s (%s) in chunks of about %s input: memory_budget %s, overhead %s, "
                          "expansion %.2fx, work factor %g, ~%.0f bytes/record", self.path,
                          format_size(size), format_size(chunk_bytes), format_size(budget),
                          format_size(overhead), sample.expansion, self.work_factor,
                          sample.bytes_per_record)
            progress = Progress(self.log, total_bytes=size - h_end, interval=self.progress_interval)
            start, index = h_end, 0
            while start < size:
                end = boundaries.find_record_end(fh, start, start + chunk_bytes - 1, size, reader.layout)
                chunking.check_record_fits(self.path, start, end, chunk_bytes=chunk_bytes,
                                           max_chunk_bytes=sizing.max_chunk_bytes, budget=budget)
                chunk = Chunk(path=self.path, format=reader.layout.format, index=index, count=0,
                              start=start, end=end, header_end=h_end)
                part = reader.read(fh, chunk, columns)
                tally.add(part.rows, part.bad_rows, part.bad_examples, chunk.label)
                result = apply_process(self.process, part.frame, chunk)
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
                         "to %s", format_size(rss), format_size(budget), format_size(chunk_bytes // 2))
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

    def _report_bad_rows(self, tally: RowTally) -> None:
        if tally.bad_rows:
            self.log.warning("Skipped %d malformed row(s) of %d read (on_bad_rows='skip'); first: %s",
                             tally.bad_rows, tally.rows + tally.bad_rows, "; ".join(tally.bad_examples))


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value
