"""cli.status: rows from registry records, the table, and the exit codes of the command."""

from __future__ import annotations

import argparse

import pytest

from airflow_asyncq_provider.cli.status import fleet_rows, render_table

NOW = 1_000_000.0


def _worker(**overrides):
    info = {"queues": ["default", "high_mem"], "slots": 8, "running": 3, "free": 5,
            "heartbeat_at": NOW - 1.26, "started_at": NOW - 3600.4, "version": "0.1.0",
            "consumer_tick_at": NOW - 1, "memory_budget": 8 * 1024**3, "memory_reserved": 768 * 1024**2,
            "memory_in_use": 300 * 1024**2,
            "tasks": {"t1": {"pid": 11, "pss": 200 * 1024**2, "limit": 1024**3}}}
    info.update(overrides)
    return info


def test_fleet_rows_sorted_and_derived():
    rows = fleet_rows({"b@h": _worker(), "a@h": _worker(queues=["x"], running=0, free=8)}, NOW)
    assert [r["worker"] for r in rows] == ["a@h", "b@h"]
    assert rows[1] == {"worker": "b@h", "health": "ok", "queues": "default,high_mem", "slots": 8,
                       "running": 3, "free": 5, "mem_budget_mib": 8192, "mem_reserved_mib": 768,
                       "mem_in_use_mib": 300, "heartbeat_age_s": 1.3, "up_s": 3600, "version": "0.1.0",
                       "native": "-", "maintenance": "-"}
    assert rows[0]["queues"] == "x"


def test_fleet_rows_tolerate_missing_fields():
    (row,) = fleet_rows({"w": {}}, NOW)
    assert row == {"worker": "w", "health": "starting", "queues": "", "slots": None, "running": None,
                   "free": None, "mem_budget_mib": None, "mem_reserved_mib": None, "mem_in_use_mib": None,
                   "heartbeat_age_s": None, "up_s": None, "version": None, "native": "-",
                   "maintenance": "-"}


def test_fleet_rows_accept_string_timestamps():
    # registry._decode turns "1000.5" into a float, but a record written by hand may keep strings.
    (row,) = fleet_rows({"w": _worker(heartbeat_at=str(NOW - 2), started_at=str(NOW - 10))}, NOW)
    assert (row["heartbeat_age_s"], row["up_s"]) == (2.0, 10)


def test_render_table_without_workers():
    assert render_table([]) == "no live workers"


def test_render_table_aligns_columns():
    rows = fleet_rows({"w1@host": _worker(), "worker-with-a-long-name@h": _worker(slots=16)}, NOW)
    lines = render_table(rows).splitlines()
    assert len(lines) == 4
    header, rule, first, second = lines
    assert header.split() == ["WORKER", "HEALTH", "QUEUES", "SLOTS", "RUNNING", "FREE", "MEM_BUDGET_MIB",
                              "MEM_RESERVED_MIB", "MEM_IN_USE_MIB", "HEARTBEAT_AGE_S", "UP_S", "VERSION", "NATIVE",
                              "MAINTENANCE"]
    assert set(rule.replace(" ", "")) == {"-"}
    # every column starts at the same offset on every line
    for column in ("QUEUES", "SLOTS", "VERSION"):
        offset = header.index(column)
        assert first[offset - 2:offset] == "  " and second[offset - 2:offset] == "  "
    assert first.startswith("w1@host ") and second.startswith("worker-with-a-long-name@h")
    assert "16" in second.split()


def test_a_consumer_that_stopped_ticking_is_reported_stuck():
    (row,) = fleet_rows({"w": _worker(consumer_tick_at=NOW - 45)}, NOW)
    assert row["health"] == "stuck consumer (45 s)"
    (row,) = fleet_rows({"w": _worker(draining=True)}, NOW)
    assert row["health"] == "draining"


def test_task_rows_list_running_tasks_with_their_memory():
    from airflow_asyncq_provider.cli.status import task_rows

    assert task_rows({"w": _worker()}) == [
        {"worker": "w", "task": "t1", "pid": 11, "pss_mib": 200, "limit_mib": 1024}]
    assert task_rows({"w": {}}) == []


def test_render_table_shows_none_as_blank():
    text = render_table(fleet_rows({"w": {}}, NOW))
    assert "None" not in text


def _status_with(monkeypatch, capsys, stub_conf, **config: str) -> tuple[int, str]:
    """Run the command with config from a stub (no Airflow import, no connection)."""
    import airflow_asyncq_provider.settings as settings_module
    from airflow_asyncq_provider.cli.status import status

    real = settings_module.load_settings
    monkeypatch.setattr(settings_module, "load_settings", lambda conf=None: real(stub_conf(**config)))
    with pytest.raises(SystemExit) as exit_info:
        status(argparse.Namespace(json=False))
    return exit_info.value.code, capsys.readouterr().err


def test_status_with_a_bad_setting_exits_2(monkeypatch, capsys, stub_conf):
    # the settings are refused before any connection is tried
    code, err = _status_with(monkeypatch, capsys, stub_conf, broker_url="redis://127.0.0.1:1/0",
                             worker_concurrency="zero")
    assert code == 2
    assert err.startswith("error: [asyncq] worker_concurrency must be an integer")


def test_status_with_an_invalid_broker_url_exits_2(monkeypatch, capsys, stub_conf):
    code, err = _status_with(monkeypatch, capsys, stub_conf, broker_url="amqp://guest:secretpw@rabbit//")
    assert "secretpw" not in err
    assert code == 2


def test_status_with_refused_credentials_exits_3_like_the_worker(monkeypatch, capsys, stub_conf):
    import redis

    import airflow_asyncq_provider.state.client as client_module

    class Refusing:
        def ping(self):
            raise redis.AuthenticationError("invalid username-password pair or user is disabled.")

    monkeypatch.setattr(client_module, "make_redis", lambda settings, timeout=None: Refusing())
    code, err = _status_with(monkeypatch, capsys, stub_conf, broker_url="redis://u:wr0ngpw@h:6379/0")
    assert "refused the credentials" in err and "wr0ngpw" not in err
    assert code == 3


@pytest.mark.parametrize(("lane", "shown"), [
    (None, "-"),
    ({"alive": True, "restarts": 0, "loop_concurrency": 50, "sync_threads": 2}, "ok 50+2"),
    ({"alive": False, "restarts": 2, "loop_concurrency": 50, "sync_threads": 0}, "down 50+0, 2 restart(s)"),
    ({"alive": False, "restarts": 5, "gave_up": True}, "down, gave up, 5 restart(s)"),
    ("garbage", "-"),
])
def test_native_lane_column(lane, shown):
    (row,) = fleet_rows({"w": _worker(native=lane)}, NOW)
    assert row["native"] == shown
