"""settings.load_settings and the list and name parsers, fed by a stub config object; memory.sizes."""

from __future__ import annotations

import dataclasses

import pytest

from airflow_asyncq_provider.errors import AsyncQError, ConfigError
from airflow_asyncq_provider.get_provider_info import CONFIG_OPTIONS
from airflow_asyncq_provider.settings import (
    AsyncQSettings,
    SentinelURL,
    load_settings,
    parse_module_list,
    parse_queue_list,
    parse_sentinel_url,
    validate_broker_url,
    validate_queue_name,
)
from airflow_asyncq_provider.sizes import MIB, format_size, parse_size

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


def test_settings_fields_are_the_declared_options():
    fields = {field.name for field in dataclasses.fields(AsyncQSettings)}
    assert fields == set(CONFIG_OPTIONS) | {"default_queue"}  # default_queue is [operators]'s


SENTINEL_OPTIONS = ("sentinel_master", "sentinel_password", "sentinel_ssl")


def test_every_example_is_accepted(stub_conf):
    examples = {key: option["example"] for key, option in CONFIG_OPTIONS.items()}
    # the sentinel options are refused beside a rediss:// URL, so they get a Sentinel URL of their own
    load_settings(stub_conf(**{k: v for k, v in examples.items() if k not in SENTINEL_OPTIONS}))
    load_settings(stub_conf(**{**examples, "broker_url": "sentinel://:pw@s1:26379/0;sentinel://s2:26379"}))


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


def test_event_wait_zero_turns_the_wait_off(stub_conf):
    assert load_settings(stub_conf(event_wait="0")).event_wait == 0.0
    with pytest.raises(ConfigError, match=r"\[asyncq\] event_wait must be >= 0, got '-1'"):
        load_settings(stub_conf(event_wait="-1"))


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
    (0, "0 bytes"), (10 * 1024 - 1, "10239 bytes"), (10 * 1024, "10 KiB"), (512 * 1024, "512 KiB"),
    (1024**2, "1 MiB"), (300 * 1024**2, "300 MiB"), (10 * GIB - 1, "10240 MiB"), (10 * GIB, "10.0 GiB"),
])
def test_format_size_never_rounds_a_small_size_to_zero_mib(size, shown):
    assert format_size(size) == shown


def test_mib():
    assert MIB == 1024**2


@pytest.mark.parametrize(("value", "size"), [
    ("512MiB", 512 * MIB), ("512 MiB", 512 * MIB), ("512mib", 512 * MIB), ("512MIB", 512 * MIB),
    ("2G", 2 * 1000**3), ("2gb", 2 * 1000**3), ("1.5GiB", int(1.5 * GIB)), (1048576, MIB),
    ("100", 100), ("100B", 100), ("1k", 1000), ("1KB", 1000), ("1KiB", 1024), ("3M", 3 * 1000**2),
    ("3MB", 3 * 1000**2), ("1T", 1000**4), ("1TB", 1000**4), ("1TiB", 1024**4),
    # ByteSize lacks the short IEC units; we keep accepting them
    ("1Ki", 1024), ("2Mi", 2 * MIB), ("2mi", 2 * MIB), ("1Gi", GIB), ("1Ti", 1024**4),
    # ByteSize refuses floats; executor_config may hold one
    (1.5e9, 1_500_000_000), (2048.0, 2048),
])
def test_parse_size_accepts(value, size):
    assert parse_size(value, "x") == size


@pytest.mark.parametrize("value", [
    "lots", "-1G", "", "   ", "1.5e9",
    # ByteSize reads these; we refuse them, as before
    "1_000", ".5K", "1.", "1G of RAM", "1 G B",
    # ByteSize reads True as 1 byte
    True, False,
    float("nan"), float("inf"),
])
def test_parse_size_refuses_what_is_not_a_size(value):
    with pytest.raises(ConfigError, match=r"^\[asyncq\] x: .* is not a memory size; use a value like '512MiB'"):
        parse_size(value, "[asyncq] x")


@pytest.mark.parametrize(("value", "unit"), [
    ("12 parsecs", "parsecs"),
    # ByteSize knows these units; we refuse them, as before
    ("1P", "p"), ("1PiB", "pib"), ("1E", "e"), ("1EiB", "eib"), ("8bit", "bit"), ("1kbit", "kbit"),
])
def test_parse_size_refuses_unknown_units(value, unit):
    with pytest.raises(ConfigError) as err:
        parse_size(value, "task t: memory_request")
    assert str(err.value) == (f"task t: memory_request: unknown unit {unit!r} in {value!r}; "
                              "use B, KiB, MiB, GiB, TiB (or K, M, G, T)")


@pytest.mark.parametrize("value", ["0", "0MiB", "0.4", 0, -5, 0.5])
def test_parse_size_refuses_zero(value):
    # ByteSize allows 0 (and "0.4" rounds down to it)
    with pytest.raises(ConfigError, match=r"^x: .* must be greater than zero$"):
        parse_size(value, "x")


@pytest.mark.parametrize("value", [None, [1], {"a": 1}])
def test_parse_size_refuses_other_types(value):
    with pytest.raises(ConfigError, match=r"^x: expected a memory size string like '512MiB', got "):
        parse_size(value, "x")


# ------------------------------------------------------------------ queue and module lists
@pytest.mark.parametrize(("raw", "expected"), [
    ("a", ("a",)), ("a,b", ("a", "b")), (" a , b ", ("a", "b")), ("high_mem", ("high_mem",)),
])
def test_parse_queue_list_splits_and_strips(raw, expected):
    assert parse_queue_list(raw, "x") == expected


@pytest.mark.parametrize("raw", ["", " ", "bad queue", "a,,b", "a,", ",a", "a, b c", ","])
def test_parse_queue_list_refuses_empty_and_bad_names(raw):
    with pytest.raises(ConfigError) as err:
        parse_queue_list(raw, "airflow asyncq worker -q")
    assert str(err.value).startswith("airflow asyncq worker -q: queue name ")


def test_parse_queue_list_names_the_bad_queue():
    with pytest.raises(ConfigError, match="'bad queue'"):
        parse_queue_list("good,bad queue", "x")


@pytest.mark.parametrize("raw", ["a,a", "a, b ,a", " b,b "])
def test_parse_queue_list_refuses_duplicates(raw):
    with pytest.raises(ConfigError) as err:
        parse_queue_list(raw, "airflow asyncq worker --native-queues")
    message = str(err.value)
    assert message.startswith("airflow asyncq worker --native-queues: queue ")
    assert "named twice" in message and repr(raw) in message


@pytest.mark.parametrize(("raw", "expected"), [
    ("", ()), (" , ", ()), ("pandas", ("pandas",)), (" pandas, numpy ,, ", ("pandas", "numpy")),
    ("mycompany.tasks.http,_private.mod2", ("mycompany.tasks.http", "_private.mod2")),
])
def test_parse_module_list_accepts(raw, expected):
    assert parse_module_list(raw, "x") == expected


@pytest.mark.parametrize(("raw", "bad"), [("a-b.tasks", "a-b.tasks"), ("pandas,num py", "num py"),
                                          ("pandas.", "pandas."), ("ok,.rel", ".rel"), ("1st", "1st")])
def test_parse_module_list_refuses(raw, bad):
    with pytest.raises(ConfigError) as err:
        parse_module_list(raw, "--task-modules")
    assert str(err.value).startswith(f"--task-modules: {bad!r} is not a dotted module name; ")


@pytest.mark.parametrize("key", ["task_modules", "fork_preload_modules"])
@pytest.mark.parametrize("raw", ["a-b.tasks", "pandas, num py", "numpy."])
def test_module_options_are_validated(stub_conf, key, raw):
    with pytest.raises(ConfigError) as err:
        load_settings(stub_conf(**{key: raw}))
    message = str(err.value)
    assert message.startswith(f"[asyncq] {key} ")
    assert "is not a dotted module name" in message
    assert f"AIRFLOW__ASYNCQ__{key.upper()}" in message  # says how to fix it


# --- Redis Sentinel -------------------------------------------------------------------------------------

def test_a_sentinel_url_with_its_master_is_accepted(stub_conf):
    settings = load_settings(stub_conf(broker_url="sentinel://:pw@s1:26379/3;sentinel://s2:26380;sentinel://s3",
                                       sentinel_master=" mymaster ", sentinel_password="sp",
                                       sentinel_ssl="True"))
    assert settings.broker_url == "sentinel://:pw@s1:26379/3;sentinel://s2:26380;sentinel://s3"
    assert (settings.sentinel_master, settings.sentinel_password, settings.sentinel_ssl) == ("mymaster", "sp", True)
    parsed = parse_sentinel_url(settings.broker_url, "src")
    assert parsed == SentinelURL(sentinels=(("s1", 26379), ("s2", 26380), ("s3", 26379)),
                                 username=None, password="pw", db=3)


def test_the_sentinel_options_default_to_off(stub_conf):
    settings = load_settings(stub_conf())
    assert (settings.sentinel_master, settings.sentinel_password, settings.sentinel_ssl) == ("", "", False)


def test_a_sentinel_url_needs_its_master(stub_conf):
    with pytest.raises(ConfigError) as err:
        load_settings(stub_conf(broker_url="sentinel://:t0psecret@s1:26379;sentinel://s2:26379/0"))
    message = str(err.value)
    assert "[asyncq] sentinel_master is empty" in message
    assert "AIRFLOW__ASYNCQ__SENTINEL_MASTER" in message and "SENTINEL MASTERS" in message
    assert "t0psecret" not in message and "sentinel://:***@s1:26379;sentinel://s2:26379/0" in message


@pytest.mark.parametrize("option", [("sentinel_master", "mymaster"), ("sentinel_password", "x"),
                                    ("sentinel_ssl", "true")])
def test_sentinel_options_are_refused_beside_another_url(stub_conf, option):
    with pytest.raises(ConfigError, match=rf"\[asyncq\] {option[0]} is set but broker_url is 'redis://h/0'"):
        load_settings(stub_conf(broker_url="redis://h/0", **dict([option])))


@pytest.mark.parametrize("raw", ["maybe", "yes", "2"])
def test_sentinel_ssl_must_be_a_boolean(stub_conf, raw):
    with pytest.raises(ConfigError, match="sentinel_ssl must be True or False"):
        load_settings(stub_conf(broker_url="sentinel://s1", sentinel_master="m", sentinel_ssl=raw))


@pytest.mark.parametrize(("url", "fragment"), [
    ("sentinel://s1:26379;redis://s2:6379", "part 2, 'redis://s2:6379'"),
    ("sentinel://s1:26379;", "part 2, 'empty'"),
    ("sentinel://s1:port", "not a valid URL"),
    ("sentinel://:26379", "names no host"),
    ("sentinel://s1/zero", "the database 'zero' is not a number"),
    ("sentinel://s1?password=x", "takes no ?options"),
    ("sentinel://s1:26379;sentinel://s2:26379/3", "names database 3 but the first part 0"),
    ("sentinel://:a@s1;sentinel://:b@s2", "names other credentials than the first part"),
])
def test_bad_sentinel_urls_are_refused_with_the_part_named(url, fragment):
    with pytest.raises(ConfigError) as err:
        validate_broker_url(url, "src")
    assert fragment in str(err.value)
    assert str(err.value).startswith("src")


def test_later_parts_may_repeat_the_first_parts_credentials_and_database():
    url = "sentinel://u:pw@s1:26379/2;sentinel://u:pw@s2:26379/2;sentinel://s3:26379"
    assert validate_broker_url(url, "src") == url
    assert parse_sentinel_url(url, "src").username == "u"


def test_percent_encoded_sentinel_credentials_are_decoded():
    parsed = parse_sentinel_url("sentinel://us%40r:p%3Aw%2F@s1", "src")
    assert (parsed.username, parsed.password, parsed.db) == ("us@r", "p:w/", 0)


@pytest.mark.parametrize("url", ["redis+cluster://h:7000/0", "rediscluster://h:7000", "rediss+cluster://h:7000"])
def test_a_redis_cluster_scheme_is_refused_with_the_reason(url):
    with pytest.raises(ConfigError) as err:
        validate_broker_url(url, "[asyncq] broker_url")
    message = str(err.value)
    assert "Redis Cluster is not supported" in message and "celery/celery#9019" in message
    assert "Sentinel" in message


def test_several_plain_redis_urls_are_refused():
    with pytest.raises(ConfigError, match="only taken as Redis Sentinel nodes"):
        validate_broker_url("redis://h1:6379;redis://h2:6379/0", "src")
