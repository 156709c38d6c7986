"""What Airflow 3.3's executor loader makes of AsyncQExecutor next to another executor.

``[core] executor`` takes a comma-separated list; the first entry is the default. An entry is a core
executor name, a module path, or ``alias:module path``. A task's ``executor=`` is looked up by alias,
then by module path, then by class name (airflow/executors/executor_loader.py,
``lookup_executor_name_by_str``). The system test (tests/system/test_multi_executor.py) runs both
spellings for real; this one pins the lookups, which the dag-processor and the worker both apply when
they parse a DAG file.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

MODULE = "airflow_asyncq_provider.executors.AsyncQExecutor"


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """ExecutorLoader with its module-level caches emptied before and after the test."""
    from airflow.executors import executor_loader as module

    caches = [module._alias_to_executors_per_team, module._module_to_executors_per_team,
              module._classname_to_executors_per_team, module._team_name_to_executors]

    def clear() -> None:
        for cache in caches:
            cache.clear()
        module._executor_names.clear()

    clear()
    yield module.ExecutorLoader
    clear()
    monkeypatch.undo()


@pytest.mark.parametrize(("config", "names"), [
    (f"LocalExecutor,{MODULE}", ["AsyncQExecutor", MODULE]),
    (f"LocalExecutor,AsyncQ:{MODULE}", ["AsyncQ", "AsyncQExecutor", MODULE]),
])
def test_every_spelling_a_task_may_use_finds_the_fleet(loader, monkeypatch, config, names):
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", config)
    default = loader.get_default_executor_name()
    assert default.module_path == "airflow.executors.local_executor.LocalExecutor"
    for name in names:
        found = loader.lookup_executor_name_by_str(name)
        assert found.module_path == MODULE, name
    assert loader.import_executor_cls(loader.lookup_executor_name_by_str(names[0]))[0].__name__ == \
        "AsyncQExecutor"


def test_an_executor_the_config_does_not_list_is_unknown(loader, monkeypatch):
    """What a worker whose [core] executor lacks the fleet says when it parses such a DAG
    (apache/airflow#71175): the workers need the scheduler's [core] executor."""
    from airflow.exceptions import UnknownExecutorException

    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    with pytest.raises(UnknownExecutorException, match="AsyncQ"):
        loader.lookup_executor_name_by_str("AsyncQ")


def test_an_alias_without_a_module_path_is_refused(loader, monkeypatch):
    from airflow.exceptions import AirflowConfigException

    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor,AsyncQ:AsyncQExecutor")
    with pytest.raises(AirflowConfigException, match="core executor name or module path"):
        loader.get_executor_names()


@pytest.mark.parametrize(("config", "listed"), [
    (MODULE, True),
    (f"LocalExecutor,{MODULE}", True),
    (f"LocalExecutor, AsyncQ:{MODULE}", True),
    ("LocalExecutor,AsyncQ:airflow_asyncq_provider.executors.asyncq_executor.AsyncQExecutor", True),
    (f"LocalExecutor;team_a={MODULE}", True),
    ("LocalExecutor", False),
    ("", False),
    ("CeleryExecutor,KubernetesExecutor", False),
])
def test_the_worker_knows_whether_its_config_lists_the_fleet(config, listed):
    from airflow_asyncq_provider.worker.command import executor_warning, names_the_fleet

    assert names_the_fleet(config) is listed
    warning = executor_warning(config)
    assert (warning is None) is listed
    if warning:
        assert "apache/airflow#71175" in warning and "AIRFLOW__CORE__EXECUTOR" in warning
        assert repr(config) in warning


# ------------------------------------------------------------------ multi-team ([core] multi_team)
def test_a_team_can_have_an_asyncq_executor_of_its_own(loader, monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__MULTI_TEAM", "True")
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", f"LocalExecutor;team_a={MODULE}")
    names = loader.get_executor_names(validate_teams=False)
    (team,) = [n for n in names if n.team_name == "team_a"]
    executor = loader.load_executor(team)  # refused for executors without supports_multi_team
    assert type(executor).__name__ == "AsyncQExecutor" and executor.team_name == "team_a"


def test_a_teams_executor_reads_the_teams_asyncq_and_never_the_global_one(monkeypatch):
    """Airflow's team lookup: AIRFLOW__<TEAM>___ASYNCQ__*, the [<team>=asyncq] section, then the
    option's default. The global [asyncq] is not a fallback: a team sets every option it needs."""
    from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor
    from airflow_asyncq_provider.settings import load_settings

    monkeypatch.setenv("AIRFLOW__ASYNCQ__BROKER_URL", "redis://global-redis:6379/0")
    monkeypatch.setenv("AIRFLOW__ASYNCQ__KEY_PREFIX", "global")
    monkeypatch.setenv("AIRFLOW__ASYNCQ__WORKER_LOST_TIMEOUT", "99")
    monkeypatch.setenv("AIRFLOW__TEAM_A___ASYNCQ__BROKER_URL", "redis://team-a-redis:6379/5")
    monkeypatch.setenv("AIRFLOW__TEAM_A___ASYNCQ__KEY_PREFIX", "team-a")
    team = load_settings(AsyncQExecutor(team_name="team_a").conf)
    assert (team.broker_url, team.key_prefix) == ("redis://team-a-redis:6379/5", "team-a")
    assert team.worker_lost_timeout == 30.0  # the default, not the global 99
    shared = load_settings(AsyncQExecutor().conf)
    assert (shared.broker_url, shared.key_prefix, shared.worker_lost_timeout) == \
        ("redis://global-redis:6379/0", "global", 99.0)


@pytest.mark.parametrize(("kombu", "warns"), [("5.6.2", True), ("5.7.0", False), ("5.10.1", False),
                                              ("6.0.0", False), ("5.7.0rc1", False), ("odd", False)])
def test_the_worker_warns_about_a_kombu_that_cannot_heal_a_partition(kombu: str, warns: bool) -> None:
    from airflow_asyncq_provider.worker.command import kombu_warning

    warning = kombu_warning(kombu)
    assert (warning is not None) is warns
    if warns:
        assert kombu in warning and "kombu>=5.7" in warning
