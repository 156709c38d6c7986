"""The combine step of a fan-out: check that every chunk reported, then fold the results in chunk order.

Parquet parts are loaded one at a time (``results.load``), so memory holds the accumulator and one
part. Nothing is deleted: a failed fold can be redone by clearing this task alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_asyncq_provider.operators import results, storage
from airflow_asyncq_provider.operators.errors import ChunkingError
from airflow_asyncq_provider.operators.hooks import CombineFn
from airflow_asyncq_provider.operators.reading import RowTally

if TYPE_CHECKING:
    from airflow.sdk import Context


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
        work_dir = storage.work_dir_for(self.output_dir, context, self.work_name or self.task_id)
        tally = RowTally()
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


def _materialize(values: Any) -> list[dict[str, Any]]:
    """The mapped step's results as a list. Indexing up to ``len`` instead of iterating, because
    iterating a lazy XCom sequence probes one past the end and logs an "XCom not found" error."""
    if isinstance(values, (list, tuple)):
        return [dict(v) for v in values]
    return [dict(values[i]) for i in range(len(values))]
