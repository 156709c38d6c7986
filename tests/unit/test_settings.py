"""settings.load_settings and validate_queue_name, fed by a stub config object."""

from __future__ import annotations

import pytest

from airflow_asyncq_provider.errors import AsyncQError, ConfigError
from airflow_asyncq_provider.get_provider_info import CONFIG_OPTIONS
from airflow_asyncq_provider.settings import AsyncQSettings, load_settings, validate_queue_name

INT_OPTIONS = sorted(k for k, o in CONFIG_OPTIONS.items() if o["type"] == "integer")
FLOAT_OPTIONS = sorted(k for k, o in CONFIG_OPTIONS.items() if o["type"] == "float")
GIB = 1024**3


def test_defaults_come_from_the_declared_options(stub_conf):
    conf = stub_conf()
    settings = load_settings(conf)
    assert settings == AsyncQSettings(broker_url=CONFIG_OPTIONS["broker_url"]["default"])
    # Every declared option was read from the [asyncq] section; the default queue is Airflow's own.
    assert {key for section, key in conf.asked if section == "asyncq"} == set(CONFIG_OPTIONS)
    assert {(s, k) for s, k in conf.asked if s != "asyncq"} == {("operators", "default_queue")}


def test_default_queue_is_airflows(stub_conf):
    conf = stub_conf(sections={"operators": {"default_queue": " celery_q "}}, default_queue="ignored")
    assert load_settings(conf).default_queue == "celery_q"


def test_good_values_are_typed(stub_conf):
    settings = load_settings(stub_conf(
        sections={"operators": {"default_queue": " high_mem "}},
        broker_url=" rediss://u:p@redis.internal:6380/2 ",
        worker_concurrency=" 16 ", publish_timeout="2.5", publish_max_retries="0",
        event_batch_size="10", event_stream_maxlen="1000", state_ttl="60",
        worker_heartbeat_interval="1", worker_lost_timeout="2", unconsumed_queue_warning="0.5",
        visibility_timeout="7", key_prefix=" asyncq-prod ", ssl_ca_certs=" /ca.pem ",
        ssl_certfile="/c.pem", ssl_keyfile="/k.pem", ssl_cert_reqs="OPTIONAL",
        fork_preload_modules=" pandas, numpy ,, ",
    ))
    assert settings.broker_url == "rediss://u:p@redis.internal:6380/2"
    assert settings.default_queue == "high_mem"
    assert settings.worker_concurrency == 16 and isinstance(settings.worker_concurrency, int)
    assert settings.publish_timeout == 2.5 and isinstance(settings.publish_timeout, float)
    assert settings.publish_max_retries == 0  # zero retries is allowed
    assert settings.event_batch_size == 10
    assert settings.event_stream_maxlen == 1000  # the bound itself is allowed
    assert settings.state_ttl == 60
    assert settings.worker_heartbeat_interval == 1.0
    assert settings.worker_lost_timeout == 2.0  # exactly twice the heartbeat is allowed
    assert settings.unconsumed_queue_warning == 0.5
    assert settings.visibility_timeout == 7
    assert settings.key_prefix == "asyncq-prod"
    assert settings.ssl_ca_certs == "/ca.pem"
    assert settings.ssl_cert_reqs == "optional"
    assert settings.fork_preload_modules == ("pandas", "numpy")


def test_none_from_config_means_the_default(stub_conf):
    settings = load_settings(stub_conf(worker_concurrency=None, broker_url=None))
    assert settings.worker_concurrency == 8
    assert settings.broker_url == CONFIG_OPTIONS["broker_url"]["default"]


def test_settings_are_frozen(stub_conf):
    settings = load_settings(stub_conf())
    with pytest.raises(AttributeError):
        settings.worker_concurrency = 3  # type: ignore[misc]


@pytest.mark.parametrize("key", INT_OPTIONS)
@pytest.mark.parametrize("value", ["abc", "1.5", "", "8 slots"])
def test_non_integer_names_the_option(stub_conf, key, value):
    with pytest.raises(ConfigError) as err:
        load_settings(stub_conf(**{key: value}))
    message = str(err.value)
    assert f"[asyncq] {key} must be an integer" in message
    assert repr(value) in message
    assert f"AIRFLOW__ASYNCQ__{key.upper()}" in message  # says how to fix it


@pytest.mark.parametrize("key", FLOAT_OPTIONS)
def test_non_number_names_the_option(stub_conf, key):
    with pytest.raises(ConfigError, match=rf"\[asyncq\] {key} must be a number, got 'soon'"):
        load_settings(stub_conf(**{key: "soon"}))


@pytest.mark.parametrize("key", ["worker_concurrency", "event_batch_size", "visibility_timeout",
                                 "publish_timeout", "worker_heartbeat_interval", "worker_lost_timeout",
                                 "unconsumed_queue_warning"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_zero_or_negative_is_refused(stub_conf, key, value):
    with pytest.raises(ConfigError) as err:
        load_settings(stub_conf(**{key: value}))
    assert f"[asyncq] {key} must be > 0" in str(err.value)
    assert repr(value) in str(err.value)


@pytest.mark.parametrize(("key", "value", "bound"), [
    ("publish_max_retries", "-1", ">= 0"),
    ("event_stream_maxlen", "999", ">= 1000"),
    ("state_ttl", "59", ">= 60"),
])
def test_options_with_an_inclusive_minimum(stub_conf, key, value, bound):
    with pytest.raises(ConfigError, match=rf"\[asyncq\] {key} must be {bound}, got '{value}'"):
        load_settings(stub_conf(**{key: value}))


@pytest.mark.parametrize("key", FLOAT_OPTIONS)
def test_nan_is_refused(stub_conf, key):
    with pytest.raises(ConfigError, match=key):
        load_settings(stub_conf(**{key: "nan"}))


@pytest.mark.parametrize("url", ["amqp://guest:guest@rabbit:5672//", "http://127.0.0.1:6379/0",
                                 "sqs://", "127.0.0.1:6379", "redis+socket:///var/run/redis.sock",
                                 "unix:///var/run/redis.sock"])
def test_unknown_url_scheme_names_broker_url(stub_conf, url):
    with pytest.raises(ConfigError) as err:
        load_settings(stub_conf(broker_url=url))
    message = str(err.value)
    assert "[asyncq] broker_url" in message
    assert "is not supported" in message
    assert "redis://" in message  # names what would work
    assert "guest:guest" not in message  # even the error masks the password


@pytest.mark.parametrize("url", ["", "   "])
def test_empty_url_names_broker_url(stub_conf, url):
    with pytest.raises(ConfigError, match=r"\[asyncq\] broker_url is empty"):
        load_settings(stub_conf(broker_url=url))


@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "redis://127.0.0.1:99999/0",
                                 "redis://:secretpw@127.0.0.1:63x79/0"])
def test_bad_port_names_broker_url(stub_conf, url):
    with pytest.raises(ConfigError) as err:
        load_settings(stub_conf(broker_url=url))
    assert "[asyncq] broker_url" in str(err.value)
    assert "secretpw" not in str(err.value)


def test_url_without_host_names_broker_url(stub_conf):
    with pytest.raises(ConfigError, match=r"\[asyncq\] broker_url .* names no host"):
        load_settings(stub_conf(broker_url="redis:///0"))


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://h:6380/0", "REDIS://h/0"])
def test_supported_urls_pass(stub_conf, url):
    assert load_settings(stub_conf(broker_url=url)).broker_url == url


@pytest.mark.parametrize("value", ["yes", "CERT_REQUIRED", ""])
def test_ssl_cert_reqs_invalid(stub_conf, value):
    with pytest.raises(ConfigError, match=r"\[asyncq\] ssl_cert_reqs must be required, optional or none"):
        load_settings(stub_conf(ssl_cert_reqs=value))


def test_worker_lost_timeout_below_twice_the_heartbeat(stub_conf):
    with pytest.raises(ConfigError) as err:
        load_settings(stub_conf(worker_heartbeat_interval="5", worker_lost_timeout="9.9"))
    message = str(err.value)
    assert "[asyncq] worker_lost_timeout (9.9)" in message
    assert "worker_heartbeat_interval (5.0)" in message


@pytest.mark.parametrize("value", ["", "  ", "my prefix"])
def test_key_prefix_must_be_a_word(stub_conf, value):
    with pytest.raises(ConfigError, match=r"\[asyncq\] key_prefix must be a non-empty word"):
        load_settings(stub_conf(key_prefix=value))


@pytest.mark.parametrize("value", ["", "a b", "a,b"])
def test_default_queue_is_validated(stub_conf, value):
    with pytest.raises(ConfigError, match=r"\[operators\] default_queue: queue name"):
        load_settings(stub_conf(sections={"operators": {"default_queue": value}}))


def test_config_error_is_an_asyncq_error():
    assert issubclass(ConfigError, AsyncQError)


@pytest.mark.parametrize("name", ["", "   ", "bad queue", "tab\tqueue", "a,b", ","])
def test_validate_queue_name_refuses(name):
    with pytest.raises(ConfigError) as err:
        validate_queue_name(name, "somewhere -q")
    assert str(err.value).startswith("somewhere -q: queue name ")
    assert repr(name) in str(err.value)


@pytest.mark.parametrize(("name", "expected"), [("default", "default"), (" high_mem ", "high_mem"),
                                                ("q.1-x:y", "q.1-x:y")])
def test_validate_queue_name_accepts(name, expected):
    assert validate_queue_name(name, "x") == expected


def test_the_typed_options_are_the_expected_ones():
    assert {"worker_concurrency", "publish_max_retries", "event_batch_size", "event_stream_maxlen",
            "state_ttl", "visibility_timeout"} <= set(INT_OPTIONS)
    assert {"publish_timeout", "worker_heartbeat_interval", "worker_lost_timeout",
            "unconsumed_queue_warning"} <= set(FLOAT_OPTIONS)


@pytest.mark.parametrize(("raw", "size"), [("512MiB", 512 * 1024**2), ("2G", 2 * 1000**3),
                                           (" 1.5GiB ", int(1.5 * GIB)), ("1048576", 1024**2)])
def test_memory_sizes(stub_conf, raw, size):
    settings = load_settings(stub_conf(default_memory_request=raw, worker_memory_budget=raw))
    assert settings.default_memory_request == size and settings.worker_memory_budget == size


def test_empty_optional_sizes_mean_none(stub_conf):
    settings = load_settings(stub_conf(default_memory_limit="", worker_memory_budget=" "))
    assert settings.default_memory_limit is None and settings.worker_memory_budget is None


@pytest.mark.parametrize("key", ["default_memory_request", "default_memory_limit", "worker_memory_budget"])
@pytest.mark.parametrize("raw", ["lots", "12 parsecs", "-1G", "0"])
def test_bad_memory_size_names_the_option(stub_conf, key, raw):
    with pytest.raises(ConfigError, match=rf"\[asyncq\] {key}"):
        load_settings(stub_conf(**{key: raw}))


def test_memory_limit_below_request(stub_conf):
    with pytest.raises(ConfigError, match=r"\[asyncq\] default_memory_limit is below default_memory_request"):
        load_settings(stub_conf(default_memory_request="2GiB", default_memory_limit="1GiB"))


def test_memory_fraction_above_one(stub_conf):
    with pytest.raises(ConfigError, match=r"\[asyncq\] worker_memory_fraction must be at most 1"):
        load_settings(stub_conf(worker_memory_fraction="1.5"))


@pytest.mark.parametrize(("size", "shown"), [
    (0, "0 KiB"), (512 * 1024, "512 KiB"), (1024**2, "1 MiB"), (300 * 1024**2, "300 MiB"),
    (10 * 1024**3, "10.0 GiB"),
])
def test_format_size_never_rounds_a_small_size_to_zero_mib(size, shown):
    from airflow_asyncq_provider.memory.sizes import format_size

    assert format_size(size) == shown
