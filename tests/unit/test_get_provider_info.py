"""get_provider_info: the contract Airflow's ProvidersManager reads."""

from __future__ import annotations

import importlib.util
import json
from importlib.metadata import distribution, entry_points
from pathlib import Path

import pytest

import airflow_asyncq_provider
from airflow_asyncq_provider.get_provider_info import AIRFLOW_OPTION_KEYS, CONFIG_OPTIONS, get_provider_info

SENSITIVE = {"broker_url", "ssl_keyfile", "sentinel_password"}


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
    assert list(section["options"]) == list(CONFIG_OPTIONS)
    for name, option in section["options"].items():
        # Airflow gets the option as its schema defines it; the parse keys stay in CONFIG_OPTIONS
        assert tuple(option) == AIRFLOW_OPTION_KEYS, name
        assert option == {key: CONFIG_OPTIONS[name][key] for key in AIRFLOW_OPTION_KEYS}


def test_provider_info_passes_airflows_schema_with_no_extra_option_keys(info):
    import jsonschema

    spec = importlib.util.find_spec("airflow")  # finds the package without importing Airflow
    assert spec is not None and spec.submodule_search_locations
    schema_file = Path(next(iter(spec.submodule_search_locations))) / "provider_info.schema.json"
    schema = json.loads(schema_file.read_text())
    option = schema["definitions"]["option"]
    # The schema spells it "additional_properties", which JSON Schema ignores; hold us to what it means.
    assert set(AIRFLOW_OPTION_KEYS) == set(option["properties"])
    option["additionalProperties"] = False
    jsonschema.validate(info, schema)


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
def test_every_option_says_how_it_is_parsed(name):
    option = CONFIG_OPTIONS[name]
    number = option["type"] in ("integer", "float")
    kinds = {"boolean"} if option["type"] == "boolean" else {"string", "size", "modules", "broker_url"}
    assert option["kind"] in ({option["type"]} if number else kinds)
    assert (option["minimum"] is not None) is number, "every number has a minimum, and only numbers do"
    assert isinstance(option["inclusive"], bool) and (number or not option["inclusive"])
    assert isinstance(option["optional"], bool)
    if option["optional"]:
        assert option["default"] == "", "an optional option defaults to empty, meaning None"


def _boolean(value: str) -> bool:
    """What Airflow's ``conf.getboolean`` accepts."""
    lowered = value.strip().lower()
    if lowered not in ("t", "true", "1", "f", "false", "0"):
        raise ValueError(f"not a boolean: {value!r}")
    return lowered in ("t", "true", "1")


@pytest.mark.parametrize("name", sorted(CONFIG_OPTIONS))
def test_defaults_and_examples_parse_as_their_type(name):
    option = CONFIG_OPTIONS[name]
    caster, kind = {"integer": (int, int), "float": (float, float), "boolean": (_boolean, bool),
                    "string": (str, str)}[option["type"]]
    for field in ("default", "example"):
        try:
            value = caster(option[field])
        except ValueError as exc:
            pytest.fail(f"[asyncq] {name}: {field} {option[field]!r} is not a valid {option['type']} ({exc})")
        assert type(value) is kind, (name, field, value)


def test_broker_url_is_sensitive(info):
    assert info["config"]["asyncq"]["options"]["broker_url"]["sensitive"] is True
