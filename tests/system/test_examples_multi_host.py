"""The shipped example DAGs on a fleet whose workers share nothing but ``[asyncq] shared_storage``.

Two extra workers on the session stack stand in for two machines: each has a TMPDIR of its own (so
``tempfile.gettempdir()`` differs, as it would across hosts) and a hostname of its own (Airflow's
``[core] hostname_callable``, so the task instances say which "host" ran them). A third one, with its
own TMPDIR too, runs the native lane. The session's default-queue worker is put in maintenance for the
module, so every task of the examples runs on one of the two hosts, and the chunks of one run are
spread over both. Anything one task left in its temp dir for another would be missing on the other
host and fail the run; the shared storage is the stack's ``<home>/shared``.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from airflow_asyncq_provider.operators.storage import safe_name
from airflow_asyncq_provider.state import registry
from airflow_asyncq_provider.state.keys import Keys
from devtools.stack import Stack
from tests.system.conftest import REDIS_DB, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

HOSTS = ("host-a", "host-b")
LANE = "host-lane"
MAINTENANCE_COMMENT = "test_examples_multi_host: the examples run on host-a and host-b only"
HOSTNAME_MODULE = "import os\n\n\ndef hostname():\n    return os.environ['ASYNCQ_TEST_HOSTNAME']\n"


def _keys(stack: Stack) -> Keys:
    return Keys(stack.env["AIRFLOW__ASYNCQ__KEY_PREFIX"])


def _live(client: redis.Redis, stack: Stack) -> dict[str, dict]:
    return registry.live_workers(client, _keys(stack))


def _node(client: redis.Redis, stack: Stack, name: str) -> str | None:
    """The Celery node name (``name@<machine>``) of a live, consuming worker."""
    for node, info in _live(client, stack).items():
        if node.startswith(f"{name}@") and info.get("consumer_tick_at"):
            return node
    return None


def _host_env(stack: Stack, tmp: Path, helper: Path, hostname: str) -> dict[str, str]:
    return {"TMPDIR": str(tmp), "ASYNCQ_TEST_HOSTNAME": hostname,
            "PYTHONPATH": os.pathsep.join(p for p in (str(helper), os.environ.get("PYTHONPATH")) if p),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "asyncq_test_hostname.hostname"}


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    c = redis.Redis(db=REDIS_DB, decode_responses=True)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostname_callable")
    (path / "asyncq_test_hostname.py").write_text(HOSTNAME_MODULE)
    return path


@pytest.fixture(scope="module")
def temp_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: tmp_path_factory.mktemp(f"tmpdir-{name}") for name in (*HOSTS, LANE)}


@pytest.fixture(scope="module")
def two_hosts(stack: Stack, client: redis.Redis, helper: Path, temp_dirs: dict[str, Path]) -> Iterator[list[str]]:
    """host-a and host-b consume the default queue; w-default steps aside (maintenance) meanwhile."""
    assert stack.env["AIRFLOW__ASYNCQ__SHARED_STORAGE"] == str(stack.home / "shared")
    default = wait_for(lambda: _node(client, stack, "w-default"), 120, "w-default in the registry", stack=stack)
    default_log = stack.logs / "w-default.log"

    def logged(line: str) -> int:
        return default_log.read_text(errors="replace").count(f"{line} for {default}")

    ons, went_on = logged("Maintenance on"), False
    registry.set_maintenance(client, _keys(stack), default, True, comment=MAINTENANCE_COMMENT, by="pytest")
    try:
        for host in HOSTS:
            stack.start_worker(host, queues="default", concurrency=2, serve_logs=False,
                               env=_host_env(stack, temp_dirs[host], helper, host))
        went_on = wait_for(lambda: logged("Maintenance on") > ons, 60, f"{default} to go into maintenance",
                           stack=stack)
        nodes = [wait_for(lambda h=host: _node(client, stack, h), 120, f"{host} consuming", stack=stack)
                 for host in HOSTS]
        yield nodes
    finally:
        for host in HOSTS:
            if host in stack.procs:
                stack.kill(host, signal.SIGTERM)
        offs = logged("Maintenance off")
        registry.set_maintenance(client, _keys(stack), default, False)
        if went_on:  # the next modules need w-default consuming again
            wait_for(lambda: logged("Maintenance off") > offs, 60, f"{default} to leave maintenance", stack=stack)


@pytest.fixture(scope="module")
def lane_host(stack: Stack, client: redis.Redis, helper: Path, temp_dirs: dict[str, Path],
              two_hosts: list[str]) -> Iterator[str]:
    """A worker with the native lane and a temp dir of its own; its Airflow lane serves a queue nothing
    publishes to, so it runs native tasks only."""
    env = {**_host_env(stack, temp_dirs[LANE], helper, LANE),
           "AIRFLOW__ASYNCQ__TASK_MODULES": "airflow_asyncq_provider.native.examples"}
    stack.start_worker(LANE, queues="multi_host_idle", concurrency=1, serve_logs=False, env=env,
                       extra_args=("--loop-concurrency", "50", "--sync-threads", "2"))

    def lane_up() -> str | None:
        node = _node(client, stack, LANE)
        lane = _live(client, stack).get(node or "", {}).get("native")
        registered = client.hget(f"{_keys(stack).native_tasks}", "asyncq.examples.fetch_page") or ""
        return node if isinstance(lane, dict) and lane.get("alive") and f'"{LANE}@' in registered else None

    try:
        yield wait_for(lane_up, 120, "the native lane of host-lane to register the example tasks", stack=stack)
    finally:
        stack.kill(LANE, signal.SIGTERM)


def _tis(stack: Stack, dag_id: str, run_id: str) -> list[dict]:
    return stack.task_instances(dag_id, run_id)


def _run(stack: Stack, dag_id: str, conf: dict | None = None, timeout: float = 300) -> tuple[str, list[dict]]:
    stack.wait_dag(dag_id)
    run_id = stack.trigger(dag_id, conf=conf)
    state = stack.wait_run(dag_id, run_id, timeout=timeout)
    tis = _tis(stack, dag_id, run_id)
    failed = {ti["task_id"]: ti["state"] for ti in tis if ti["state"] != "success"}
    assert state == "success", (failed, {tid: stack.task_log(dag_id, run_id, tid, 1)[-3000:] for tid in failed})
    return run_id, tis


def _assert_temp_dirs_untouched(temp_dirs: dict[str, Path]) -> None:
    for name, tmp in temp_dirs.items():
        assert not (tmp / "asyncq-chunks").exists(), f"{name} wrote chunk files to its own temp dir"


# ------------------------------------------------------------------ the native example needs a lane
def test_native_example_without_a_lane_fails_at_once_naming_the_fix(stack: Stack, two_hosts: list[str]) -> None:
    dag_id = "asyncq_native_tasks"
    stack.wait_dag(dag_id)
    run_id = stack.trigger(dag_id)
    assert stack.wait_run(dag_id, run_id, timeout=180) == "failed"
    tis = {ti["task_id"]: ti for ti in _tis(stack, dag_id, run_id)}
    assert tis["serve_pages"]["state"] == "failed" and tis["serve_pages"]["try_number"] == 1
    for task_id in ("fetch_pages", "checksum", "flaky", "urgent", "combine"):
        assert tis[task_id]["state"] == "upstream_failed", (task_id, tis[task_id]["state"])
    log = stack.task_log(dag_id, run_id, "serve_pages", 1)
    assert "AirflowFailException" in log
    assert "`airflow asyncq worker --loop-concurrency 50 --sync-threads 2`" in log
    assert "[asyncq] task_modules = airflow_asyncq_provider.native.examples" in log


# ------------------------------------------------------------------ every example, spread over two hosts
def test_chunked_csv_etl_spreads_its_chunks_over_two_hosts(stack: Stack, two_hosts: list[str],
                                                           temp_dirs: dict[str, Path]) -> None:
    dag_id = "asyncq_chunked_csv_etl"
    run_id, tis = _run(stack, dag_id, conf={"size_mb": 8, "parallelism": 6, "bad_rows": 4})
    hosts = Counter(ti["hostname"] for ti in tis if ti["task_id"] == "aggregate.process")
    assert set(hosts) == set(HOSTS), f"the chunks ran on {dict(hosts)}; both hosts should have taken some"
    assert {ti["hostname"] for ti in tis} <= set(HOSTS)
    assert sum(hosts.values()) >= 6
    generate = stack.xcom(dag_id, run_id, "generate")
    shared = stack.home / "shared"
    assert Path(generate["path"]).is_relative_to(shared)
    assert "totals match the truth exactly" in stack.task_log(dag_id, run_id, "check", 1)
    assert "shared_storage is not set" not in stack.task_log(dag_id, run_id, "generate", 1)
    # cleanup removed the whole run from the shared storage
    assert not Path(generate["path"]).exists()
    assert not (shared / "asyncq-chunks" / dag_id / safe_name(run_id)).exists()
    _assert_temp_dirs_untouched(temp_dirs)


def test_memory_guard_retry_reads_the_killed_try_s_marker_from_shared_storage(
        stack: Stack, two_hosts: list[str], temp_dirs: dict[str, Path]) -> None:
    dag_id = "asyncq_memory_guard"
    run_id, tis = _run(stack, dag_id, conf={"rows": 60_000, "chunks": 3, "heavy_chunk": 1})
    process = {ti["map_index"]: ti for ti in tis if ti["task_id"] == "guarded.process"}
    assert process[1]["try_number"] == 2 and {ti["hostname"] for ti in tis} <= set(HOSTS)
    retry = stack.task_log(dag_id, run_id, "guarded.process", 2, map_index=1)
    assert "ended without reporting back" in retry and "as 2 record-aligned pieces" in retry
    markers = list((stack.home / "shared" / "asyncq-chunks" / dag_id).glob("*/guarded/attempts/chunk-00001/try-*.json"))
    assert len(markers) >= 2
    _assert_temp_dirs_untouched(temp_dirs)


def test_report_pipeline_pages_and_report_on_shared_storage(stack: Stack, two_hosts: list[str],
                                                            temp_dirs: dict[str, Path]) -> None:
    dag_id = "asyncq_report_pipeline"
    run_id, tis = _run(stack, dag_id, conf={"orders": 20_000, "pages": 6})
    hosts = Counter(ti["hostname"] for ti in tis if ti["task_id"] == "pages.process")
    assert set(hosts) == set(HOSTS), f"the pages ran on {dict(hosts)}; both hosts should have taken some"
    shared = stack.home / "shared"
    assert Path(stack.xcom(dag_id, run_id, "seed_source")).is_relative_to(shared / "asyncq-report-source")
    report = stack.xcom(dag_id, run_id, "write_report")
    assert Path(report["path"]).parent == shared / "asyncq-reports" and report["orders"] == 20_000
    for tmp in temp_dirs.values():
        assert not (tmp / "asyncq-reports").exists() and not (tmp / "asyncq-report-source").exists()


def test_native_example_reads_its_pages_from_shared_storage_on_another_host(
        stack: Stack, two_hosts: list[str], lane_host: str, temp_dirs: dict[str, Path]) -> None:
    dag_id = "asyncq_native_tasks"
    run_id, tis = _run(stack, dag_id, timeout=240)
    by_id = {ti["task_id"]: ti for ti in tis}
    assert by_id["serve_pages"]["hostname"] in HOSTS
    pages = stack.xcom(dag_id, run_id, "fetch_pages")
    shared = stack.home / "shared" / "asyncq-native-pages"
    assert [Path(p["url"]).is_relative_to(shared) for p in pages] == [True] * 5
    assert [p["words"] for p in pages] == [2 + 10 * i for i in range(1, 6)]
    assert stack.xcom(dag_id, run_id, "combine")["statuses"] == [200]
    lane_log = (stack.logs / f"{LANE}.log").read_text(errors="replace")
    assert "asyncq.examples.fetch_page" in lane_log, "the pages were not fetched by host-lane's lane"
    assert not list(shared.glob("*/page")), "stop_pages should have removed the pages"
    for tmp in temp_dirs.values():
        assert not (tmp / "asyncq-native-pages").exists()
