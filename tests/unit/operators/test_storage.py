"""Shared storage: ``[asyncq] shared_storage`` under the default work directories (read when a task runs,
never at import), the one-host warning without it, atomic writes, removal, and the example DAGs' use of
it (their files, and the native example's check for a lane). Object storage for real is in
tests/integration/test_object_storage.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.operators import storage
from airflow_asyncq_provider.settings import load_settings

ENV = "AIRFLOW__ASYNCQ__SHARED_STORAGE"
RUN_ID = "manual__2026-01-01T00:00:00+00:00"


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch):
    monkeypatch.setattr(storage, "_warned_one_host", False)
    monkeypatch.delenv(ENV, raising=False)


# ------------------------------------------------------------------ the option
def test_unset_means_none_and_a_path_or_url_is_kept(stub_conf):
    assert load_settings(stub_conf()).shared_storage is None
    assert load_settings(stub_conf(shared_storage="  ")).shared_storage is None
    assert load_settings(stub_conf(shared_storage="/mnt/shared/")).shared_storage == "/mnt/shared"
    assert load_settings(stub_conf(shared_storage="s3://aws_default@bucket/prefix/")).shared_storage == (
        "s3://aws_default@bucket/prefix")


@pytest.mark.parametrize(("value", "match"), [
    ("shared/dir", r"\[asyncq\] shared_storage is 'shared/dir': a local path must be absolute"),
    ("s3://", r"an object storage URL names a bucket, as in s3://aws_default@my-bucket"),
    ("s3://aws_default@/", r"names a bucket"),
])
def test_a_relative_path_or_a_url_without_bucket_is_refused(stub_conf, value, match):
    with pytest.raises(ConfigError, match=match) as caught:
        load_settings(stub_conf(shared_storage=value))
    assert "AIRFLOW__ASYNCQ__SHARED_STORAGE" in str(caught.value)


# ------------------------------------------------------------------ the default work directories
def test_work_dirs_live_under_the_shared_storage(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(ENV, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        work = storage.default_work_dir("my_dag", RUN_ID, "aggregate")
    assert work == str(tmp_path / "asyncq-chunks" / "my_dag" / "manual__2026-01-01T00_00_00_00_00" / "aggregate")
    assert storage.run_work_dir("my_dag", RUN_ID) == str(Path(work).parent)
    assert storage.shared_path("asyncq-reports") == str(tmp_path / "asyncq-reports")
    assert not caplog.records


def test_an_object_storage_url_joins_with_slashes(monkeypatch):
    monkeypatch.setenv(ENV, "s3://aws_default@bucket/prefix/")
    assert storage.default_work_dir("d", "r:1", "x") == "s3://aws_default@bucket/prefix/asyncq-chunks/d/r_1/x"


def test_without_it_the_temp_dir_is_used_with_one_warning_naming_the_option(caplog):
    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        first = storage.default_work_dir("d", "r", "a")
        storage.default_work_dir("d", "r", "b")
        storage.shared_path("x")
    assert first == str(Path(tempfile.gettempdir()) / "asyncq-chunks" / "d" / "r" / "a")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "[asyncq] shared_storage is not set" in warnings[0] and "one-host fleet only" in warnings[0]
    assert "AIRFLOW__ASYNCQ__SHARED_STORAGE" in warnings[0]


def test_the_option_is_read_when_a_task_runs_not_before(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "one"))
    assert storage.shared_root() == str(tmp_path / "one")
    monkeypatch.setenv(ENV, str(tmp_path / "two"))
    assert storage.shared_root() == str(tmp_path / "two")


def test_example_dags_read_no_config_when_imported():
    """A shared_storage that load_settings refuses does not stop DAG parsing: nothing reads it there."""
    code = (
        "import sys\n"
        "for name in ('asyncq_chunked_csv_etl', 'asyncq_memory_guard', 'asyncq_report_pipeline',\n"
        "             'asyncq_native_tasks', 'asyncq_quickstart'):\n"
        "    __import__('airflow_asyncq_provider.example_dags.' + name)\n"
        "print(sorted(m for m in ('pandas', 'pyarrow', 'celery', 'redis', 's3fs') if m in sys.modules))\n"
    )
    env = {**_clean_env(), ENV: "not/absolute"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != ENV}


# ------------------------------------------------------------------ writing and removing
def test_atomic_output_appears_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "out.bin")
    with storage.atomic_output(path) as fh:
        fh.write(b"first")
        assert not Path(path).exists(), "visible before the block ended"
    assert Path(path).read_bytes() == b"first"
    with pytest.raises(RuntimeError), storage.atomic_output(path) as fh:
        fh.write(b"second, half written")
        raise RuntimeError("boom")
    assert Path(path).read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"], "a temp file was left behind"
    storage.write_json(str(tmp_path / "m.json"), {"b": 1, "a": 2})
    assert storage.read_json(str(tmp_path / "m.json")) == {"a": 2, "b": 1}
    assert storage.read_bytes(str(tmp_path / "m.json")) == json.dumps({"a": 2, "b": 1}, sort_keys=True).encode()


def test_remove_tree_takes_a_directory_a_file_or_nothing(tmp_path):
    tree = tmp_path / "run"
    (tree / "parts").mkdir(parents=True)
    (tree / "parts" / "p.parquet").write_bytes(b"x")
    single = tmp_path / "single.csv"
    single.write_text("a\n")
    assert storage.remove_tree(str(tree)) is True and not tree.exists()
    assert storage.remove_tree(str(single)) is True and not single.exists()
    assert storage.remove_tree(str(tmp_path / "missing")) is False


# ------------------------------------------------------------------ the example DAGs' files
def test_chunked_etl_generates_its_csv_through_storage(monkeypatch, tmp_path):
    from airflow_asyncq_provider.example_dags import asyncq_chunked_csv_etl as etl

    path = storage.join(str(tmp_path / "deep" / "input"), "sales.csv")
    result = etl.generate_sales_csv(path, 64 * 1024, bad_rows=2)
    assert Path(path).stat().st_size == result["bytes"] >= 64 * 1024
    assert result["bad_rows"] == 2 and sum(v["orders"] for v in result["truth"].values()) == result["rows"]
    assert [p.name for p in Path(path).parent.iterdir()] == ["sales.csv"]


def test_memory_guard_and_report_write_their_inputs_through_storage(tmp_path):
    from airflow_asyncq_provider.example_dags import asyncq_memory_guard, asyncq_report_pipeline

    readings = tmp_path / "g" / "readings.csv"
    assert asyncq_memory_guard.write_rows(str(readings), 25_001) == 25_001
    lines = readings.read_text().splitlines()
    assert lines[0] == "id,sensor,value" and len(lines) == 25_002 and lines[-1].startswith("000025000,")
    orders = tmp_path / "r" / "orders.jsonl"
    asyncq_report_pipeline.write_orders(str(orders), 100, seed="2026-01-01")
    rows = [json.loads(line) for line in orders.read_text().splitlines()]
    assert [r["order_id"] for r in rows] == list(range(100))


# ------------------------------------------------------------------ the native example's lane check
class Closable:
    closed = False

    def close(self) -> None:
        self.closed = True


def _lane_check(monkeypatch, tasks: dict[str, dict], workers: dict[str, dict]):
    """``require_native_lane`` over stubbed state reads: ``tasks`` is the name registry, ``workers`` what
    ``registry.live_workers`` returns (decoded heartbeat records)."""
    from airflow_asyncq_provider.example_dags import asyncq_native_tasks
    from airflow_asyncq_provider.state import client, native, registry

    conn = Closable()
    monkeypatch.setattr(client, "make_redis", lambda settings: conn)
    monkeypatch.setattr(native, "lookup_task",
                        lambda c, keys, name: (tasks.get(name), [] if name in tasks else sorted(tasks)))
    monkeypatch.setattr(registry, "live_workers", lambda c, keys: workers)
    try:
        return asyncq_native_tasks.require_native_lane()
    finally:
        assert conn.closed, "the Redis client was left open"


def test_the_native_example_fails_at_once_on_a_fleet_without_a_lane(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException) as caught:
        _lane_check(monkeypatch, {}, {"w1@h": {"queues": ["default"]}})
    message = str(caught.value)
    assert "No native lane has registered asyncq.examples.fetch_page" in message
    assert "`airflow asyncq worker --loop-concurrency 50 --sync-threads 2`" in message
    assert "[asyncq] task_modules = airflow_asyncq_provider.native.examples" in message


def test_a_registered_name_without_a_live_lane_is_no_lane(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    record = {"kind": "async", "queues": ["native"], "hostname": "old@h-native", "at": 1}
    gone = {"w1@h": {"queues": ["default"], "native": {"alive": False, "gave_up": True, "queues": ["native"]}},
            "w2@h": {"unreadable": "asyncq:worker:w2@h: WRONGTYPE"}}
    with pytest.raises(AirflowFailException, match=r"registered by the lane of old@h-native, but no live worker"):
        _lane_check(monkeypatch, {"asyncq.examples.fetch_page": record}, gone)


def test_a_live_lane_on_the_native_queue_passes(monkeypatch):
    record = {"kind": "async", "queues": ["native"], "hostname": "w2@h-native", "at": 1}
    lane = {"alive": True, "gave_up": False, "queues": ["native"]}
    other = {"alive": True, "gave_up": False, "queues": ["bulk"]}
    assert _lane_check(monkeypatch, {"asyncq.examples.fetch_page": record},
                       {"w1@h": {"native": other}, "w2@h": {"native": lane}}) == ["w2@h"]
