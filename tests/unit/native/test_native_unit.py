"""Native queue tasks without services: settings, argument checks, the trigger's decisions, the
operator's outcomes, eager execution and the thread time limit."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.native.client import Signature, check_arguments, check_registered, remote_error
from airflow_asyncq_provider.native.errors import (
    ArgumentNotSerializable,
    NativeTaskFailed,
    ResultTooLarge,
    UnknownTaskError,
)
from airflow_asyncq_provider.native.lane import lane_sizes
from airflow_asyncq_provider.native.limits import SyncJob
from airflow_asyncq_provider.settings import load_settings
from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.triggers.native_result import NativeResultTrigger
from airflow_asyncq_provider.worker.native_lane import LaneSpec, lane_spec
from tests.unit.conftest import StubConf


# ------------------------------------------------------------------ settings and CLI
def test_settings_parse_native_options() -> None:
    s = load_settings(StubConf(task_modules=" a.tasks , b ", loop_concurrency="500", sync_threads="8",
                               result_expires="60"))
    assert s.task_modules == ("a.tasks", "b")
    assert (s.loop_concurrency, s.sync_threads, s.result_expires) == (500, 8, 60)
    default = load_settings(StubConf())
    assert (default.task_modules, default.loop_concurrency, default.sync_threads) == ((), 0, 0)


@pytest.mark.parametrize(("key", "value"), [("task_modules", "a-b.tasks"), ("loop_concurrency", "-1"),
                                            ("sync_threads", "x"), ("result_expires", "0")])
def test_bad_native_settings_name_the_option(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"\[asyncq\] {key}"):
        load_settings(StubConf(**{key: value}))


def test_lane_spec_resolves_cli_over_settings_and_refuses_shared_queues() -> None:
    assert lane_spec(None, None, None, 0, 0, ["default"]) == LaneSpec(0, 0, ("native",))
    assert not lane_spec(None, None, None, 0, 0, ["default"]).enabled
    spec = lane_spec("100", None, "n1,n2", 0, 4, ["default"])
    assert spec == LaneSpec(100, 4, ("n1", "n2")) and spec.enabled
    with pytest.raises(ConfigError, match="both Airflow queues"):
        lane_spec("10", "1", "default", 0, 0, ["default"])
    with pytest.raises(ConfigError, match="--sync-threads must be an integer >= 0"):
        lane_spec("10", "-2", None, 0, 0, ["default"])
    assert lane_sizes(100, 0) == (100, 1) and lane_sizes(0, 3) == (1, 3)


# ------------------------------------------------------------------ sending
def test_non_json_argument_is_named() -> None:
    with pytest.raises(ArgumentNotSerializable, match=r"argument kwargs\['when'\] \(datetime\)"):
        import datetime

        check_arguments(Signature("t.x", (1,), {"when": datetime.datetime.now()}))
    with pytest.raises(ArgumentNotSerializable, match=r"argument args\[1\] \(set\)"):
        check_arguments(Signature("t.x", (1, {2})))
    with pytest.raises(ValueError, match="priority must be an integer 0..9"):
        check_arguments(Signature("t.x", priority=12))
    check_arguments(Signature("t.x", (1, "a", [1.5], {"k": None})))


def test_signature_of_accepts_names_and_dicts() -> None:
    assert Signature.of("t.a", queue="q") == Signature("t.a", queue="q")
    sig = Signature.of({"task_name": "t.b", "args": [1], "priority": 3}, queue="q")
    assert sig == Signature("t.b", (1,), {}, "q", 3)
    with pytest.raises(ValueError, match="unknown keys"):
        Signature.of({"task_name": "t.b", "argz": [1]})


class RegistryStub:
    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def hget(self, key: str, name: str) -> str | None:
        assert key == Keys("p").native_tasks
        return self.names.get(name)

    def hkeys(self, key: str) -> list[str]:
        return list(self.names)


def test_unknown_task_name_is_refused_before_sending() -> None:
    client = RegistryStub({"asyncq.examples.fetch_page": json.dumps({"kind": "async"})})
    check_registered(client, "p", ["asyncq.examples.fetch_page"])
    with pytest.raises(UnknownTaskError, match="Did you mean 'asyncq.examples.fetch_page'"):
        check_registered(client, "p", ["other.fetch_page"])
    with pytest.raises(UnknownTaskError, match="no native lane has registered any task yet"):
        check_registered(RegistryStub({}), "p", ["x"])


def test_remote_error_carries_the_remote_type_and_traceback() -> None:
    err = remote_error({"task_name": "t.fail", "task_id": "abc", "exc_type": "ValueError",
                        "exc_module": "builtins", "exc_message": "boom", "traceback": "Traceback...\nValueError: boom"})
    assert isinstance(err, NativeTaskFailed)
    assert type(err).__name__ == "ValueError" and type(err).__module__ == "asyncq.remote.builtins"
    assert "raised builtins.ValueError: boom" in str(err) and "remote traceback" in str(err)


# ------------------------------------------------------------------ the trigger's decisions
def _meta(status: str, result: Any = None, traceback: str | None = None) -> str:
    return json.dumps({"status": status, "result": result, "traceback": traceback, "task_id": "x"})


def test_trigger_records_success_and_keeps_waiting_through_retry() -> None:
    trigger = NativeResultTrigger(["a", "b"], ["t.a", "t.b"], 100)
    done: dict[int, Any] = {}
    assert trigger._take(0, _meta("RETRY", {"exc_type": "Retry"}), done) is None and not done
    assert trigger._take(0, _meta("SUCCESS", [1, 2]), done) is None
    assert trigger._take(1, None, done) is None
    assert trigger._take(1, _meta("SUCCESS", {"k": "v"}), done) is None
    event = trigger._success(done)
    assert event.payload == {"status": "success", "task_ids": ["a", "b"], "results": [[1, 2], {"k": "v"}]}
    assert trigger.serialize() == ("airflow_asyncq_provider.triggers.native_result.NativeResultTrigger",
                                   {"task_ids": ["a", "b"], "task_names": ["t.a", "t.b"], "max_result_bytes": 100})


def test_trigger_fails_fast_and_refuses_large_results() -> None:
    trigger = NativeResultTrigger(["a", "b"], ["t.a", "t.b"], 10)
    failure = trigger._take(1, _meta("FAILURE", {"exc_type": "KeyError", "exc_module": "builtins",
                                                 "exc_message": ["k"]}, "Traceback..."), {})
    assert failure is not None and failure.payload["status"] == "failed"
    assert failure.payload["exc_type"] == "KeyError" and failure.payload["traceback"] == "Traceback..."
    big = trigger._take(0, _meta("SUCCESS", "x" * 50), {})
    assert big is not None and big.payload["status"] == "too_large" and big.payload["limit"] == 10


# ------------------------------------------------------------------ the operator's outcomes
def _operator(**kwargs: Any) -> Any:
    from airflow_asyncq_provider.operators.queue_task import QueueTaskGroupOperator, QueueTaskOperator

    if "signatures" in kwargs:
        return QueueTaskGroupOperator(task_id="g", **kwargs)
    return QueueTaskOperator(task_id="q", task_name="t.a", **kwargs)


def test_operator_keeps_native_queue_apart_from_its_airflow_queue() -> None:
    op = _operator(queue="native_fast", airflow_queue="default", args=[1], kwargs={"b": 2})
    assert op.native_queue == "native_fast" and op.queue == "default"
    assert op.signatures() == [Signature("t.a", (1,), {"b": 2}, "native_fast")]
    assert set(op.template_fields) >= {"task_name", "task_args", "task_kwargs", "native_queue"}


def test_operator_outcomes() -> None:
    op = _operator()
    assert op.execute_complete({}, {"status": "success", "task_ids": ["a"], "results": [{"x": 1}]}) == {"x": 1}
    group = _operator(signatures=["t.a", {"task_name": "t.b", "args": [1]}])
    assert group.execute_complete({}, {"status": "success", "task_ids": ["a", "b"], "results": [1, 2]}) == [1, 2]
    with pytest.raises(ResultTooLarge, match="write the data to a file"):
        op.execute_complete({}, {"status": "too_large", "task_id": "a", "task_name": "t.a", "size": 9, "limit": 1})
    with pytest.raises(NativeTaskFailed, match="builtins.ZeroDivisionError"):
        op.execute_complete({}, {"status": "failed", "task_id": "a", "task_name": "t.a", "exc_type": "ZeroDivisionError",
                                 "exc_module": "builtins", "exc_message": "division by zero", "traceback": "tb"})


def test_operator_module_does_not_import_celery_or_redis() -> None:
    code = ("import sys; import airflow_asyncq_provider.operators.queue_task, "
            "airflow_asyncq_provider.triggers.native_result; "
            "print(sorted(m for m in ('celery', 'redis', 'kombu') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------ eager mode (what users' unit tests do)
def test_eager_runs_async_and_sync_tasks_with_bind_and_retry() -> None:
    from airflow_asyncq_provider.native import fleet

    @fleet.task(name="unit.double", bind=True)
    async def double(self: Any, x: int) -> dict[str, Any]:
        return {"value": 2 * x, "eager": self.request.is_eager}

    @fleet.task(name="unit.retry", bind=True, max_retries=3)
    async def retrying(self: Any) -> int:
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return self.request.retries

    @fleet.task(name="unit.add")
    def add(a: int, b: int) -> int:
        return a + b

    fleet.conf.update(task_always_eager=True, task_eager_propagates=True)
    try:
        assert double.delay(21).get() == {"value": 42, "eager": True}
        assert add.delay(2, 3).get() == 5
        # As in stock Celery, eager retries re-run only without task_eager_propagates.
        fleet.conf.update(task_eager_propagates=False)
        assert retrying.delay().get() == 2
    finally:
        fleet.conf.update(task_always_eager=False, task_eager_propagates=False)


# ------------------------------------------------------------------ thread time limits
def test_soft_limit_is_raised_inside_a_sync_thread_only_within_the_body() -> None:
    job = SyncJob(soft=0.05, hard=None, timeout_callback=None)
    outcome: list[str] = []

    def body() -> None:
        job.enter_body()
        try:
            end = time.monotonic() + 5
            while time.monotonic() < end:
                pass
            outcome.append("ran to the end")
        except SoftTimeLimitExceeded:
            outcome.append("soft limit")
        finally:
            job.leave_body()
            job.absorb()

    thread = threading.Thread(target=body)
    job.check(time.monotonic())  # not in the body yet: nothing is raised anywhere
    assert job.raised == 0
    thread.start()
    deadline = time.monotonic() + 3
    while thread.is_alive() and time.monotonic() < deadline:
        job.check(time.monotonic())
        time.sleep(0.02)
    thread.join(5)
    assert outcome == ["soft limit"] and job.raised == 1
