"""broker.config: priority mapping and the Celery configuration the fleet and native apps share."""

from __future__ import annotations

import ssl

import pytest

from airflow_asyncq_provider.broker.config import PRIORITY_STEPS, make_celery_app, priority_step
from airflow_asyncq_provider.broker.messages import EXECUTE_WORKLOAD
from airflow_asyncq_provider.settings import AsyncQSettings


@pytest.mark.parametrize(("weight", "step"), [
    (10**9, 0), (1000, 0), (999, 1), (500, 1), (499, 2), (100, 2), (99, 3), (50, 3), (20, 4),
    (10, 5), (5, 6), (3, 7), (2, 8), (1, 9), (0, 9), (-5, 9), (-(10**9), 9),
])
def test_priority_step_table(weight, step):
    assert priority_step(weight) == step


def test_priority_step_is_monotonic_and_bounded():
    steps = [priority_step(w) for w in range(-50, 3000)]
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False)), "a higher weight must never be served later"
    assert set(steps) == set(PRIORITY_STEPS)  # every step is reachable, none outside
    assert min(PRIORITY_STEPS) == 0 and max(PRIORITY_STEPS) == 9


def test_airflow_default_weight_is_the_least_urgent_step():
    # priority_weight defaults to 1 in Airflow, so untuned tasks share the last list.
    assert priority_step(1) == PRIORITY_STEPS[-1]


@pytest.fixture
def app():
    return make_celery_app(AsyncQSettings(broker_url="redis://h:6379/5", default_queue="dq",
                                          visibility_timeout=77, publish_timeout=3.0))


def test_json_only(app):
    conf = app.conf
    assert list(conf.accept_content) == ["json"]
    assert list(conf.result_accept_content) == ["json"]
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert conf.event_serializer == "json"


def test_acks_and_prefetch(app):
    conf = app.conf
    assert conf.task_acks_late is False
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_disable_prefetch is True
    assert conf.task_ignore_result is True
    assert conf.result_backend is None


def test_transport_options(app):
    transport = app.conf.broker_transport_options
    assert transport["priority_steps"] == list(range(10))
    assert transport["visibility_timeout"] == 77
    assert transport["socket_timeout"] == 3.0
    assert transport["socket_connect_timeout"] == 3.0
    assert transport["global_keyprefix"] == ""
    assert app.conf.broker_connection_timeout == 3.0


def test_queues_broker_and_events(app):
    assert app.conf.task_default_queue == "dq"
    assert app.conf.task_create_missing_queues is True
    assert app.conf.broker_url == "redis://h:6379/5"
    assert app.conf.worker_send_task_events is True
    assert app.conf.broker_use_ssl is None
    assert app.main == "asyncq"


def test_app_is_not_made_current(app):
    from celery import current_app

    assert current_app._get_current_object() is not app


def test_tls_for_rediss():
    app = make_celery_app(AsyncQSettings(broker_url="rediss://h:6380/0", ssl_cert_reqs="none"))
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_NONE}


def test_task_name_is_stable():
    # Published messages carry this name; renaming it strands every message already queued.
    assert EXECUTE_WORKLOAD == "asyncq.execute_workload"


# --- Redis Sentinel ------------------------------------------------------------------------------------

SENTINEL_URL = "sentinel://:m4sterpw@s1:26379/2;sentinel://s2:26380"


def _sentinel_settings(**overrides):
    return AsyncQSettings(**{"broker_url": SENTINEL_URL, "sentinel_master": "mymaster", "publish_timeout": 3.0,
                             **overrides})


def test_sentinel_transport_options_name_the_master_and_the_sentinels_credentials():
    app = make_celery_app(_sentinel_settings(sentinel_password="sp"))
    transport = app.conf.broker_transport_options
    assert transport["master_name"] == "mymaster"
    assert transport["sentinel_kwargs"] == {"socket_timeout": 3.0, "socket_connect_timeout": 3.0, "password": "sp"}
    assert transport["priority_steps"] == list(range(10))  # the Redis options stay
    assert app.conf.broker_url == SENTINEL_URL
    assert app.conf.broker_use_ssl is None


def test_no_sentinel_options_for_a_plain_redis_url(app):
    assert "master_name" not in app.conf.broker_transport_options
    assert "sentinel_kwargs" not in app.conf.broker_transport_options


def test_sentinel_ssl_reaches_the_master_and_the_sentinels():
    app = make_celery_app(_sentinel_settings(sentinel_ssl=True, ssl_ca_certs="/ca.pem"))
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}
    assert app.conf.broker_transport_options["sentinel_kwargs"] == {
        "socket_timeout": 3.0, "socket_connect_timeout": 3.0, "ssl": True, "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/ca.pem"}


def test_kombu_builds_a_sentinel_channel_from_our_config():
    """Without connecting: kombu picks its Sentinel transport and reads our transport options."""
    from kombu.transport.redis import SentinelTransport

    app = make_celery_app(_sentinel_settings(sentinel_password="sp"))
    with app.connection_for_write() as connection:
        assert connection.transport_cls == "sentinel"
        assert isinstance(connection.transport, SentinelTransport)
        assert connection.alt == SENTINEL_URL.split(";")  # one sentinel per part
        assert connection.password == "m4sterpw" and connection.virtual_host == "2"
        assert connection.transport_options["master_name"] == "mymaster"


def test_native_result_backend_is_celerys_sentinel_backend():
    from celery import Celery
    from celery.backends.redis import SentinelBackend

    from airflow_asyncq_provider.broker.config import native_config

    app = Celery("native-unit", set_as_current=False)
    app.conf.update(native_config(_sentinel_settings(sentinel_password="sp", key_prefix="unitp")))
    backend = app.backend
    assert isinstance(backend, SentinelBackend)
    options = app.conf.result_backend_transport_options
    assert options["master_name"] == "mymaster" and options["sentinel_kwargs"]["password"] == "sp"
    assert options["global_keyprefix"] == "unitp:native:"
    # the master's password and database come from the first part, as for the broker
    assert (backend.connparams["password"], backend.connparams["db"]) == ("m4sterpw", 2)
    assert [(h["host"], h["port"]) for h in backend.connparams["hosts"]] == [("s1", 26379), ("s2", 26380)]
    assert backend.get_key_for_task("t1") == b"unitp:native:celery-task-meta-t1"
