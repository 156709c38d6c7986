"""get_provider_info: the contract Airflow's ProvidersManager reads."""

from __future__ import annotations

from importlib.metadata import distribution, entry_points
from pathlib import Path

import pytest

import airflow_asyncq_provider
from airflow_asyncq_provider.get_provider_info import CONFIG_OPTIONS, get_provider_info

SENSITIVE = {"broker_url", "ssl_keyfile"}


@pytest.fixture(scope="module")
def info():
    return get_provider_info()


def test_top_level_keys(info):
    assert info["package-name"] == "airflow-asyncq-provider"
    assert info["package-name"] == distribution("airflow-asyncq-provider").metadata["Name"]
    assert info["name"] == "AsyncQ"
    assert info["description"]
    assert info["versions"] == [airflow_asyncq_provider.__version__]


def test_entry_point_is_registered():
    (ep,) = [ep for ep in entry_points(group="apache_airflow_provider")
             if ep.value.startswith("airflow_asyncq_provider")]
    assert ep.name == "provider_info"
    assert ep.load() is get_provider_info


def test_executors_and_cli_are_importable_paths(info):
    assert info["executors"] == ["airflow_asyncq_provider.executors.asyncq_executor.AsyncQExecutor"]
    assert info["cli"] == ["airflow_asyncq_provider.cli.definition.get_asyncq_cli_commands"]
    root = Path(airflow_asyncq_provider.__file__).parent
    for dotted in (*info["executors"], *info["cli"]):
        module, _, name = dotted.rpartition(".")
        # resolved from the source, not imported: importing the executor costs an Airflow import
        source = root.parent.joinpath(*module.split(".")).with_suffix(".py").read_text()
        assert f"def {name}(" in source or f"class {name}(" in source, dotted

def test_config_section(info):
    section = info["config"]["asyncq"]
    assert section["description"]
    assert section["options"] is CONFIG_OPTIONS


@pytest.mark.parametrize("name", sorted(CONFIG_OPTIONS))
def test_every_option_is_documented(name):
    option = CONFIG_OPTIONS[name]
    assert isinstance(option["description"], str) and len(option["description"]) > 20
    assert option["type"] in ("string", "integer", "float", "boolean")
    assert isinstance(option["default"], str), "Airflow config defaults are strings"
    assert isinstance(option["example"], str) and option["example"]
    assert option["version_added"] == "0.1.0"
    assert option["sensitive"] is (name in SENSITIVE)


@pytest.mark.parametrize("name", sorted(CONFIG_OPTIONS))
def test_defaults_and_examples_parse_as_their_type(name):
    option = CONFIG_OPTIONS[name]
    caster = {"integer": int, "float": float, "string": str}[option["type"]]
    caster(option["default"])
    caster(option["example"])


def test_broker_url_is_sensitive(info):
    assert info["config"]["asyncq"]["options"]["broker_url"]["sensitive"] is True
