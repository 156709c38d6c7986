"""worker.fencing: the fencing clock (a fake time source), the derived times, and what a fence does to
the runner, the heartbeat and the consumer's gate."""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any
from unittest import mock

import pytest

from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.worker.fencing import Fence, fence_times, smallest_lost_timeout

HOST = "w1@host"


def _settings(**overrides: Any) -> AsyncQSettings:
    return AsyncQSettings(broker_url="redis://fake/0", key_prefix="ft", **overrides)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    def __init__(self, running: int = 2) -> None:
        self.fenced: str | None = None
        self.stops: list[tuple[str, float | None]] = []
        self._running = {f"task-{i}": object() for i in range(running)}

    def running_entries(self) -> dict[str, Any]:
        return dict(self._running)

    def stop_all(self, reason: str, kill_now: bool = False, grace: float | None = None) -> None:
        self.stops.append((reason, grace))


# ------------------------------------------------------------------------------------ derived times
def test_default_times_fence_at_20_s_and_finish_before_the_30_s_lost_timeout() -> None:
    times = fence_times(_settings())
    assert (times.lost_timeout, times.margin, times.grace, times.fence_after) == (30.0, 10.0, 5.0, 20.0)
    assert times.stopped_by == 25.5 and times.holds


def test_short_test_settings() -> None:
    times = fence_times(_settings(worker_lost_timeout=20, worker_heartbeat_interval=2, kill_grace_period=3,
                                  publish_timeout=2))
    assert (times.margin, times.fence_after, times.grace) == (5.0, 15.0, 2.5)
    assert times.stopped_by == 18.0 < 20


def test_the_margin_is_two_heartbeats_when_that_is_more_than_a_quarter() -> None:
    times = fence_times(_settings(worker_lost_timeout=30, worker_heartbeat_interval=10, publish_timeout=2))
    assert times.margin == 20 and times.fence_after == 12  # floor: 10 s interval + 2 s socket timeout


def test_the_grace_is_the_kill_grace_period_when_that_is_shorter() -> None:
    times = fence_times(_settings(worker_lost_timeout=120, kill_grace_period=4))
    assert (times.margin, times.grace) == (30.0, 4)


@pytest.mark.parametrize("interval", [0.5, 1, 2, 5, 10])
@pytest.mark.parametrize("lost_factor", [3, 4, 6, 10, 30])
@pytest.mark.parametrize("publish_timeout", [0.5, 2, 5])
@pytest.mark.parametrize("kill_grace", [1, 10, 60])
def test_whenever_fencing_holds_it_ends_before_the_lost_timeout_and_never_on_one_slow_beat(
        interval: float, lost_factor: int, publish_timeout: float, kill_grace: float) -> None:
    times = fence_times(_settings(worker_heartbeat_interval=interval, worker_lost_timeout=interval * lost_factor,
                                  publish_timeout=publish_timeout, kill_grace_period=kill_grace))
    assert times.fence_after >= interval + publish_timeout
    assert times.grace <= kill_grace
    if times.holds:
        assert times.fence_after + times.check_every + times.grace < times.lost_timeout


def test_settings_that_cannot_hold_are_named_with_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings(worker_lost_timeout=10, worker_heartbeat_interval=5)
    assert not fence_times(settings).holds
    assert smallest_lost_timeout(settings) == 16
    assert fence_times(_settings(worker_lost_timeout=16, worker_heartbeat_interval=5)).holds
    fence = Fence(settings, HOST, FakeRunner(), clock=FakeClock())  # type: ignore[arg-type]
    with mock.patch("threading.Thread.start"):
        fence.start()
    assert "Raise worker_lost_timeout to at least 16 s" in caplog.text


# ------------------------------------------------------------------------------------ the clock
def _fence(runner: FakeRunner | None = None, **overrides: Any) -> tuple[Fence, FakeRunner, FakeClock]:
    clock = FakeClock()
    runner = runner or FakeRunner()
    settings = _settings(**{"worker_lost_timeout": 20, "worker_heartbeat_interval": 2, "kill_grace_period": 3,
                            "publish_timeout": 2, **overrides})
    return Fence(settings, HOST, runner, clock=clock), runner, clock  # type: ignore[arg-type]


def test_heartbeats_that_get_through_keep_the_fence_down() -> None:
    fence, runner, clock = _fence()
    for _ in range(100):
        clock.now += 2.5
        fence.renewed(clock.now - 0.5)
        fence.check()
    assert runner.stops == [] and runner.fenced is None and fence.fences == 0


def test_silence_past_fence_after_stops_every_task_once_with_the_short_grace() -> None:
    fence, runner, clock = _fence()
    fence.renewed(clock.now)
    clock.now += 14.9
    fence.check()
    assert runner.stops == []
    clock.now += 0.2
    fence.check()
    assert runner.stops == [(
        "fenced: worker w1@host could not renew its leases for 15 s (Redis unreachable); stopped before the "
        "scheduler declares it lost", 2.5)]
    assert runner.fenced == runner.stops[0][0]
    clock.now += 30
    fence.check()
    assert len(runner.stops) == 1 and fence.fences == 1


def test_the_clock_runs_from_the_start_of_the_last_good_heartbeat() -> None:
    fence, runner, clock = _fence()
    started = clock.now
    clock.now += 1.9  # a slow beat: Redis set the TTL somewhere in between
    fence.renewed(started)
    clock.now = started + 15.1
    fence.check()
    assert runner.fenced is not None


def test_an_older_heartbeat_finishing_late_does_not_move_the_clock_back() -> None:
    fence, _runner, clock = _fence()
    fence.renewed(clock.now)
    fence.renewed(clock.now - 10)
    assert fence.silent_for() == 0


def test_the_first_heartbeat_that_gets_through_lifts_the_fence() -> None:
    fence, runner, clock = _fence()
    clock.now += 16
    fence.check()
    assert runner.fenced is not None
    clock.now += 20
    fence.renewed(clock.now)
    assert runner.fenced is None and fence.fenced_at is None
    clock.now += 14
    fence.check()
    assert len(runner.stops) == 1
    clock.now += 2
    fence.check()
    assert len(runner.stops) == 2 and fence.fences == 2


def test_start_restarts_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    fence, runner, clock = _fence()
    clock.now += 60  # the fork server took a minute to come up
    monkeypatch.setattr("threading.Thread.start", lambda self: None)
    fence.start()
    fence.check()
    assert runner.fenced is None


def test_a_failing_check_never_ends_the_fence_thread(caplog: pytest.LogCaptureFixture) -> None:
    fence, runner, clock = _fence()
    calls = []

    def broken() -> None:
        calls.append(1)
        if len(calls) == 3:
            fence.stop()
        raise RuntimeError("boom")

    fence.check = broken  # type: ignore[method-assign]
    fence.times = dataclasses.replace(fence.times, check_every=0.001)
    fence.run()
    assert len(calls) == 3 and "Fence check failed" in caplog.text


# ------------------------------------------------------------------------------------ the heartbeat
def _info() -> Any:
    from airflow_asyncq_provider.state.registry import WorkerInfo

    return WorkerInfo(queues=["default"], slots=1, running=0, version="0", pid=1, forkserver_pid=2, started_at=0.0,
                      last_claim_at=0.0, consumer_tick_at=0.0, draining=False, memory_budget=1, memory_reserved=0,
                      memory_in_use=0, tasks={})


def test_the_heartbeat_reports_its_start_only_when_every_duty_got_through(monkeypatch) -> None:
    from airflow_asyncq_provider.state.keys import Keys
    from airflow_asyncq_provider.worker import heartbeat as heartbeat_module

    ticks = iter([100.0, 200.0, 300.0])
    monkeypatch.setattr(heartbeat_module.time, "monotonic", lambda: next(ticks))
    renewed: list[float] = []
    failing = {"on": False}

    def renew_leases() -> None:
        if failing["on"]:
            raise ConnectionError("no route to Redis")

    beat = heartbeat_module.Heartbeat(_settings(), mock.MagicMock(), Keys("ft"), HOST, _info,
                                      renew=renew_leases, renewed=renewed.append)
    beat.beat()
    failing["on"] = True
    with pytest.raises(ConnectionError):
        beat.beat()
    failing["on"] = False
    beat.beat()
    assert renewed == [100.0, 300.0]


def test_the_heartbeat_clients_calls_are_bounded_by_the_socket_timeout() -> None:
    """A renewal waits at most publish_timeout per call and is never retried inside the call."""
    from airflow_asyncq_provider.state.client import make_redis

    client = make_redis(_settings(publish_timeout=2))
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 2 and kwargs["socket_connect_timeout"] == 2
    connection = client.connection_pool.make_connection()
    assert connection.retry._retries == 0


# ------------------------------------------------------------------------------------ runner and gate
def test_a_fenced_worker_hands_a_message_it_already_fetched_back(fake_redis) -> None:
    from airflow_asyncq_provider.memory.admission import Admission
    from airflow_asyncq_provider.worker.runner import WorkloadRunner

    settings = _settings()
    spawned: list[str] = []
    forks = types.SimpleNamespace(spawn=lambda task_id, payload: spawned.append(task_id))
    requeued: list[tuple[Any, ...]] = []
    runner = WorkloadRunner(settings, HOST, forks, fake_redis,  # type: ignore[arg-type]
                            Admission(1 << 30, settings.default_memory_request),
                            requeue=lambda *args: requeued.append(args))
    runner.fenced = "fenced: ..."
    payload = json.dumps({"type": "ExecuteTask", "token": "tok",
                          "ti": {"dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1, "map_index": -1}})
    assert runner.run("id-1", payload, None, queue="default") == "deferred"
    assert spawned == [] and [r[0] for r in requeued] == ["id-1"]


def test_stop_all_passes_the_fence_grace_to_each_stop(fake_redis, monkeypatch) -> None:
    from airflow_asyncq_provider.memory.admission import Admission
    from airflow_asyncq_provider.worker import runner as runner_module

    settings = _settings(kill_grace_period=10)
    runner = runner_module.WorkloadRunner(settings, HOST, mock.MagicMock(), fake_redis,  # type: ignore[arg-type]
                                          Admission(1 << 30, settings.default_memory_request))
    runner.running["a"] = runner_module.Running(pid=999_999_999, limit=None, log_path=None)
    timers: list[float] = []

    class FakeTimer:
        def __init__(self, delay: float, *_args: Any) -> None:
            timers.append(delay)
            self.daemon = False

        def start(self) -> None:
            pass

    from airflow_asyncq_provider.worker import running as running_module

    monkeypatch.setattr(running_module.threading, "Timer", FakeTimer)
    monkeypatch.setattr(running_module, "_signal_task_processes", lambda pid, sig: None)
    runner.stop_all("fenced: test", grace=2.5)
    assert timers == [2.5, 5.0]
    assert runner.running["a"].stop_reason == "fenced: test"
