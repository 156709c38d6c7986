"""worker.runner: the payload check, the workload key, and one slot's decisions (fake Redis, fake forks)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_asyncq_provider.broker.messages import check_payload, workload_key
from airflow_asyncq_provider.errors import MalformedMessage
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import events
from airflow_asyncq_provider.worker.forkclient import ForkServerError, InvalidWorkload
from airflow_asyncq_provider.worker.forkserver import EXIT_CRASHED, EXIT_DUPLICATE, EXIT_SIGNAL_BASE
from airflow_asyncq_provider.worker.runner import WorkloadRunner

TI = {"dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 2, "map_index": -1}


def _payload(**extra: Any) -> str:
    data = {"type": "ExecuteTask", "token": "tok", "ti": dict(TI, id="x", queue="q")}
    data.update(extra)
    return json.dumps(data)


def test_check_payload_accepts_a_real_workload(make_workload):
    data = check_payload(make_workload().model_dump_json())
    assert data["type"] == "ExecuteTask"
    assert data["token"] == "tok"


@pytest.mark.parametrize("kind", ["ExecuteTask", "ExecuteCallback"])
def test_check_payload_accepts_both_types(kind):
    assert check_payload(json.dumps({"type": kind, "token": "t"}))["type"] == kind


@pytest.mark.parametrize(("payload", "fragment"), [
    (None, "payload is NoneType, expected a JSON string"),
    (b'{"type": "ExecuteTask"}', "payload is bytes"),
    ({"type": "ExecuteTask", "token": "t"}, "payload is dict"),
    ("not json", "payload is not JSON"),
    ("", "payload is not JSON"),
    ("[1, 2]", "not an Airflow workload (type=None)"),
    ('"ExecuteTask"', "not an Airflow workload (type=None)"),
    ('{"type": "RunTrigger", "token": "t"}', "not an Airflow workload (type='RunTrigger')"),
    ('{"token": "t"}', "not an Airflow workload (type=None)"),
    ('{"type": "ExecuteTask"}', "payload has no token"),
    ('{"type": "ExecuteTask", "token": ""}', "payload has no token"),
    ('{"type": "ExecuteTask", "token": 123}', "payload has no token"),
])
def test_check_payload_refuses(payload, fragment):
    with pytest.raises(MalformedMessage) as err:
        check_payload(payload)
    assert fragment in str(err.value)


def test_workload_key_for_a_task(make_workload):
    workload = make_workload(dag_id="dd", task_id="tt", run_id="rr", try_number=3, map_index=4)
    assert workload_key(json.loads(workload.model_dump_json())) == {
        "dag_id": "dd", "task_id": "tt", "run_id": "rr", "try_number": 3, "map_index": 4}


def test_workload_key_for_a_callback():
    assert workload_key({"callback": {"id": "cb-1", "data": {}}}) == {"callback_id": "cb-1"}


@pytest.mark.parametrize("data", [{}, {"ti": "nope"}, {"callback": ["x"]}, {"ti": None, "callback": None}])
def test_workload_key_for_malformed_data(data):
    assert workload_key(data) is None


def test_workload_key_tolerates_missing_fields():
    assert workload_key({"ti": {"dag_id": "d"}}) == {
        "dag_id": "d", "task_id": None, "run_id": None, "try_number": None, "map_index": None}


# ------------------------------------------------------------------------------------------ the slot
class FakeChild:
    def __init__(self, status: dict[str, Any], pid: int = 4242) -> None:
        self.pid = pid
        self._status = status

    def wait(self) -> dict[str, Any]:
        return self._status

    def release(self) -> None:
        self.released = True


class FakeForks:
    def __init__(self, status: dict[str, Any] | None = None, error: Exception | None = None) -> None:
        self.status = status or {"code": 0, "signal": None, "result": None}
        self.error = error
        self.spawned: list[str] = []

    def spawn(self, task_id: str, payload: str) -> FakeChild:
        self.spawned.append(task_id)
        if self.error:
            raise self.error
        return FakeChild(self.status)


GIB = 1024**3


def _runner(fake_redis, forks, budget: int = 8 * GIB, requeue: Any = None, **settings: Any) -> WorkloadRunner:
    from airflow_asyncq_provider.memory.admission import Admission

    config = AsyncQSettings(broker_url="redis://fake/0", key_prefix="rt", **settings)
    admission = Admission(budget, config.default_memory_request)
    return WorkloadRunner(config, "w1@host", forks, fake_redis, admission,  # type: ignore[arg-type]
                          requeue=requeue)


def _events(fake_redis, task_id: str = "T") -> list[dict[str, str]]:
    return [fields for _id, fields in fake_redis.stream if fields["id"] == task_id]


def test_run_success(fake_redis):
    forks = FakeForks()
    runner = _runner(fake_redis, forks)
    assert runner.run("T", _payload()) == events.SUCCESS
    kinds = [e["kind"] for e in _events(fake_redis)]
    assert kinds == [events.RECEIVED, events.STARTED, events.SUCCESS]
    started = _events(fake_redis)[1]
    assert started["pid"] == "4242" and started["hostname"] == "w1@host"
    assert json.loads(started["key"]) == TI
    record = fake_redis.hashes["rt:task:T"]
    assert record["claimed_by"] == "w1@host" and record["state"] == events.SUCCESS
    assert runner.running == {}
    assert runner.last_claim_at > 0
    assert runner.admission.used == 0  # the slot's memory is handed back
    assert fake_redis.strings["rt:lease:T"] == "w1@host"  # a lease while it ran


@pytest.mark.parametrize(("status", "kind", "reason"), [
    ({"code": 1, "signal": None, "result": None}, events.FAILED, "task process exited with code 1"),
    ({"code": EXIT_SIGNAL_BASE + 9, "signal": None, "result": None}, events.FAILED,
     "task process killed by signal SIGKILL (9)"),
    ({"code": EXIT_CRASHED, "signal": None, "result": {"error": "E: x"}}, events.FAILED,
     "supervisor crashed: E: x"),
    ({"code": None, "signal": None, "result": {"error": "fork server died while the task ran"}},
     events.FAILED, "supervisor crashed: fork server died while the task ran"),
])
def test_run_failures_carry_a_reason(fake_redis, status, kind, reason):
    runner = _runner(fake_redis, FakeForks(status))
    assert runner.run("T", _payload()) == kind
    last = _events(fake_redis)[-1]
    assert (last["kind"], last["reason"]) == (kind, reason)


def test_run_409_is_a_duplicate_not_a_terminal_state(fake_redis):
    runner = _runner(fake_redis, FakeForks({"code": EXIT_DUPLICATE, "signal": None, "result": None}))
    assert runner.run("T", _payload()) == events.DUPLICATE
    kinds = [e["kind"] for e in _events(fake_redis)]
    assert kinds[-1] == events.DUPLICATE
    assert not set(kinds) & events.TERMINAL


def test_run_malformed_goes_to_dead_letters(fake_redis):
    forks = FakeForks()
    runner = _runner(fake_redis, forks)
    assert runner.run("T", "not json") == "rejected"
    (entry,) = [json.loads(x) for x in fake_redis.lists["rt:dlq"]]
    assert entry["id"] == "T" and entry["payload"] == "not json" and entry["hostname"] == "w1@host"
    assert entry["error"].startswith("payload is not JSON")
    assert forks.spawned == [] and fake_redis.stream == []
    assert "rt:task:T" not in fake_redis.hashes  # not claimed


def test_run_already_claimed_is_a_duplicate(fake_redis):
    fake_redis.hashes["rt:task:T"] = {"claimed_by": "other@host", "state": "started"}
    forks = FakeForks()
    assert _runner(fake_redis, forks).run("T", _payload()) == events.DUPLICATE
    (event,) = _events(fake_redis)
    assert event["kind"] == events.DUPLICATE and event["reason"] == "already claimed by other@host"
    assert forks.spawned == []
    assert fake_redis.hashes["rt:task:T"]["state"] == "started"  # the real run's record is untouched


def test_run_revoked_before_start(fake_redis):
    fake_redis.hashes["rt:task:T"] = {"revoked": "1.0"}
    forks = FakeForks()
    assert _runner(fake_redis, forks).run("T", _payload()) == events.REVOKED
    assert [e["kind"] for e in _events(fake_redis)] == [events.REVOKED]
    assert forks.spawned == []


def test_run_revoked_while_running(fake_redis):
    forks = FakeForks({"code": EXIT_SIGNAL_BASE + 15, "signal": None, "result": None})
    runner = _runner(fake_redis, forks)
    original = runner._claim

    def claim_then_revoke(delivery: Any) -> str | None:
        dropped = original(delivery)
        fake_redis.hashes[f"rt:task:{delivery.task_id}"]["revoked"] = "2.0"
        return dropped

    runner._claim = claim_then_revoke  # type: ignore[method-assign]
    assert runner.run("T", _payload()) == events.REVOKED
    last = _events(fake_redis)[-1]
    assert last["kind"] == events.REVOKED and last["reason"].startswith("revoked while running (")


def test_run_invalid_workload_is_dead_lettered_and_failed(fake_redis):
    forks = FakeForks(error=InvalidWorkload("invalid workload: ValidationError: 3 errors"))
    assert _runner(fake_redis, forks).run("T", _payload()) == events.FAILED
    last = _events(fake_redis)[-1]
    assert last["kind"] == events.FAILED and last["reason"].startswith("invalid workload")
    assert json.loads(fake_redis.lists["rt:dlq"][0])["error"].startswith("invalid workload")


def test_run_fork_failure_is_failed_with_reason(fake_redis):
    forks = FakeForks(error=ForkServerError("no pid"))
    assert _runner(fake_redis, forks).run("T", _payload()) == events.FAILED
    last = _events(fake_redis)[-1]
    assert last["reason"] == "worker could not fork the workload: no pid"
    assert "rt:dlq" not in fake_redis.lists  # a fork failure is ours, not the message's


def _jwt(exp: float) -> str:
    import base64

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS512'})}.{part({'exp': exp, 'sub': 'x'})}.signature"


def test_token_expiry_reads_the_exp_claim():
    from airflow_asyncq_provider.broker.messages import token_expiry

    assert token_expiry(_jwt(1234.5)) == 1234.5
    for token in ("tok", "", "a.b.c", "a.e30.c"):  # no JWT, bad base64, no exp
        assert token_expiry(token) is None


def test_expired_token_is_handed_back_unclaimed(fake_redis):
    import time

    forks = FakeForks()
    runner = _runner(fake_redis, forks)
    outcome = runner.run("T", _payload(token=_jwt(time.time() - 10)))
    assert outcome == events.TOKEN_EXPIRED
    assert [e["kind"] for e in _events(fake_redis)] == [events.TOKEN_EXPIRED]
    assert "claimed_by" not in fake_redis.hashes.get("rt:task:T", {})  # a fresh copy can still run
    assert forks.spawned == []


def test_too_many_deliveries_without_a_start_fail_visibly(fake_redis):
    fake_redis.hashes["rt:task:T"] = {"deliveries": "3"}
    forks = FakeForks()
    assert _runner(fake_redis, forks, max_deliveries=3).run("T", _payload()) == events.FAILED
    (event,) = _events(fake_redis)
    assert event["kind"] == events.FAILED
    assert event["reason"] == "delivered 4 times without starting ([asyncq] max_deliveries)"
    assert json.loads(fake_redis.lists["rt:dlq"][0])["error"] == event["reason"]
    assert forks.spawned == []


def test_no_memory_for_the_request_hands_the_message_back(fake_redis, monkeypatch):
    import airflow_asyncq_provider.worker.runner as runner_module

    monkeypatch.setattr(runner_module.time, "sleep", lambda _s: None)
    forks = FakeForks()
    requeued: list[tuple[Any, ...]] = []
    runner = _runner(fake_redis, forks, budget=1 * GIB, requeue=lambda *args: requeued.append(args))
    meta = {"memory_request": 2 * GIB, "memory_limit": None}
    assert runner.run("T", _payload(), meta, queue="q", priority=3) == "deferred"
    key = {"dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 2, "map_index": -1}
    assert requeued == [("T", _payload(), meta, "q", 3, key)]
    assert fake_redis.hashes["rt:task:T"]["deliveries"] == "0"  # a hand-back is not a delivery
    assert forks.spawned == [] and fake_redis.stream == []


@pytest.mark.parametrize("meta", ["x", [1], {"memory_request": 0}, {"memory_request": "1G"},
                                  {"memory_request": 10, "memory_limit": -1}])
def test_bad_metadata_goes_to_dead_letters(fake_redis, meta):
    assert _runner(fake_redis, FakeForks()).run("T", _payload(), meta) == "rejected"
    entry = json.loads(fake_redis.lists["rt:dlq"][0])
    assert entry["error"].startswith("message metadata")
    assert entry["meta"] == meta
