"""Between acknowledgement and claim: a Redis error there is retried, then the message is handed back,
and never dropped (worker/runner.py ``_until_claimed``; docs/OPERATIONS.md, "Between acknowledgement and
claim").

The fake Redis fails the first calls of each kind as a test plans it: ``refuse`` (the command never ran:
a refused or reset connection), ``readonly`` (a replica answered during a failover) or ``lost`` (the
command ran, then the reply was lost: a timeout). A pipeline is all or nothing, like MULTI. Sleeping is
a fake clock, so a 300 s outage takes no time.
"""

from __future__ import annotations

import base64
import json
import logging
import time as real_time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from airflow_asyncq_provider.memory.admission import Admission
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import events
from airflow_asyncq_provider.worker import runner as runner_module
from airflow_asyncq_provider.worker.runner import WorkloadRunner
from tests.unit.conftest import FakePipeline, FakeRedis

from .test_runner import FakeForks

MIB = 1024**2
TASK = "T"
RECORD = f"gap:task:{TASK}"


class FlakyPipeline(FakePipeline):
    def execute(self) -> list[Any]:
        faults = [self._redis.take_fault(name) for name, _args, _kwargs in self._ops]
        refused = next((f for f in faults if f in ("refuse", "readonly")), None)
        if refused:
            self._ops = []
            raise FlakyRedis.error(refused)
        self._redis.in_pipeline = True
        try:
            replies = super().execute()
        finally:
            self._redis.in_pipeline = False
        if "lost" in faults:
            raise redis.TimeoutError("Timeout reading from socket")
        return replies


class FlakyRedis(FakeRedis):
    """``plan[command]``: the modes of that command's next calls, in order ("ok" lets one through)."""

    def __init__(self, **plan: list[str]) -> None:
        super().__init__()
        self.plan = {name.upper(): list(modes) for name, modes in plan.items()}
        self.in_pipeline = False
        self.failed: list[str] = []

    @staticmethod
    def error(mode: str) -> redis.RedisError:
        if mode == "readonly":
            return redis.ReadOnlyError("You can't write against a read only replica.")
        return redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def take_fault(self, name: str) -> str | None:
        modes = self.plan.get(name.upper())
        if not modes:
            return None
        mode = modes.pop(0)
        if mode == "ok":
            return None
        self.failed.append(f"{name.upper()}:{mode}")
        return mode

    def _cmd(self, name: str) -> None:
        if not self.in_pipeline:
            mode = self.take_fault(name)
            if mode is not None:
                raise self.error(mode)
        super()._cmd(name)

    def pipeline(self, transaction: bool = True) -> FlakyPipeline:
        return FlakyPipeline(self)

    def always(self, name: str, mode: str = "refuse") -> None:
        self.plan[name.upper()] = [mode] * 100_000


class FakeClock:
    """Stands in for the runner module's ``time``: sleeping moves a fake monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds

    def __getattr__(self, name: str) -> Any:  # time(), strftime, gmtime: the real ones
        return getattr(real_time, name)


class Requeue:
    """The runner's hand-back to the broker, failing its first ``failures`` calls as kombu would."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[tuple[Any, ...]] = []
        self.sent: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> None:
        from kombu.exceptions import OperationalError

        self.calls.append(args)
        if len(self.calls) <= self.failures:
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.sent.append(args)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(runner_module, "time", fake)
    yield fake


def _payload(token: str = "tok") -> str:
    ti = {"dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1, "map_index": -1, "id": "x"}
    return json.dumps({"type": "ExecuteTask", "token": token, "ti": ti})


def _expired_token() -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS512'})}.{part({'exp': real_time.time() - 60})}.sig"


def _runner(client: FlakyRedis, forks: FakeForks | None = None, requeue: Requeue | None = None,
            budget: int = 1024 * MIB, **settings: Any) -> WorkloadRunner:
    config = AsyncQSettings(broker_url="redis://fake/0", key_prefix="gap", **settings)
    return WorkloadRunner(config, "w1@host", forks or FakeForks(), client,  # type: ignore[arg-type]
                          Admission(budget, config.default_memory_request), requeue=requeue)


def _kinds(client: FakeRedis) -> list[str]:
    return [fields["kind"] for _sid, fields in client.stream if fields["id"] == TASK]


def _settled(runner: WorkloadRunner) -> None:
    """Whatever happened, the slot gave back its memory and its reservation of the id."""
    assert runner.admission.used == 0
    assert runner._claiming == set()
    assert runner.running == {}


# ------------------------------------------------------------------ retried, then run exactly once
@pytest.mark.parametrize("mode", ["refuse", "readonly", "lost"])
def test_counting_the_delivery_is_retried_and_counted_once(clock, mode):
    client = FlakyRedis(hincrby=[mode, mode])
    forks = FakeForks()
    runner = _runner(client, forks, Requeue())
    assert runner.run(TASK, _payload(), queue="q") == events.SUCCESS
    assert _kinds(client) == [events.RECEIVED, events.STARTED, events.SUCCESS]
    assert forks.spawned == [TASK]
    assert clock.sleeps == [0.2, 0.4]  # backoff
    # "lost" ran the increment twice before a reply came back; the count is a bound, not an identity
    assert client.hashes[RECORD]["deliveries"] == ("3" if mode == "lost" else "1")
    _settled(runner)


def test_lost_replies_alone_never_dead_letter_a_message(clock):
    """Five counts ran but only the last reply arrived: this is still the first delivery for
    ``max_deliveries``, not the sixth."""
    client = FlakyRedis(hincrby=["lost"] * 5)
    forks = FakeForks()
    runner = _runner(client, forks, Requeue(), max_deliveries=3)
    assert runner.run(TASK, _payload(), queue="q") == events.SUCCESS
    assert client.hashes[RECORD]["deliveries"] == "6"
    assert forks.spawned == [TASK] and "gap:dlq" not in client.lists
    _settled(runner)


@pytest.mark.parametrize("mode", ["refuse", "readonly"])
def test_a_refused_claim_is_retried_without_counting_the_delivery_again(clock, mode):
    client = FlakyRedis(hsetnx=[mode] * 3)
    forks = FakeForks()
    runner = _runner(client, forks, Requeue())
    assert runner.run(TASK, _payload(), queue="q") == events.SUCCESS
    assert client.failed == [f"HSETNX:{mode}"] * 3
    assert client.hashes[RECORD]["deliveries"] == "1"
    assert client.hashes[RECORD]["claimed_by"] == "w1@host"
    assert forks.spawned == [TASK]
    _settled(runner)


def test_a_claim_whose_reply_was_lost_is_recognised_as_this_slots_own(clock):
    """The HSETNX ran, its reply did not arrive: the retry finds the id claimed under this worker's
    name. Dropping it as a duplicate would strand it; it is run, once."""
    client = FlakyRedis(hsetnx=["lost"])
    forks = FakeForks()
    runner = _runner(client, forks, Requeue())
    assert runner.run(TASK, _payload(), queue="q") == events.SUCCESS
    assert client.failed == ["HSETNX:lost"]
    assert _kinds(client) == [events.RECEIVED, events.STARTED, events.SUCCESS]
    assert forks.spawned == [TASK]
    _settled(runner)


def test_a_lost_reply_does_not_take_another_workers_claim(clock):
    client = FlakyRedis(hsetnx=["lost"])
    client.hashes[RECORD] = {"claimed_by": "w2@elsewhere", "state": "started"}
    forks = FakeForks()
    runner = _runner(client, forks, Requeue())
    assert runner.run(TASK, _payload(), queue="q") == events.DUPLICATE
    assert forks.spawned == []
    assert _kinds(client) == [events.DUPLICATE]
    _settled(runner)


def test_only_one_slot_of_a_worker_claims_an_id(clock):
    """Another slot of this worker holds the id (a duplicate delivery to the same worker): this one
    drops it before asking Redis, and leaves the other slot's reservation alone."""
    client = FlakyRedis()
    client.hashes[RECORD] = {"claimed_by": "w1@host"}
    forks = FakeForks()
    runner = _runner(client, forks, Requeue())
    runner._claiming.add(TASK)
    assert runner.run(TASK, _payload(), queue="q") == events.DUPLICATE
    assert "HSETNX" not in client.commands
    assert forks.spawned == []
    assert runner._claiming == {TASK}


def test_a_claim_found_under_this_name_and_never_reported_is_this_slots_own(clock):
    """A client that resends by itself (a redis-py ``Retry``) hides the lost reply from the slot: the
    claim then answers "not won, claimed by w1@host". Nobody reported it received, so it is run."""
    client = FlakyRedis()
    client.hashes[RECORD] = {"claimed_by": "w1@host", "state": "published"}
    forks = FakeForks()
    runner = _runner(client, forks, Requeue())
    assert runner.run(TASK, _payload(), queue="q") == events.SUCCESS
    assert forks.spawned == [TASK]
    _settled(runner)


@pytest.mark.parametrize("state", [events.RECEIVED, events.STARTED, events.SUCCESS, events.FAILED])
def test_a_claim_under_this_name_that_went_on_to_run_is_a_duplicate(clock, state):
    """An earlier delivery to this worker ran it (or is running it): this copy is dropped."""
    client = FlakyRedis()
    client.hashes[RECORD] = {"claimed_by": "w1@host", "state": state}
    forks = FakeForks()
    assert _runner(client, forks, Requeue()).run(TASK, _payload(), queue="q") == events.DUPLICATE
    assert forks.spawned == []


def test_the_token_expired_event_is_retried_until_written(clock):
    client = FlakyRedis(xadd=["refuse", "readonly"])
    forks = FakeForks()
    runner = _runner(client, forks, Requeue())
    assert runner.run(TASK, _payload(_expired_token()), queue="q") == events.TOKEN_EXPIRED
    assert _kinds(client) == [events.TOKEN_EXPIRED]
    assert forks.spawned == [] and "claimed_by" not in client.hashes[RECORD]
    assert client.hashes[RECORD]["deliveries"] == "1"
    _settled(runner)


def test_a_dead_letter_that_could_not_be_written_is_retried(clock):
    client = FlakyRedis(lpush=["refuse"])
    client.hashes[RECORD] = {"deliveries": "3"}
    forks = FakeForks()
    runner = _runner(client, forks, Requeue())
    assert runner.run(TASK, _payload(), queue="q") == events.FAILED
    (entry,) = [json.loads(x) for x in client.lists["gap:dlq"]]
    assert entry["id"] == TASK and "delivered 4 times" in entry["error"]
    assert client.hashes[RECORD]["deliveries"] == "4"  # counted once
    assert _kinds(client) == [events.FAILED]
    assert forks.spawned == []
    _settled(runner)


# ------------------------------------------------------------------ hand-backs
def test_an_admission_hand_back_the_broker_refused_is_retried(clock):
    client = FlakyRedis()
    requeue = Requeue(failures=2)
    runner = _runner(client, FakeForks(), requeue, budget=128 * MIB)  # the default request is 256 MiB
    assert runner.run(TASK, _payload(), queue="q", priority=3) == "deferred"
    assert len(requeue.calls) == 3
    assert requeue.sent == [(TASK, _payload(), None, "q", 3, {"dag_id": "d", "task_id": "t", "run_id": "r",
                                                               "try_number": 1, "map_index": -1})]
    assert client.hashes[RECORD]["deliveries"] == "0"  # every count was undone by its hand-back
    assert "claimed_by" not in client.hashes[RECORD]
    _settled(runner)


def test_a_hand_back_whose_uncount_failed_is_retried_and_counts_stay_right(clock):
    client = FlakyRedis(hincrby=["ok", "refuse"])  # the count passes, undoing it fails once
    requeue = Requeue()
    runner = _runner(client, FakeForks(), requeue)
    runner.maintenance = {"comment": "patching"}
    assert runner.run(TASK, _payload(), queue="q") == "deferred"
    assert client.failed == ["HINCRBY:refuse"]
    assert len(requeue.sent) == 1
    assert client.hashes[RECORD]["deliveries"] == "0"
    _settled(runner)


def test_an_outage_longer_than_event_retry_timeout_hands_the_message_back(clock, caplog):
    client = FlakyRedis()
    client.always("hsetnx")
    requeue = Requeue()
    forks = FakeForks()
    runner = _runner(client, forks, requeue, event_retry_timeout=20.0)
    with caplog.at_level(logging.WARNING, logger=runner_module.__name__):
        assert runner.run(TASK, _payload(), queue="q", priority=1) == "requeued"
    assert sum(clock.sleeps) <= 20.0 and len(clock.sleeps) >= 5
    assert max(clock.sleeps) == 5.0  # the backoff is capped
    assert [c[0] for c in requeue.sent] == [TASK]
    assert forks.spawned == [] and _kinds(client) == []
    assert any("handed back to queue 'q' before its claim" in r.getMessage() for r in caplog.records)
    _settled(runner)


def test_when_even_the_hand_back_fails_the_log_names_the_task_and_who_recovers_it(clock, caplog):
    client = FlakyRedis()
    client.always("hincrby")
    requeue = Requeue(failures=10**6)
    runner = _runner(client, FakeForks(), requeue, event_retry_timeout=10.0)
    with caplog.at_level(logging.ERROR, logger=runner_module.__name__):
        assert runner.run(TASK, _payload(), queue="q") == "lost"
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert f"Workload {TASK} was acknowledged but neither claimed nor handed back" in message
    assert "[scheduler] task_queued_timeout" in message and "Redis restart" in message
    assert "event_retry_timeout" in message and "OperationalError" in message
    _settled(runner)


def test_a_draining_worker_hands_back_at_the_first_failure(clock):
    client = FlakyRedis(hincrby=["refuse"])
    requeue = Requeue()
    runner = _runner(client, FakeForks(), requeue)
    runner.draining = True
    assert runner.run(TASK, _payload(), queue="q") == "requeued"
    assert clock.sleeps == [] and len(requeue.sent) == 1
    _settled(runner)


# ------------------------------------------------------------------ just after the claim
def test_a_first_lease_that_fails_does_not_orphan_the_forked_workload(clock):
    """The workload is forked before the first lease; the slot must still wait for it and report."""
    client = FlakyRedis(set=["refuse"])
    forks = FakeForks()
    runner = _runner(client, forks, Requeue())
    assert runner.run(TASK, _payload(), queue="q") == events.SUCCESS
    assert _kinds(client) == [events.RECEIVED, events.STARTED, events.SUCCESS]
    _settled(runner)


def test_events_after_the_claim_are_retried_on_a_readonly_replica_too(clock):
    client = FlakyRedis(xadd=["readonly", "readonly"])
    runner = _runner(client, FakeForks(), Requeue())
    assert runner.run(TASK, _payload(), queue="q") == events.SUCCESS
    assert _kinds(client) == [events.RECEIVED, events.STARTED, events.SUCCESS]
    _settled(runner)
