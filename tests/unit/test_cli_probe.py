"""cli.probe: the verdict on one registry record, which workers a host checks, and the exit codes."""

from __future__ import annotations

import argparse
import socket
from typing import Any

import pytest

from airflow_asyncq_provider import exitcodes
from airflow_asyncq_provider.cli import probe as probe_module
from airflow_asyncq_provider.cli.probe import nodes_of_this_host, verdict
from airflow_asyncq_provider.settings import AsyncQSettings

NOW = 1_000_000.0


def _record(**overrides: Any) -> dict[str, Any]:
    return {"heartbeat_at": NOW - 1, "consumer_tick_at": NOW - 2, "draining": False, "maintenance": None,
            **overrides}


def _verdict(info: dict[str, Any] | None) -> str | None:
    return verdict("w1@h", info, NOW, interval=5, lost_timeout=30, publish_timeout=5)


def test_a_worker_that_heartbeats_and_ticks_is_healthy() -> None:
    assert _verdict(_record()) is None


def test_draining_is_healthy_on_purpose() -> None:
    assert _verdict(_record(consumer_tick_at=NOW - 300, draining=True)) is None


def test_maintenance_is_healthy_while_the_consumer_ticks() -> None:
    assert _verdict(_record(maintenance={"comment": "disk swap"})) is None
    assert "has not ticked for 300 s" in str(_verdict(_record(consumer_tick_at=NOW - 300,
                                                              maintenance={"comment": "disk swap"})))


@pytest.mark.parametrize(("info", "reason"), [
    (None, "worker w1@h has no heartbeat in Redis: it is not running, or it has not reached Redis for more "
           "than [asyncq] worker_lost_timeout (30 s)"),
    (_record(heartbeat_at=NOW - 16), "worker w1@h's last heartbeat is 16 s old (one is due every 5 s, "
                                     "[asyncq] worker_heartbeat_interval)"),
    (_record(consumer_tick_at=NOW - 45), "worker w1@h heartbeats but its consumer has not ticked for 45 s: "
                                         "it takes no new work"),
    (_record(consumer_tick_at=0), "worker w1@h heartbeats but its consumer has not started yet"),
])
def test_unhealthy_workers_get_one_line_that_says_why(info: dict[str, Any] | None, reason: str) -> None:
    assert _verdict(info) == reason
    assert "\n" not in reason


def test_a_late_heartbeat_within_two_intervals_and_a_socket_timeout_is_still_healthy() -> None:
    assert _verdict(_record(heartbeat_at=NOW - 14.9)) is None


def test_nodes_of_this_host_match_the_part_after_the_at() -> None:
    workers = {"asyncq@h1": {}, "w2@h1": {}, "asyncq@h10": {}, "h1": {}}
    assert nodes_of_this_host(workers, "h1") == ["asyncq@h1", "w2@h1"]


# ------------------------------------------------------------------------------------ the command
@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    import airflow_asyncq_provider.cli.connect as connect_module
    from airflow_asyncq_provider.state import registry

    workers: dict[str, dict[str, Any]] = {}
    settings = AsyncQSettings(broker_url="redis://fake/0")
    monkeypatch.setattr(connect_module, "connect", lambda who: (settings, object(), object()))
    monkeypatch.setattr(registry, "live_workers", lambda client, keys: workers)
    monkeypatch.setattr(probe_module.time, "time", lambda: NOW)
    monkeypatch.setattr(socket, "gethostname", lambda: "pod-7")
    return workers


def _run(hostname: str | None = None) -> int:
    try:
        probe_module.probe(argparse.Namespace(hostname=hostname))
    except SystemExit as exc:
        return int(exc.code or 0)
    return exitcodes.OK


def test_probe_exits_0_and_says_so(fleet: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    fleet["asyncq@pod-7"] = _record()
    assert _run() == exitcodes.OK
    assert capsys.readouterr().out == "ok: asyncq@pod-7 ok, heartbeat 1 s ago, consumer ticked 2 s ago\n"


def test_probe_checks_only_this_hosts_workers(fleet: dict[str, Any]) -> None:
    fleet["asyncq@pod-7"] = _record()
    fleet["asyncq@pod-8"] = _record(consumer_tick_at=NOW - 100)
    assert _run() == exitcodes.OK


def test_probe_exits_1_with_the_reason_on_stderr(fleet: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    fleet["asyncq@pod-7"] = _record(consumer_tick_at=NOW - 40)
    assert _run() == exitcodes.UNHEALTHY
    err = capsys.readouterr().err
    assert err == "error: worker asyncq@pod-7 heartbeats but its consumer has not ticked for 40 s: it takes no new work\n"


def test_probe_without_a_worker_on_this_host(fleet: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    fleet["asyncq@pod-8"] = _record()
    assert _run() == exitcodes.UNHEALTHY
    assert "no worker of host pod-7 has a heartbeat in Redis (live workers: asyncq@pod-8)" in capsys.readouterr().err


def test_probe_hostname_expands_percent_h(fleet: dict[str, Any]) -> None:
    fleet["w1@pod-7"] = _record()
    assert _run("w1@%h") == exitcodes.OK
    assert _run("w2@%h") == exitcodes.UNHEALTHY


def test_probe_is_registered_and_loads_lazily() -> None:
    from airflow_asyncq_provider.cli.definition import ASYNCQ_COMMANDS

    (command,) = [c for c in ASYNCQ_COMMANDS if c.name == "probe"]
    assert [a.flags for a in command.args] == [("-H", "--hostname")]
