"""The chunked operators run in-process with a stub context: streaming, split → process → combine,
adaptive retry, and the bad inputs (missing file, malformed rows, combine raising, budget units)."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pyarrow  # noqa: F401  (the data extra: a missing one fails here, it does not skip)
import pytest

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.operators import (
    ChunkCombineOperator,
    ChunkedFileOperator,
    ChunkPlanningError,
    ChunkProcessOperator,
    ChunkSplitOperator,
    InputNotFoundError,
    MalformedInputError,
    ResultTooLargeError,
    budget,
    chunked_fan_out,
    streaming,
)
from airflow_asyncq_provider.operators.progress import Progress, format_eta
from airflow_asyncq_provider.operators.results import Attempts

MIB = 1024**2
BUDGET = "200MiB"
OVERHEAD = "100MiB"


class StubTI:
    def __init__(self, try_number: int = 1) -> None:
        self.try_number = try_number
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        json.dumps(value)  # XCom must be JSON
        self.pushed[key] = value


@pytest.fixture(autouse=True)
def _small_rss(monkeypatch):
    """The test process (Airflow, pandas, pytest) holds more than the tiny budgets used here."""
    monkeypatch.setattr(budget, "current_rss", lambda: 0)
    monkeypatch.setattr(streaming, "current_rss", lambda: 0)


def context(try_number: int = 1, run_id: str = "manual__2026-01-01T00:00:00+00:00") -> dict[str, Any]:
    return {"ti": StubTI(try_number), "dag": SimpleNamespace(dag_id="unit_dag"), "run_id": run_id}


def sales_csv(path: Path, rows: int, bad: dict[int, str] | None = None) -> dict[str, int]:
    """region,amount rows (every 50th with a quoted multi-line note); returns the truth per region."""
    truth: dict[str, int] = {}
    lines = ["region,amount,note"]
    for i in range(rows):
        if bad and i in bad:
            lines.append(bad[i])
            continue
        region = f"r{i % 5}"
        truth[region] = truth.get(region, 0) + i
        note = '"line one\nline ""two"", end"' if i % 50 == 0 else ""
        lines.append(f"{region},{i},{note}")
    path.write_text("\n".join(lines) + "\n")
    return truth


def sum_by_region(frame, chunk):
    return frame.groupby("region", as_index=False)["amount"].sum()


def merge(acc, part):
    return pd.concat([acc, part]).groupby("region", as_index=False)["amount"].sum()


def as_dict(frame) -> dict[str, int]:
    return {r: int(a) for r, a in zip(frame["region"], frame["amount"], strict=True)}


def run_fan_out(path: Path, out: Path, *, process=sum_by_region, combine=merge, min_chunks: int = 4,
                on_bad_rows: str = "fail", read_options: dict | None = None):
    split = ChunkSplitOperator(task_id="split", path=str(path), memory_budget=BUDGET, overhead=OVERHEAD,
                               min_chunks=min_chunks, read_options=read_options)
    descriptors = split.execute(context())
    records = []
    for d in descriptors:
        op = ChunkProcessOperator(task_id="process", chunk=d, process=process, output_dir=str(out),
                                  on_bad_rows=on_bad_rows, read_options=read_options)
        records.append(op.execute(context()))
    fold = ChunkCombineOperator(task_id="combine", results=records, combine=combine, output_dir=str(out))
    ctx = context()
    return descriptors, records, fold.execute(ctx), ctx["ti"].pushed["stats"]


# ------------------------------------------------------------------ fan-out
def test_fan_out_matches_the_truth_and_keeps_xcom_small(tmp_path):
    path = tmp_path / "sales.csv"
    truth = sales_csv(path, 3000)
    descriptors, records, result, stats = run_fan_out(path, tmp_path / "out", min_chunks=6)
    assert len(descriptors) >= 6
    assert all(len(json.dumps(d)) < 1024 for d in descriptors)
    assert all(len(json.dumps(r)) < 1024 for r in records)
    assert all(Path(o["parquet"]).exists() for r in records for o in r["outputs"])
    assert as_dict(pd.read_parquet(result["parquet"])) == truth
    assert result["rows"] == 5 and result["columns"] == ["region", "amount"]
    assert stats["rows"] == 3000 and stats["bad_rows"] == 0 and stats["chunks"] == len(descriptors)


def test_fan_out_with_small_values_and_no_parquet(tmp_path):
    path = tmp_path / "sales.csv"
    truth = sales_csv(path, 500)

    def totals(frame, chunk):
        return {r: int(v) for r, v in frame.groupby("region")["amount"].sum().items()}

    def add(acc, value):
        return {k: acc.get(k, 0) + value.get(k, 0) for k in acc.keys() | value.keys()}

    _, records, result, _ = run_fan_out(path, tmp_path / "out", process=totals, combine=add)
    assert result == truth
    assert all("value" in o for r in records for o in r["outputs"])
    assert not (tmp_path / "out" / "parts").exists()


def test_fan_out_without_combine_returns_the_manifest(tmp_path):
    path = tmp_path / "sales.csv"
    sales_csv(path, 400)
    _, _, manifest, _ = run_fan_out(path, tmp_path / "out", process=None, combine=None)
    frames = pd.concat([pd.read_parquet(p) for p in manifest["parts"]], ignore_index=True)
    assert frames["amount"].tolist() == list(range(400)) and manifest["rows"] == 400


def test_empty_input_maps_one_empty_chunk_and_gives_an_empty_result(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("region,amount,note\n")
    descriptors, records, result, stats = run_fan_out(path, tmp_path / "out")
    assert len(descriptors) == 1 and descriptors[0]["start"] == descriptors[0]["end"]
    assert records[0]["outputs"] == [] and result is None and stats["rows"] == 0


def test_malformed_rows_are_counted_across_chunks(tmp_path):
    path = tmp_path / "bad.csv"
    truth = sales_csv(path, 2000, bad={10: "r0,1,x,extra", 1500: "r1,notanumber,"})
    _, _, result, stats = run_fan_out(path, tmp_path / "out", on_bad_rows="skip",
                                      read_options={"dtype": {"amount": "int64"}})
    assert as_dict(pd.read_parquet(result["parquet"])) == truth
    assert stats["bad_rows"] == 2 and len(stats["bad_examples"]) == 2


def test_malformed_rows_fail_the_chunk_in_fail_mode(tmp_path):
    path = tmp_path / "bad.csv"
    sales_csv(path, 2000, bad={1500: "r1,1,x,extra"})
    with pytest.raises(MalformedInputError, match=r"chunk \d+/\d+ .*1 malformed row.*on_bad_rows='skip'"):
        run_fan_out(path, tmp_path / "out", on_bad_rows="fail")


def test_missing_file_is_a_clear_error_that_skips_retries(tmp_path):
    split = ChunkSplitOperator(task_id="split", path=str(tmp_path / "nope.csv"), memory_budget=BUDGET,
                               overhead=OVERHEAD)
    with pytest.raises(InputNotFoundError, match=r"nope.csv' does not exist.*upstream task") as info:
        split.execute(context())
    from airflow.sdk.exceptions import AirflowFailException

    assert isinstance(info.value, AirflowFailException)


def test_combine_that_raises_keeps_the_parts(tmp_path, capsys):
    path = tmp_path / "sales.csv"
    sales_csv(path, 1000)

    def broken(acc, part):
        raise KeyError("user bug in combine")

    with pytest.raises(KeyError, match="user bug in combine"):
        run_fan_out(path, tmp_path / "out", combine=broken)
    parts = sorted((tmp_path / "out" / "parts").glob("*.parquet"))
    assert len(parts) >= 4
    assert sum(len(pd.read_parquet(p)) for p in parts) == 20  # 5 regions x 4+ chunks, all still there
    assert "all chunk outputs are kept" in capsys.readouterr().out


def test_combine_refuses_incomplete_results(tmp_path):
    fold = ChunkCombineOperator(task_id="combine", results=[{"index": 0, "count": 3, "outputs": []},
                                                            {"index": 2, "count": 3, "outputs": []}],
                                combine=merge, output_dir=str(tmp_path))
    with pytest.raises(Exception, match=r"incomplete: 2 of 3, missing chunk\(s\) \[2\]"):
        fold.execute(context())


def test_combine_reads_a_lazy_sequence_by_index(tmp_path):
    class Lazy:
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

        def __iter__(self):
            raise AssertionError("iterating probes past the end")

    fold = ChunkCombineOperator(task_id="combine", results=Lazy([{"index": 0, "count": 1, "outputs": [
        {"value": 3}]}]), combine=lambda a, b: a + b, output_dir=str(tmp_path))
    assert fold.execute(context()) == 3


def test_process_result_that_is_too_big_for_xcom(tmp_path):
    path = tmp_path / "sales.csv"
    sales_csv(path, 200)
    with pytest.raises(ResultTooLargeError, match="return a pandas DataFrame instead"):
        run_fan_out(path, tmp_path / "out", process=lambda frame, chunk: "x" * 100_000, combine=None)


# ------------------------------------------------------------------ adaptive retry
def process_task(tmp_path: Path, descriptor: dict, process) -> ChunkProcessOperator:
    return ChunkProcessOperator(task_id="process", chunk=descriptor, process=process,
                                output_dir=str(tmp_path / "out"))


def test_retry_after_a_kill_splits_the_chunk_in_two(tmp_path, capsys):
    path = tmp_path / "sales.csv"
    truth = sales_csv(path, 2000)
    (descriptor,) = ChunkSplitOperator(task_id="split", path=str(path), memory_budget=BUDGET,
                                       overhead=OVERHEAD).execute(context())
    # try 1 was SIGKILLed by the memory watchdog: its marker says "running" and nothing else
    Attempts(str(tmp_path / "out"), 0).mark(1, "running", pieces=1)
    seen = []

    def record(frame, chunk):
        seen.append((chunk.piece, chunk.pieces, len(frame)))
        return sum_by_region(frame, chunk)

    result = process_task(tmp_path, descriptor, record).execute(context(try_number=2))
    log = capsys.readouterr().out
    assert [(p, n) for p, n, _ in seen] == [(0, 2), (1, 2)]
    assert sum(rows for _, _, rows in seen) == 2000
    assert result["pieces"] == 2 and len(result["outputs"]) == 2
    assert "Adaptive retry" in log and "ended without reporting back" in log
    first, second = (pd.read_parquet(o["parquet"]) for o in result["outputs"])
    merged = merge(first, second)
    assert as_dict(merged) == truth
    statuses = [a["status"] for a in Attempts(str(tmp_path / "out"), 0).history(99)]
    assert statuses == ["running", "success"]


def test_memory_error_marks_the_try_and_the_next_splits_further(tmp_path):
    path = tmp_path / "sales.csv"
    sales_csv(path, 2000)
    (descriptor,) = ChunkSplitOperator(task_id="split", path=str(path), memory_budget=BUDGET,
                                       overhead=OVERHEAD).execute(context())

    def hungry(frame, chunk):
        if chunk.pieces < 4:
            raise MemoryError("simulated")
        return len(frame)

    with pytest.raises(MemoryError):
        process_task(tmp_path, descriptor, hungry).execute(context(try_number=1))
    with pytest.raises(MemoryError):
        process_task(tmp_path, descriptor, hungry).execute(context(try_number=2))
    result = process_task(tmp_path, descriptor, hungry).execute(context(try_number=3))
    assert result["pieces"] == 4 and sum(o["value"] for o in result["outputs"]) == 2000
    statuses = [a["status"] for a in Attempts(str(tmp_path / "out"), 0).history(99)]
    assert statuses == ["memory", "memory", "success"]


def test_an_ordinary_error_does_not_split_the_retry(tmp_path):
    path = tmp_path / "sales.csv"
    sales_csv(path, 100)
    (descriptor,) = ChunkSplitOperator(task_id="split", path=str(path), memory_budget=BUDGET,
                                       overhead=OVERHEAD).execute(context())
    calls = []

    def flaky(frame, chunk):
        calls.append(chunk.pieces)
        if len(calls) == 1:
            raise ConnectionError("transient")
        return len(frame)

    with pytest.raises(ConnectionError):
        process_task(tmp_path, descriptor, flaky).execute(context(try_number=1))
    assert process_task(tmp_path, descriptor, flaky).execute(context(try_number=2))["pieces"] == 1
    assert calls == [1, 1]


def test_a_chunk_of_one_record_cannot_be_split_further(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("region,amount,note\nr1,1," + "x" * 5000 + "\n")
    (descriptor,) = ChunkSplitOperator(task_id="split", path=str(path), memory_budget=BUDGET,
                                       overhead=OVERHEAD).execute(context())
    Attempts(str(tmp_path / "out"), 0).mark(1, "running")
    with pytest.raises(ChunkPlanningError, match="cannot be split: it is one record"):
        process_task(tmp_path, descriptor, sum_by_region).execute(context(try_number=2))


# ------------------------------------------------------------------ streaming, one task
def test_streaming_operator_folds_and_logs_progress(tmp_path, capsys):
    path = tmp_path / "sales.csv"
    truth = sales_csv(path, 5000)
    op = ChunkedFileOperator(task_id="stream", path=str(path), memory_budget="100MiB", overhead="99.9MiB",
                             process=sum_by_region, combine=merge, output_dir=str(tmp_path / "out"),
                             progress_interval=0)
    ctx = context()
    result = op.execute(ctx)
    assert as_dict(pd.read_parquet(result["parquet"])) == truth
    stats = ctx["ti"].pushed["stats"]
    assert stats["rows"] == 5000 and stats["chunks"] > 3
    progress = [line for line in capsys.readouterr().out.splitlines() if "Progress:" in line]
    assert len(progress) == stats["chunks"] + 1
    assert "100.0%" in progress[-1] and "rows/s" in progress[-1] and "ETA 0:00:00" in progress[-1]


def test_streaming_operator_without_combine_writes_parts(tmp_path):
    path = tmp_path / "sales.csv"
    sales_csv(path, 3000)
    op = ChunkedFileOperator(task_id="stream", path=str(path), memory_budget="100MiB", overhead="99.9MiB",
                             output_dir=str(tmp_path / "out"))
    result = op.execute(context())
    frames = pd.concat([pd.read_parquet(p) for p in result["parts"]], ignore_index=True)
    assert frames["amount"].tolist() == list(range(3000))


def test_streaming_operator_keeps_the_partial_fold_when_combine_raises(tmp_path, capsys):
    path = tmp_path / "sales.csv"
    sales_csv(path, 5000)
    calls = []

    def fails_late(acc, part):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("user bug")
        return merge(acc, part)

    op = ChunkedFileOperator(task_id="stream", path=str(path), memory_budget="100MiB", overhead="99.9MiB",
                             process=sum_by_region, combine=fails_late, output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="user bug"):
        op.execute(context())
    assert (tmp_path / "out" / "partial-accumulated.parquet").exists()
    assert "combine raised on chunk 3" in capsys.readouterr().out


def test_streaming_operator_missing_file(tmp_path):
    op = ChunkedFileOperator(task_id="stream", path=str(tmp_path / "gone.csv"), memory_budget=BUDGET)
    with pytest.raises(InputNotFoundError, match="does not exist"):
        op.execute(context())


def test_streaming_halves_chunks_when_memory_goes_over_budget(tmp_path, monkeypatch, capsys):
    path = tmp_path / "sales.csv"
    sales_csv(path, 5000)
    readings = iter([10**12, 10**12, 10**12, 10**12])
    monkeypatch.setattr(streaming, "current_rss", lambda: next(readings, 0))
    op = ChunkedFileOperator(task_id="stream", path=str(path), memory_budget="100MiB", overhead="99.9MiB",
                             process=sum_by_region, combine=merge, output_dir=str(tmp_path / "out"))
    ctx = context()
    op.execute(ctx)
    assert capsys.readouterr().out.count("halving the chunk size") == 2
    assert ctx["ti"].pushed["stats"]["rows"] == 5000


def test_templated_budget_is_checked_at_run_time(tmp_path):
    op = ChunkedFileOperator(task_id="stream", path="x.csv", memory_budget="{{ params.budget }}")
    op.memory_budget = "12 parsecs"
    with pytest.raises(ConfigError, match="stream: memory_budget"):
        op.execute(context())


def test_budget_of_the_wrong_unit_fails_when_the_dag_is_parsed():
    with pytest.raises(ConfigError, match=r"stream: memory_budget: .*'512MB/s'"):
        ChunkedFileOperator(task_id="stream", path="x.csv", memory_budget="512MB/s")


# ------------------------------------------------------------------ the task group
def build_dag(**kwargs):
    from airflow.sdk import DAG

    with DAG("fan_out_unit", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        fan = chunked_fan_out(group_id="agg", path="/data/x.csv", process=sum_by_region, combine=merge,
                              **{"memory_budget": "2GiB", **kwargs})
    return dag, fan


def test_task_group_shape_and_memory_requests():
    dag, fan = build_dag(queue="high_mem", memory_limit="3GiB", process_retries=3)
    assert sorted(dag.task_ids) == ["agg.combine", "agg.process", "agg.split"]
    assert fan.split.downstream_task_ids == {"agg.process"}
    assert fan.process.downstream_task_ids == {"agg.combine"}
    config = fan.process.partial_kwargs["executor_config"]
    assert config == {"asyncq": {"memory_request": "2048MiB", "memory_limit": "3072MiB"}}
    assert fan.process.partial_kwargs["retries"] == 3
    assert fan.split.executor_config["asyncq"]["memory_request"] == "2048MiB"
    assert {t.queue for t in (fan.split, fan.combine)} == {"high_mem"}
    assert fan.output.operator is fan.combine


def test_default_limit_is_one_and_a_half_budgets():
    _, fan = build_dag()
    assert fan.process.partial_kwargs["executor_config"]["asyncq"]["memory_limit"] == "3072MiB"


def test_task_group_serializes():
    from airflow.serialization.serialized_objects import DagSerialization

    dag, _ = build_dag()
    data = DagSerialization.to_dict(dag)
    assert json.dumps(data, default=str)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"memory_budget": "2 GiBs"}, "agg'\\): memory_budget"),
    ({"memory_budget": 512}, "'512MiB'"),
    ({"memory_limit": "1GiB"}, "below memory_budget"),
    ({"on_bad_rows": "ignore"}, "on_bad_rows"),
    ({"read_options": {"nrows": 5}}, "nrows"),
    ({"file_format": "xlsx"}, "file_format"),
])
def test_task_group_rejects_bad_arguments_at_parse_time(kwargs, match):
    with pytest.raises((ConfigError, ChunkPlanningError, Exception), match=match):
        build_dag(**kwargs)


# ------------------------------------------------------------------ progress
def test_progress_line_has_rate_percent_and_eta():
    now = [100.0]
    progress = Progress(logging.getLogger("t"), total_bytes=400 * MIB, interval=5, clock=lambda: now[0])
    now[0] = 110.0
    line = progress.line(100 * MIB, 2_000_000, 3)
    assert line.startswith(" 25.0% (100 MiB of 400 MiB), 3 chunk(s), 2,000,000 rows, 200,000 rows/s, "
                           "10.0 MiB/s")
    assert "ETA 0:00:30" in line
    assert format_eta(None) == "unknown"


def test_progress_logs_at_most_every_interval(caplog):
    now = [0.0]
    progress = Progress(logging.getLogger("t"), total_bytes=100, interval=5, clock=lambda: now[0])
    with caplog.at_level(logging.INFO):
        for t in (1, 2, 6, 7, 12):
            now[0] = t
            progress.update(t, t, t)
        progress.update(100, 100, 13, final=True)
    assert progress.lines == 3


# ------------------------------------------------------------------ import hygiene
def test_operators_and_example_dags_do_not_import_pandas_or_pyarrow():
    """DAG parsing imports these modules; pandas and pyarrow (the data extra) load only in execute()."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import airflow_asyncq_provider.operators as ops\n"
        "[getattr(ops, name) for name in ops.__all__]\n"
        "import airflow_asyncq_provider.example_dags.asyncq_chunked_csv_etl\n"
        "import airflow_asyncq_provider.example_dags.asyncq_memory_guard\n"
        "import airflow_asyncq_provider.example_dags.asyncq_report_pipeline\n"
        "print(sorted(m for m in ('pandas', 'pyarrow') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_streaming_refuses_a_record_bigger_than_a_chunk_may_be(tmp_path):
    path = tmp_path / "late.csv"
    rows = "".join(f"r{i % 5},{i},\n" for i in range(3000))
    path.write_text("region,amount,note\n" + rows + "r1,1," + "x" * 200_000 + "\n")
    op = ChunkedFileOperator(task_id="stream", path=str(path), memory_budget="100MiB", overhead="99.95MiB",
                             sample_bytes=1024, output_dir=str(tmp_path / "out"))
    with pytest.raises(ChunkPlanningError, match="record ending at byte .* is longer than"):
        op.execute(context())
