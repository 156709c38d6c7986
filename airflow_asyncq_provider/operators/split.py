"""The split step of a fan-out: plan the chunks of a file and hand one small descriptor per chunk to XCom.

The plan reads the head of the file for a sample and scans it once for record boundaries
(``chunking.plan_chunks``); the descriptors carry offsets only (``chunk.Chunk``), never data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_asyncq_provider.operators import boundaries, chunking, storage
from airflow_asyncq_provider.operators.budget import memory_budget_bytes, resolve_overhead
from airflow_asyncq_provider.operators.chunk import Chunk
from airflow_asyncq_provider.operators.errors import ChunkPlanningError
from airflow_asyncq_provider.operators.reading import InputReader

if TYPE_CHECKING:
    from airflow.sdk import Context


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
        reader = InputReader.build(file_format=self.file_format, header=self.header, names=self.names,
                               read_options=self.read_options, boundary=self.boundary, on_bad_rows="skip")
        overhead = resolve_overhead(self.overhead, f"{self.task_id}: overhead")
        try:
            min_chunks = max(1, int(self.min_chunks))
        except (TypeError, ValueError) as exc:
            raise ChunkPlanningError(
                f"{self.task_id}: min_chunks={self.min_chunks!r} is not a number") from exc
        size = storage.input_size(self.path)
        with storage.open_input(self.path) as fh:
            h_end = boundaries.header_end(fh, size, reader.layout, reader.header)
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
