"""Redis clients built from settings: the one factory every component uses (executor, worker, native
lane, trigger, CLI).

With a ``sentinel://`` broker URL the client is ``Sentinel(...).master_for(sentinel_master)`` from
redis-py (``redis/sentinel.py``): its connections ask the sentinels for the master's address whenever
they (re)connect, and a write answered with READONLY by a demoted master drops the connection and is
retried on the new one (``SentinelManagedConnection.read_response``). So the same client object follows
a failover, and no component needs a restart.

What it does not do is notice a failover while its connection still works: after a planned
``SENTINEL FAILOVER`` the old master stays up and writable until the sentinels reconfigure it as a
replica (about 10 s in tests/integration/test_sentinel.py), and until then this client, like kombu's
broker connection, keeps writing there. Those writes are lost with it, and the executor then handles the
new master as a Redis restart (its ``run_id`` changed). We leave it so on purpose: a state client that
moved on alone, ahead of kombu, would split the fleet across two masters (docs/OPERATIONS.md).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

import redis

from airflow_asyncq_provider.errors import BrokerUnavailable
from airflow_asyncq_provider.redaction import mask_secrets, mask_url
from airflow_asyncq_provider.settings import (
    NO_CLUSTER,
    is_sentinel_url,
    parse_sentinel_url,
    require_sentinel_master,
)

if TYPE_CHECKING:
    import redis.asyncio

    from airflow_asyncq_provider.settings import AsyncQSettings

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_SOURCE = "[asyncq] broker_url"


def uses_tls(settings: AsyncQSettings) -> bool:
    """rediss://, or sentinel:// with ``sentinel_ssl`` (kombu has no TLS form of sentinel://)."""
    if is_sentinel_url(settings.broker_url):
        return settings.sentinel_ssl
    return settings.broker_url.startswith("rediss://")


def ssl_options(settings: AsyncQSettings) -> dict[str, Any] | None:
    """TLS options in the form both redis-py and kombu's Redis transport accept (kombu's
    ``Channel._connparams`` merges them into the master's connection and, for a Sentinel URL, switches
    to its ``SentinelManagedSSLConnection``)."""
    if not uses_tls(settings):
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[settings.ssl_cert_reqs]}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        value = getattr(settings, name)
        if value:
            options[name] = value
    return options


def sentinel_kwargs(settings: AsyncQSettings, timeout: float | None = None) -> dict[str, Any]:
    """How to talk to the sentinels themselves: redis-py's (and kombu's) ``sentinel_kwargs``. Given,
    it replaces redis-py's default of copying only the master's ``socket_*`` options, so the timeouts
    are set here too; the password and TLS are the sentinels' own (``sentinel_password``,
    ``sentinel_ssl``), never the master's."""
    timeout = settings.publish_timeout if timeout is None else timeout
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if settings.sentinel_password:
        options["password"] = settings.sentinel_password
    tls = ssl_options(settings)
    if tls is not None:
        options.update(ssl=True, **tls)
    return options


def _sentinel_master_kwargs(settings: AsyncQSettings) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """(sentinels, the master's connection options) of a sentinel:// URL, read as kombu reads it."""
    url = parse_sentinel_url(settings.broker_url, _SOURCE)
    master: dict[str, Any] = {"db": url.db, "username": url.username, "password": url.password}
    tls = ssl_options(settings)
    if tls is not None:
        master.update(ssl=True, **tls)  # SentinelConnectionPool: ssl=True -> SentinelManagedSSLConnection
    return list(url.sentinels), master


def make_redis(settings: AsyncQSettings, timeout: float | None = None) -> redis.Redis:
    timeout = settings.publish_timeout if timeout is None else timeout
    common: dict[str, Any] = {"decode_responses": True, "socket_timeout": timeout,
                              "socket_connect_timeout": timeout, "health_check_interval": 30,
                              "retry_on_timeout": False}
    if is_sentinel_url(settings.broker_url):
        from redis.sentinel import Sentinel

        name = require_sentinel_master(settings.broker_url, settings.sentinel_master)
        sentinels, master = _sentinel_master_kwargs(settings)
        return Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs(settings, timeout)).master_for(
            name, **common, **master)
    return redis.Redis.from_url(settings.broker_url, **common, **(ssl_options(settings) or {}))


def make_async_redis(settings: AsyncQSettings) -> redis.asyncio.Redis:
    """The triggerer's client: no socket timeout, since a pub/sub wait may last hours (the sentinels,
    asked only for the master's address, do get one)."""
    import redis.asyncio as aredis

    if is_sentinel_url(settings.broker_url):
        from redis.asyncio.sentinel import Sentinel

        name = require_sentinel_master(settings.broker_url, settings.sentinel_master)
        sentinels, master = _sentinel_master_kwargs(settings)
        return Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs(settings)).master_for(
            name, decode_responses=True, socket_connect_timeout=settings.publish_timeout, **master)
    return aredis.Redis.from_url(settings.broker_url, decode_responses=True,
                                 socket_connect_timeout=settings.publish_timeout,
                                 **(ssl_options(settings) or {}))


def connect(settings: AsyncQSettings, who: str) -> redis.Redis:
    """A client that answered a PING, or ``BrokerUnavailable`` naming the setting and the fix."""
    client = make_redis(settings)
    ping_or_raise(client, settings, who)
    return client


def ping_or_raise(client: redis.Redis, settings: AsyncQSettings, who: str) -> None:
    """PING, then refuse a server we cannot work with (Redis Cluster, a bare sentinel)."""
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise BrokerUnavailable(
            f"{who}: Redis at [asyncq] broker_url {mask_url(settings.broker_url)} refused the credentials "
            f"({mask_secrets(str(exc))}); check the ACL user and password in the URL"
        ) from exc
    except (redis.RedisError, OSError) as exc:
        raise _unavailable(exc, settings, who) from exc
    refuse_unsupported_server(client, settings, who)


def _unavailable(exc: BaseException, settings: AsyncQSettings, who: str) -> BrokerUnavailable:
    text = mask_secrets(str(exc))
    url = mask_url(settings.broker_url)
    if uses_tls(settings) and ("ssl" in text.lower() or "certificate" in text):
        return BrokerUnavailable(
            f"{who}: the TLS handshake with Redis at [asyncq] broker_url {url} "
            f"failed ({type(exc).__name__}: {text}); check [asyncq] ssl_ca_certs (the CA that signed the "
            "server's certificate), ssl_certfile and ssl_keyfile (when the server asks for a client "
            "certificate) and ssl_cert_reqs"
        )
    if is_sentinel_url(settings.broker_url):
        from redis.sentinel import MasterNotFoundError

        if isinstance(exc, MasterNotFoundError):
            # discover_master collects each sentinel's error in the text, so NOAUTH shows there
            hint = ("check [asyncq] sentinel_password" if "auth" in text.lower() else
                    "check [asyncq] sentinel_master (`SENTINEL MASTERS` on a sentinel lists the names) and "
                    "that the sentinels in broker_url are up")
            return BrokerUnavailable(
                f"{who}: no sentinel at [asyncq] broker_url {url} named a healthy master "
                f"{settings.sentinel_master!r} within {settings.publish_timeout:g} s "
                f"({type(exc).__name__}: {text}); {hint}"
            )
        return BrokerUnavailable(
            f"{who}: the sentinels at [asyncq] broker_url {url} named master "
            f"{settings.sentinel_master!r}, but it did not answer within {settings.publish_timeout:g} s "
            f"({type(exc).__name__}: {text}); a failover may be under way, or the master's address the "
            "sentinels announce is not reachable from here"
        )
    return BrokerUnavailable(
        f"{who}: [asyncq] broker_url is {url} but no Redis answered there "
        f"within {settings.publish_timeout:g} s ({type(exc).__name__}: {text}); "
        "start Redis or set [asyncq] broker_url / AIRFLOW__ASYNCQ__BROKER_URL"
    )


def refuse_unsupported_server(client: redis.Redis, settings: AsyncQSettings, who: str) -> None:
    """A Redis Cluster node or a sentinel answers PING like a Redis, then fails later in ways that do
    not say why (MOVED, unknown command); ``INFO`` says what it is. A user whose ACL denies INFO skips
    the check."""
    try:
        server = client.info("server")
        cluster = client.info("cluster")
    except redis.ResponseError:
        return
    except (redis.RedisError, OSError) as exc:
        raise _unavailable(exc, settings, who) from exc
    url = mask_url(settings.broker_url)
    if str(cluster.get("cluster_enabled", 0)) == "1" or server.get("redis_mode") == "cluster":
        raise BrokerUnavailable(f"{who}: [asyncq] broker_url {url} is a Redis Cluster node "
                                f"(INFO cluster: cluster_enabled:1). {NO_CLUSTER}")
    if server.get("redis_mode") == "sentinel":
        raise BrokerUnavailable(f"{who}: [asyncq] broker_url {url} is a Redis Sentinel, not a Redis; write "
                                "it as sentinel://host:port (one part per sentinel) and set [asyncq] "
                                "sentinel_master to the name it monitors")
