"""state.client: TLS options, client construction (no connection is made) and ping translation."""

from __future__ import annotations

import ssl

import pytest
import redis

from airflow_asyncq_provider.errors import AsyncQError, BrokerUnavailable, ConfigError
from airflow_asyncq_provider.settings import SUPPORTED_SCHEMES, AsyncQSettings, validate_broker_url
from airflow_asyncq_provider.state.client import (
    make_async_redis,
    make_redis,
    ping_or_raise,
    sentinel_kwargs,
    ssl_options,
)


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
    pool = make_redis(AsyncQSettings(broker_url=url, sentinel_master="m")).connection_pool
    if scheme == "sentinel":
        assert pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["host"] == "h"
    else:
        assert pool.connection_kwargs["host"] == "h"


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


# --- Redis Sentinel: a Sentinel-managed client, built without connecting ---------------------------------

SENTINEL_URL = "sentinel://airflow:m4sterpw@s1:26379/4;sentinel://s2:26380;sentinel://s3"


def _sentinel_settings(**overrides):
    return AsyncQSettings(**{"broker_url": SENTINEL_URL, "sentinel_master": "mymaster",
                             "publish_timeout": 1.5, **overrides})


def test_make_redis_with_a_sentinel_url_is_a_sentinel_managed_master_client():
    from redis.sentinel import SentinelConnectionPool, SentinelManagedConnection

    client = make_redis(_sentinel_settings(sentinel_password="s3ntinelpw"))
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster" and pool.is_master
    assert pool.connection_class is SentinelManagedConnection
    # the master: the first part's user, password and database, our timeouts, decoded replies; its
    # address is asked of the sentinels on every (re)connect
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("airflow", "m4sterpw", 4)
    assert kwargs["socket_timeout"] == 1.5 and kwargs["socket_connect_timeout"] == 1.5
    assert kwargs["decode_responses"] is True and kwargs["health_check_interval"] == 30
    assert "host" not in kwargs
    # the sentinels: every part, 26379 when no port is given, their own password, never the master's
    sentinels = pool.sentinel_manager.sentinels
    addresses = [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
                 for s in sentinels]
    assert addresses == [("s1", 26379), ("s2", 26380), ("s3", 26379)]
    for sentinel in sentinels:
        sk = sentinel.connection_pool.connection_kwargs
        assert sk["password"] == "s3ntinelpw" and sk["socket_timeout"] == 1.5
        assert sk.get("username") is None


def test_make_redis_sentinel_timeout_override_reaches_master_and_sentinels():
    pool = make_redis(_sentinel_settings(), timeout=0.2).connection_pool
    assert pool.connection_kwargs["socket_timeout"] == 0.2
    assert pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["socket_timeout"] == 0.2


def test_make_redis_sentinel_without_a_password_sends_none_to_the_sentinels():
    pool = make_redis(_sentinel_settings()).connection_pool
    assert pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs.get("password") is None


def test_make_redis_sentinel_needs_the_master_name():
    with pytest.raises(ConfigError, match="sentinel_master is empty"):
        make_redis(AsyncQSettings(broker_url=SENTINEL_URL))


def test_sentinel_ssl_puts_tls_on_the_master_and_the_sentinels():
    from redis.sentinel import SentinelManagedSSLConnection

    settings = _sentinel_settings(sentinel_ssl=True, ssl_ca_certs="/ca.pem", ssl_cert_reqs="required")
    assert ssl_options(settings) == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}
    pool = make_redis(settings).connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    sentinel_pool = pool.sentinel_manager.sentinels[0].connection_pool
    assert issubclass(sentinel_pool.connection_class, redis.SSLConnection)
    assert sentinel_pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"


def test_no_tls_for_a_sentinel_url_without_sentinel_ssl():
    settings = _sentinel_settings(ssl_ca_certs="/ca.pem")
    assert ssl_options(settings) is None
    assert "ssl" not in sentinel_kwargs(settings)


def test_make_async_redis_with_a_sentinel_url():
    from redis.asyncio.sentinel import SentinelConnectionPool

    client = make_async_redis(_sentinel_settings(sentinel_password="sp"))
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("airflow", "m4sterpw", 4)
    assert kwargs.get("socket_timeout") is None  # a pub/sub wait may last hours
    assert kwargs["socket_connect_timeout"] == 1.5
    sentinel = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert sentinel["password"] == "sp" and sentinel["socket_timeout"] == 1.5


def test_no_master_found_names_the_master_and_masks():
    from redis.sentinel import MasterNotFoundError

    class NoMaster:
        def ping(self):
            raise MasterNotFoundError("No master found for 'mymaster' : <Redis s1:26379> - ConnectionError()")

    with pytest.raises(BrokerUnavailable) as err:
        ping_or_raise(NoMaster(), _sentinel_settings(), "unit")  # type: ignore[arg-type]
    message = str(err.value)
    assert message.startswith("unit: no sentinel at [asyncq] broker_url sentinel://airflow:***@s1:26379/4;"
                              "sentinel://s2:26380;sentinel://s3 named a healthy master 'mymaster'")
    assert "sentinel_master" in message and "m4sterpw" not in message


def test_a_sentinel_refusing_its_password_points_at_sentinel_password():
    from redis.sentinel import MasterNotFoundError

    class NoAuth:
        def ping(self):
            raise MasterNotFoundError("No master found for 'mymaster' : <Redis> - AuthenticationError("
                                      "'Authentication required.')")

    with pytest.raises(BrokerUnavailable, match=r"check \[asyncq\] sentinel_password"):
        ping_or_raise(NoAuth(), _sentinel_settings(), "unit")  # type: ignore[arg-type]


def test_an_unreachable_master_named_by_the_sentinels():
    class Gone:
        def ping(self):
            raise redis.ConnectionError("Error 111 connecting to 10.0.0.5:6379. Connection refused.")

    with pytest.raises(BrokerUnavailable, match="named master 'mymaster', but it did not answer within 1.5 s"):
        ping_or_raise(Gone(), _sentinel_settings(), "unit")  # type: ignore[arg-type]


class _Answering:
    """PINGs fine; INFO answers as the given server would."""

    def __init__(self, server=None, cluster=None, refuse_info=False):
        self.sections = {"server": server or {"redis_mode": "standalone"}, "cluster": cluster or {}}
        self.refuse_info = refuse_info

    def ping(self):
        return True

    def info(self, section):
        if self.refuse_info:
            raise redis.ResponseError("NOPERM this user has no permissions to run the 'info' command")
        return self.sections[section]


def test_a_standalone_redis_passes():
    ping_or_raise(_Answering(cluster={"cluster_enabled": 0}),  # type: ignore[arg-type]
                  AsyncQSettings(broker_url="redis://h/0"), "x")


def test_a_redis_cluster_node_is_refused_at_connect_time():
    with pytest.raises(BrokerUnavailable) as err:
        ping_or_raise(_Answering(cluster={"cluster_enabled": 1}),  # type: ignore[arg-type]
                      AsyncQSettings(broker_url="redis://:pw@h:7000/0"), "AsyncQExecutor")
    message = str(err.value)
    assert message.startswith("AsyncQExecutor: [asyncq] broker_url redis://:***@h:7000/0 is a Redis Cluster node")
    assert "not supported" in message and "celery/celery#9019" in message and "Sentinel" in message


def test_a_bare_sentinel_behind_a_redis_url_is_refused_with_the_fix():
    with pytest.raises(BrokerUnavailable, match="is a Redis Sentinel, not a Redis; write it as sentinel://"):
        ping_or_raise(_Answering(server={"redis_mode": "sentinel"}),  # type: ignore[arg-type]
                      AsyncQSettings(broker_url="redis://h:26379/0"), "x")


def test_a_user_without_info_skips_the_server_check():
    ping_or_raise(_Answering(refuse_info=True),  # type: ignore[arg-type]
                  AsyncQSettings(broker_url="redis://h/0"), "x")
