"""LaneProcess.supervise: a lane that dies is restarted, a crash loop is not, a stopped lane stays stopped."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from airflow_asyncq_provider.worker import native_lane as child
from airflow_asyncq_provider.worker.native_lane import LaneProcess, LaneSpec


class ExitingLane(LaneProcess):
    """Runs a real process that exits at once with ``code`` instead of the lane (no broker needed)."""

    code = 3

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({self.code})"])
        self.proc.wait(30)


def test_a_dead_lane_is_restarted_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    lane = ExitingLane(LaneSpec(10, 1), "w@h")
    lane.start()
    first = lane.pid
    with caplog.at_level(logging.ERROR):
        lane.supervise()
    assert lane.pid != first and lane.restarts == 1 and not lane.gave_up
    assert "native lane w@h-native exited with code 3; restarting it" in caplog.text
    status = lane.status()
    assert status["restarts"] == 1 and status["alive"] is False and status["queues"] == ["native"]


def test_a_crash_loop_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    lane = ExitingLane(LaneSpec(10, 0), "w@h")
    lane.start()
    with caplog.at_level(logging.ERROR):
        for _ in range(child.MAX_RESTARTS + 3):
            lane.supervise()
    assert lane.restarts == child.MAX_RESTARTS and lane.gave_up and lane.status()["gave_up"]
    assert "not restarting it again" in caplog.text


def test_a_live_or_stopped_lane_is_left_alone() -> None:
    lane = LaneProcess(LaneSpec(0, 1), "w@h")
    lane.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lane.supervise()
        assert lane.restarts == 0  # alive: nothing to do
        lane.stop(timeout=10)
        lane.supervise()
        assert lane.restarts == 0 and lane.status()["alive"] is False  # stopped on purpose: stays down
    finally:
        if lane.proc.poll() is None:
            lane.proc.kill()
