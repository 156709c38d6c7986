"""worker.drain: the first SIGTERM drains (and tells the native lane to drain alongside), the second kills."""

from __future__ import annotations

from types import SimpleNamespace

from airflow_asyncq_provider import exitcodes
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.worker.drain import Drain


class Runner:
    def __init__(self) -> None:
        self.draining = False
        self.running: dict[str, object] = {}
        self.stopped: list[tuple[str, bool]] = []

    def stop_all(self, reason: str, kill_now: bool = False) -> None:
        self.stopped.append((reason, kill_now))


def test_first_sigterm_drains_and_starts_the_lanes_drain_once():
    runner, lane_told = Runner(), []
    drain = Drain(runner, AsyncQSettings(broker_url="redis://h/0", worker_drain_timeout=0), "w@h",  # type: ignore[arg-type]
                  on_first_signal=lambda: lane_told.append(1))
    drain.on_shutdown("SIGTERM")
    assert runner.draining and lane_told == [1] and drain.exit_code == exitcodes.OK
    drain.on_shutdown("SIGTERM")
    assert lane_told == [1]  # not again
    assert drain.exit_code == exitcodes.FORCED
    assert runner.stopped == [("worker w@h was stopped by a second SIGTERM", True)]


def test_lane_begin_stop_signals_once_and_stop_does_not_signal_again(monkeypatch):
    from airflow_asyncq_provider.worker.native_lane import LaneProcess, LaneSpec

    sent: list[int] = []
    proc = SimpleNamespace(pid=1, returncode=0, poll=lambda: None, send_signal=sent.append,
                           wait=lambda timeout=None: 0)
    lane = LaneProcess(LaneSpec(1, 1), "w@h")
    lane.proc = proc  # type: ignore[assignment]
    lane.begin_stop()
    lane.stop(5)
    assert len(sent) == 1
    lane.supervise()  # a lane that is stopping is never restarted
    assert lane.restarts == 0
