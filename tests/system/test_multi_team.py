"""Teams (``[core] multi_team``, Airflow's AIP-67): a team with an AsyncQExecutor, and a fleet, of its own.

``[core] executor = LocalExecutor;team_a=airflow_asyncq_provider.executors.AsyncQExecutor``: LocalExecutor
for everyone, the fleet for team_a's DAG bundle. The DAG is dags/asyncq_multi_executor.py, in a bundle
that belongs to team_a. A deployment of its own, like tests/system/test_multi_executor.py's (another
module, so the two deployments never run at the same time).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.stack import REPO, Stack
from tests.system.conftest import PG, REDIS_DB, _psql, _require
from tests.system.test_multi_executor import DAG_ID, FORMS, WORKER, Deployment, Form

pytestmark = [pytest.mark.system, pytest.mark.slow]

TEAM_QUEUE = "mt_default"


@pytest.fixture
def team_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """``[core] multi_team``: LocalExecutor for everyone, an AsyncQExecutor for team_a only.

    The team's executor reads its [asyncq] from ``AIRFLOW__TEAM_A___ASYNCQ__*``. The global [asyncq]
    of the scheduler names another key prefix on purpose: were the team's executor to read it, its
    workloads would carry records no worker looks at. The workers are team_a's: their own (global)
    [asyncq] is the team's.
    """
    _require(5432, "PostgreSQL")
    db = f"asyncq_mt_{os.getpid()}"
    _psql(f"DROP DATABASE IF EXISTS {db}")
    _psql(f"CREATE DATABASE {db}")
    home = tmp_path_factory.mktemp("mt_home")
    dags = home / "team_a_dags"
    dags.mkdir()
    shutil.copy(REPO / "dags" / "asyncq_multi_executor.py", dags)
    effects = home / "side_effects.log"
    prefix = f"mt-{uuid.uuid4().hex[:8]}"
    broker = f"redis://127.0.0.1:6379/{REDIS_DB}"
    bundles = [{"name": "team-a-dags", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                "kwargs": {"path": str(dags), "refresh_interval": 5}, "team_name": "team_a"}]
    s = Stack(home, sql_conn=PG.format(db=db), broker_url=broker, key_prefix=f"{prefix}-global",
              executor=f"LocalExecutor;team_a={FORMS['class-name'].config.split(',')[1]}", dags_folder=dags,
              extra_env={
                  "ASYNCQ_SIDE_EFFECTS": str(effects),
                  "ASYNCQ_MULTI_EXECUTORS": "LocalExecutor,AsyncQExecutor",
                  "AIRFLOW__CORE__MULTI_TEAM": "True",
                  "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
                  "AIRFLOW__OPERATORS__DEFAULT_QUEUE": TEAM_QUEUE,
                  "AIRFLOW__CORE__PARALLELISM": "8",
                  "AIRFLOW__TEAM_A___ASYNCQ__BROKER_URL": broker,
                  "AIRFLOW__TEAM_A___ASYNCQ__KEY_PREFIX": prefix,
              })
    client = redis.Redis(port=6379, db=REDIS_DB, decode_responses=True)
    s.migrate()
    s.run("teams", "create", "team_a")
    s.start_core()
    s.spawn(WORKER, "asyncq", "worker", "-q", TEAM_QUEUE, "-c", "4", "--hostname", f"{WORKER}@%h",
            "--skip-serve-logs", env={"ASYNCQ_WORKER_NAME": WORKER, "AIRFLOW__ASYNCQ__KEY_PREFIX": prefix})
    try:
        s.wait_api()
        yield Deployment(s, Form(s.env["AIRFLOW__CORE__EXECUTOR"], "AsyncQExecutor"), effects, client, prefix)
    finally:
        s.stop()
        if os.environ.get("ASYNCQ_KEEP_LOGS"):
            shutil.copytree(s.logs, Path(os.environ["ASYNCQ_KEEP_LOGS"]) / "mt", dirs_exist_ok=True)
        keys = [*client.scan_iter(match=f"{prefix}*", count=1000),
                *client.scan_iter(match=f"{TEAM_QUEUE}*", count=1000),
                *client.scan_iter(match=f"_kombu.binding.{TEAM_QUEUE}*", count=1000)]
        if keys:
            client.delete(*keys)
        _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_a_team_runs_its_tasks_on_its_own_fleet(team_stack: Deployment) -> None:
    """team_a's DAG: tasks without executor= go to the team's default executor, the AsyncQExecutor;
    executor="LocalExecutor" still reaches the global one. The team executor used the team's [asyncq]:
    the records are under the team's key prefix, none under the scheduler's global one."""
    stack = team_stack.stack
    stack.wait_dag(DAG_ID)
    run_id = stack.trigger(DAG_ID)
    assert stack.wait_run(DAG_ID, run_id, timeout=300) == "success"
    tis = {(ti["task_id"], ti["map_index"]): ti for ti in stack.task_instances(DAG_ID, run_id)}
    fleet = [("on_fleet", i) for i in range(3)] + [("gather", -1), ("on_default", -1)]
    local = [("on_local", i) for i in range(2)]
    assert Counter(ti["state"] for ti in tis.values()) == {"success": 7}
    worker_pid, scheduler_pid = stack.procs[WORKER].pid, stack.procs["scheduler"].pid
    for key in fleet:
        where = stack.xcom(DAG_ID, run_id, key[0], key[1])
        where = where.get("here", where)
        assert where["worker"] == WORKER and worker_pid in where["ancestors"], (key, where)
    for key in local:
        where = stack.xcom(DAG_ID, run_id, key[0], key[1])
        assert where["worker"] == "" and scheduler_pid in where["ancestors"], (key, where)
    client, prefix = team_stack.redis, team_stack.prefix
    records = [client.hgetall(k) for k in client.scan_iter(match=f"{prefix}:task:*", count=1000)]
    assert Counter(r.get("state") for r in records) == {"success": len(fleet)}
    assert list(client.scan_iter(match=f"{prefix}-global:task:*", count=1000)) == []
    scheduler_log = (stack.logs / "scheduler.log").read_text(errors="replace")
    assert "Loaded executor: team_a::airflow_asyncq_provider.executors.AsyncQExecutor" in scheduler_log
