"""Workers as separate hosts: each runs tasks under its own hostname and serves their logs from its
own address, and the api-server reads them only from there."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.system.hosts.conftest import Fleet

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_each_host_runs_tasks_under_its_name_and_serves_their_logs(healed: Fleet) -> None:
    stack = healed.stack
    dag_id = "asyncq_hosts_many"
    stack.wait_dag(dag_id)
    ran_on: Counter[str] = Counter()
    for name in healed.hosts:  # one run per host, so every host serves a log
        healed.only(name)
        run_id = stack.trigger(dag_id, conf={"n": 2})
        assert stack.wait_run(dag_id, run_id, timeout=240) == "success"
        healed.everyone()
        host = healed.hosts[name]
        tis = [ti for ti in stack.task_instances(dag_id, run_id) if ti["task_id"] == "where"]
        assert {ti["hostname"] for ti in tis} == {host.hostname}
        assert {r[6] for r in healed.runs(dag_id, run_id, "run")} == {host.hostname}
        for ti in tis:
            log = stack.task_log(dag_id, run_id, "where", 1, map_index=ti["map_index"])
            assert f"ran on {host.hostname}" in log
            # not from the api-server's own folder: the log server of that host, at its address
            assert f"http://{host.hostname}:" in log, log[:2000]
            ran_on[host.hostname] += 1
    assert len(ran_on) == len(healed.hosts)


def test_the_probe_checks_this_hosts_worker(healed: Fleet) -> None:
    for name in healed.hosts:
        result = healed.probe(name)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"ok: {healed.node(name)} ok, heartbeat "), result.stdout
    other = healed.probe("h1", "--hostname", "nobody@%h")
    assert other.returncode == 1
    assert other.stderr.startswith(f"error: worker nobody@{healed.hosts['h1'].hostname} has no heartbeat in Redis")
    assert len(other.stderr.strip().splitlines()) == 1
    outside = healed.probe(None)  # the root namespace's hostname runs no worker
    assert outside.returncode == 1 and "no worker of host" in outside.stderr
