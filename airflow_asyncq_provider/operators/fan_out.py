"""``chunked_fan_out(...)``: a big file spread over the fleet as a task group of three steps.

``split`` plans record-aligned byte ranges (descriptors well under 1 KB each) → ``process``, dynamically
mapped over them, each instance asking the fleet for ``memory_budget`` through ``executor_config`` and
writing DataFrame results as Parquet parts → ``combine`` folds the parts in chunk order. XCom carries
only descriptors, paths and small values. The steps are ``split``, ``process`` and ``combine``; this
module only wires them, and checks at DAG parse time what can be checked then.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

from airflow.sdk import TaskGroup

from airflow_asyncq_provider.operators import chunking, reading
from airflow_asyncq_provider.operators.boundaries import RecordLayout
from airflow_asyncq_provider.operators.budget import memory_budget_bytes, memory_executor_config
from airflow_asyncq_provider.operators.combine import ChunkCombineOperator
from airflow_asyncq_provider.operators.errors import ChunkPlanningError
from airflow_asyncq_provider.operators.hooks import CombineFn, ProcessFn
from airflow_asyncq_provider.operators.process import ChunkProcessOperator
from airflow_asyncq_provider.operators.split import ChunkSplitOperator
from airflow_asyncq_provider.sizes import format_size, parse_size


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
        raise ChunkPlanningError(f"chunked_fan_out(group_id={group_id!r}): memory_limit {format_size(limit)} "
                                 f"is below memory_budget {format_size(budget)}")
    # fail at parse time, not in the first task
    reading.validate_read_options(read_options, file_format)
    reading.check_on_bad_rows(on_bad_rows)
    RecordLayout.for_input(file_format, read_options, boundary)
    common: dict[str, Any] = {"queue": queue} if queue else {}
    config = memory_executor_config(budget, limit)
    tooltip = tooltip or f"chunked fan-out within {format_size(budget)}"
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
