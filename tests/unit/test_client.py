"""state.client: TLS options, client construction (no connection is made) and ping translation."""

from __future__ import annotations

import ssl

import pytest
import redis

from airflow_asyncq_provider.errors import AsyncQError, BrokerUnavailable
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state.client import make_redis, ping_or_raise, ssl_options
from airflow_asyncq_provider.state.urls import SUPPORTED_SCHEMES, validate_broker_url


def test_no_tls_options_for_plain_redis():
    assert ssl_options(AsyncQSettings(broker_url="redis://h:6379/0", ssl_ca_certs="/ca.pem")) is None


@pytest.mark.parametrize(("reqs", "expected"), [("required", ssl.CERT_REQUIRED),
                                                ("optional", ssl.CERT_OPTIONAL), ("none", ssl.CERT_NONE)])
def test_tls_options_for_rediss(reqs, expected):
    options = ssl_options(AsyncQSettings(broker_url="rediss://h:6380/0", ssl_cert_reqs=reqs,
                                         ssl_ca_certs="/ca.pem", ssl_keyfile="/k.pem"))
    assert options == {"ssl_cert_reqs": expected, "ssl_ca_certs": "/ca.pem", "ssl_keyfile": "/k.pem"}


def test_make_redis_uses_the_publish_timeout_and_decodes():
    client = make_redis(AsyncQSettings(broker_url="redis://:pw@h:6390/3", publish_timeout=1.5))
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("h", 6390, 3, "pw")
    assert kwargs["socket_timeout"] == 1.5 and kwargs["socket_connect_timeout"] == 1.5
    assert kwargs["decode_responses"] is True
    assert make_redis(AsyncQSettings(broker_url="redis://h/0"), timeout=0.2).connection_pool \
        .connection_kwargs["socket_timeout"] == 0.2


@pytest.mark.parametrize("scheme", SUPPORTED_SCHEMES)
def test_make_redis_builds_every_scheme_settings_accept(scheme):
    # Settings and the client must agree: a URL that validates must not die in redis-py later.
    url = validate_broker_url(f"{scheme}://h:6380/0", "x")
    assert make_redis(AsyncQSettings(broker_url=url)).connection_pool.connection_kwargs["host"] == "h"


class _Refusing:
    def ping(self):
        raise redis.ConnectionError("Error 111 connecting to 10.0.0.9:6379. Connection refused.")


def test_ping_or_raise_translates_and_masks():
    settings = AsyncQSettings(broker_url="redis://airflow:t0psecret@10.0.0.9:6379/0", publish_timeout=2)
    with pytest.raises(BrokerUnavailable) as err:
        ping_or_raise(_Refusing(), settings, "unit")  # type: ignore[arg-type]
    message = str(err.value)
    assert message.startswith("unit: [asyncq] broker_url is redis://airflow:***@10.0.0.9:6379/0")
    assert "within 2 s" in message
    assert "ConnectionError: Error 111" in message
    assert "AIRFLOW__ASYNCQ__BROKER_URL" in message
    assert "t0psecret" not in message
    assert isinstance(err.value.__cause__, redis.ConnectionError)
    assert isinstance(err.value, AsyncQError)


def test_ping_or_raise_translates_os_errors():
    class Broken:
        def ping(self):
            raise OSError("no route to host")

    with pytest.raises(BrokerUnavailable, match="OSError: no route to host"):
        ping_or_raise(Broken(), AsyncQSettings(broker_url="redis://h/0"), "x")  # type: ignore[arg-type]


def test_ping_or_raise_names_refused_credentials():
    class Refusing:
        def ping(self):
            raise redis.AuthenticationError("invalid username-password pair or user is disabled.")

    settings = AsyncQSettings(broker_url="redis://airflow:wr0ngpw@h:6379/0")
    with pytest.raises(BrokerUnavailable) as err:
        ping_or_raise(Refusing(), settings, "x")  # type: ignore[arg-type]
    message = str(err.value)
    assert message.startswith("x: Redis at [asyncq] broker_url redis://airflow:***@h:6379/0 refused the "
                              "credentials")
    assert "wr0ngpw" not in message
