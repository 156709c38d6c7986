"""Object storage for real: the chunked operators and the example DAGs' files on ``s3://`` through Airflow's
``ObjectStoragePath``, against moto's S3 server (``moto_server``, a subprocess on a free port).

The connection is what a deployment would set: ``AIRFLOW_CONN_AWS_DEFAULT`` with ``endpoint_url`` in
its extra, named in the URLs (``s3://aws_default@bucket/...``). Everything written is read back with a
plain boto3 client that talks to moto directly, so the test sees what another host would see.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytestmark = [pytest.mark.integration]

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
BUDGET, OVERHEAD = "200MiB", "100MiB"
RUN_ID = "manual__2026-01-01T00:00:00+00:00"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        pytest.fail(f"{server} is missing: install the dev extra (moto[server])", pytrace=False)
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {endpoint}:\n{log.read_text()[-2000:]}",
                                pytrace=False)
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A fresh bucket, ``aws_default`` pointing at moto, and a boto3 client to look at the bucket."""
    import boto3
    from airflow.sdk.io import store

    conn = {"conn_type": "aws", "login": CREDENTIALS["aws_access_key_id"],
            "password": CREDENTIALS["aws_secret_access_key"],
            "extra": {"endpoint_url": moto_endpoint, "region_name": CREDENTIALS["region_name"]}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
    # Nothing may fall back to real AWS or the instance metadata service.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(store, "_STORE_CACHE", {})  # a filesystem attached by an earlier test
    client = boto3.client("s3", endpoint_url=moto_endpoint, **CREDENTIALS)
    bucket = f"asyncq-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)

    def keys(prefix: str = "") -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(key: str) -> io.BytesIO:
        return io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    yield SimpleNamespace(client=client, bucket=bucket, url=f"s3://aws_default@{bucket}", keys=keys,
                          read=read, endpoint=moto_endpoint)
    for key in keys():
        client.delete_object(Bucket=bucket, Key=key)
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def shared_on_s3(s3: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> str:
    root = f"{s3.url}/shared"
    monkeypatch.setenv("AIRFLOW__ASYNCQ__SHARED_STORAGE", root)
    return root


@pytest.fixture(autouse=True)
def _small_rss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test process (Airflow, pandas, pytest) holds more than the small budgets used here."""
    from airflow_asyncq_provider.operators import budget, streaming

    monkeypatch.setattr(budget, "current_rss", lambda: 0)
    monkeypatch.setattr(streaming, "current_rss", lambda: 0)


class StubTI:
    def __init__(self, try_number: int = 1) -> None:
        self.try_number = try_number
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        json.dumps(value)
        self.pushed[key] = value


def context(try_number: int = 1) -> dict[str, Any]:
    return {"ti": StubTI(try_number), "dag": SimpleNamespace(dag_id="s3_dag"), "run_id": RUN_ID}


def sales_csv(rows: int) -> tuple[bytes, dict[str, int]]:
    """region,amount,note rows, every 50th with a quoted multi-line note; and the truth per region."""
    truth: dict[str, int] = {}
    lines = ["region,amount,note"]
    for i in range(rows):
        truth[f"r{i % 5}"] = truth.get(f"r{i % 5}", 0) + i
        lines.append(f"r{i % 5},{i}," + ('"one\nline ""two"""' if i % 50 == 0 else ""))
    return ("\n".join(lines) + "\n").encode(), truth


def sum_by_region(frame, chunk):
    return frame.groupby("region", as_index=False)["amount"].sum()


def merge(acc, part):
    import pandas as pd

    return pd.concat([acc, part]).groupby("region", as_index=False)["amount"].sum()


def as_dict(frame) -> dict[str, int]:
    return {r: int(a) for r, a in zip(frame["region"], frame["amount"], strict=True)}


# ------------------------------------------------------------------ the filesystem and the connection
def test_the_amazon_provider_serves_s3_and_aws_default_points_at_moto(s3: SimpleNamespace) -> None:
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.io.fs import has_fs

    assert has_fs("s3"), "apache-airflow-providers-amazon registers no s3 filesystem"
    path = ObjectStoragePath(f"{s3.url}/probe.txt")
    assert path.conn_id == "aws_default"
    assert path.fs.endpoint_url == s3.endpoint, "AIRFLOW_CONN_AWS_DEFAULT's endpoint_url is not used"
    with path.open("wb") as fh:
        fh.write(b"written through ObjectStoragePath")
    body = s3.client.get_object(Bucket=s3.bucket, Key="probe.txt")["Body"].read()
    assert body == b"written through ObjectStoragePath"


def test_storage_functions_on_s3(s3: SimpleNamespace) -> None:
    from airflow_asyncq_provider.operators import storage

    base = storage.join(s3.url, "work")
    assert storage.is_remote(base) and not storage.exists(base)
    storage.makedirs(storage.join(base, "attempts"))
    with storage.atomic_output(storage.join(base, "data.csv")) as fh:
        fh.write(b"a,b\n" + b"1,2\n" * 1000)
    storage.write_json(storage.join(base, "attempts", "try-001.json"), {"status": "running"})
    assert s3.keys("work/") == ["work/attempts/try-001.json", "work/data.csv"]
    assert storage.input_size(storage.join(base, "data.csv")) == 4 + 4 * 1000
    with storage.open_input(storage.join(base, "data.csv")) as fh:  # seekable: chunks read byte ranges
        fh.seek(4 + 4 * 500)
        assert fh.read(4) == b"1,2\n"
    assert storage.read_json(storage.join(base, "attempts", "try-001.json")) == {"status": "running"}
    assert storage.listdir(storage.join(base, "attempts")) == [f"{base}/attempts/try-001.json"]
    assert storage.listdir(storage.join(base, "nothing-here")) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.open_input(storage.join(base, "missing.csv"))
    assert storage.remove_tree(base) is True
    assert s3.keys("work/") == [] and storage.remove_tree(base) is False


# ------------------------------------------------------------------ the operators, outputs in the bucket
def test_fan_out_with_the_default_work_dir_on_s3(s3: SimpleNamespace, shared_on_s3: str) -> None:
    import pandas as pd

    from airflow_asyncq_provider.operators import (
        ChunkCombineOperator,
        ChunkProcessOperator,
        ChunkSplitOperator,
        storage,
    )

    data, truth = sales_csv(3000)
    s3.client.put_object(Bucket=s3.bucket, Key="input/sales.csv", Body=data)
    split = ChunkSplitOperator(task_id="split", path=f"{s3.url}/input/sales.csv", memory_budget=BUDGET,
                               overhead=OVERHEAD, min_chunks=4)
    descriptors = split.execute(context())
    assert len(descriptors) >= 4
    records = [ChunkProcessOperator(task_id="process", chunk=d, process=sum_by_region,
                                    work_name="aggregate").execute(context()) for d in descriptors]
    fold = ChunkCombineOperator(task_id="combine", results=records, combine=merge, work_name="aggregate")
    ctx = context()
    result = fold.execute(ctx)

    work = storage.default_work_dir("s3_dag", RUN_ID, "aggregate")
    assert work.startswith(f"{shared_on_s3}/asyncq-chunks/s3_dag/")
    prefix = work.split(f"{s3.bucket}/", 1)[1] + "/"
    written = s3.keys(prefix)
    parts = [k for k in written if k.startswith(prefix + "parts/")]
    markers = [k for k in written if k.startswith(prefix + "attempts/")]
    assert len(parts) == len(descriptors) and len(markers) == len(descriptors)
    assert prefix + "combined.parquet" in written
    assert result["parquet"] == f"{work}/combined.parquet"
    assert as_dict(pd.read_parquet(s3.read(prefix + "combined.parquet"))) == truth
    assert ctx["ti"].pushed["stats"]["rows"] == 3000


def test_a_retry_finds_the_killed_try_s_marker_in_the_bucket(s3: SimpleNamespace, shared_on_s3: str) -> None:
    """The retry of a chunk may run on another host than the try the watchdog killed: the marker that
    makes it split the chunk must come from the shared storage."""
    from airflow_asyncq_provider.operators import ChunkProcessOperator, ChunkSplitOperator, storage
    from airflow_asyncq_provider.operators.results import Attempts

    data, _ = sales_csv(2000)
    s3.client.put_object(Bucket=s3.bucket, Key="input/sales.csv", Body=data)
    (descriptor,) = ChunkSplitOperator(task_id="split", path=f"{s3.url}/input/sales.csv", memory_budget=BUDGET,
                                       overhead=OVERHEAD).execute(context())
    work = storage.default_work_dir("s3_dag", RUN_ID, "process")
    Attempts(work, 0).mark(1, "running", pieces=1)  # try 1 was SIGKILLed: its marker stays "running"
    result = ChunkProcessOperator(task_id="process", chunk=descriptor, process=lambda frame, chunk: len(frame)
                                  ).execute(context(try_number=2))
    assert result["pieces"] == 2 and sum(o["value"] for o in result["outputs"]) == 2000
    assert [a["status"] for a in Attempts(work, 0).history(99)] == ["running", "success"]


def test_streaming_operator_writes_its_result_to_s3(s3: SimpleNamespace, shared_on_s3: str) -> None:
    import pandas as pd

    from airflow_asyncq_provider.operators import ChunkedFileOperator

    data, truth = sales_csv(2500)
    s3.client.put_object(Bucket=s3.bucket, Key="input/sales.csv", Body=data)
    op = ChunkedFileOperator(task_id="stream", path=f"{s3.url}/input/sales.csv", memory_budget=BUDGET,
                             overhead=OVERHEAD, process=sum_by_region, combine=merge)
    result = op.execute(context())
    assert result["parquet"].startswith(f"{shared_on_s3}/asyncq-chunks/s3_dag/")
    key = result["parquet"].split(f"{s3.bucket}/", 1)[1]
    assert as_dict(pd.read_parquet(s3.read(key))) == truth


# ------------------------------------------------------------------ the example DAGs' own files
def test_example_inputs_and_the_native_page_read_on_s3(s3: SimpleNamespace, shared_on_s3: str) -> None:
    from airflow_asyncq_provider.example_dags import asyncq_chunked_csv_etl, asyncq_report_pipeline
    from airflow_asyncq_provider.example_dags.asyncq_native_tasks import page_text
    from airflow_asyncq_provider.native.examples import read_stored
    from airflow_asyncq_provider.operators import storage

    csv_path = storage.join(storage.default_work_dir("asyncq_chunked_csv_etl", RUN_ID, "input"), "sales.csv")
    generated = asyncq_chunked_csv_etl.generate_sales_csv(csv_path, 128 * 1024, bad_rows=1)
    key = csv_path.split(f"{s3.bucket}/", 1)[1]
    assert s3.client.head_object(Bucket=s3.bucket, Key=key)["ContentLength"] == generated["bytes"]

    orders = storage.shared_path("asyncq-report-source", "orders.jsonl")
    asyncq_report_pipeline.write_orders(orders, 50, seed="2026-01-01")
    lines = s3.read("shared/asyncq-report-source/orders.jsonl").read().splitlines()
    assert [json.loads(line)["order_id"] for line in lines] == list(range(50))

    page = storage.shared_path("asyncq-native-pages", "run", "page", "3")
    with storage.atomic_output(page) as fh:
        fh.write(page_text(3).encode())
    assert read_stored(page).decode().split() == ["page", "3"] + ["word"] * 30
