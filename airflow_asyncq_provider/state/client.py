"""Redis clients and Celery TLS options built from settings, with errors that name the setting."""

from __future__ import annotations

import ssl
from typing import Any

import redis

from airflow_asyncq_provider.errors import BrokerUnavailable
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state.urls import mask_secrets, mask_url

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def ssl_options(settings: AsyncQSettings) -> dict[str, Any] | None:
    """TLS options in the form both redis-py and kombu's Redis transport accept."""
    if not settings.broker_url.startswith("rediss://"):
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[settings.ssl_cert_reqs]}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        value = getattr(settings, name)
        if value:
            options[name] = value
    return options


def make_redis(settings: AsyncQSettings, timeout: float | None = None) -> redis.Redis:
    timeout = settings.publish_timeout if timeout is None else timeout
    return redis.Redis.from_url(
        settings.broker_url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        retry_on_timeout=False,
        **(ssl_options(settings) or {}),
    )


def ping_or_raise(client: redis.Redis, settings: AsyncQSettings, who: str) -> None:
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise BrokerUnavailable(
            f"{who}: Redis at [asyncq] broker_url {mask_url(settings.broker_url)} refused the credentials "
            f"({mask_secrets(str(exc))}); check the ACL user and password in the URL"
        ) from exc
    except (redis.RedisError, OSError) as exc:
        text = mask_secrets(str(exc))
        if settings.broker_url.startswith("rediss://") and ("ssl" in text.lower() or "certificate" in text):
            raise BrokerUnavailable(
                f"{who}: the TLS handshake with Redis at [asyncq] broker_url {mask_url(settings.broker_url)} "
                f"failed ({type(exc).__name__}: {text}); check [asyncq] ssl_ca_certs (the CA that signed the "
                "server's certificate), ssl_certfile and ssl_keyfile (when the server asks for a client "
                "certificate) and ssl_cert_reqs"
            ) from exc
        raise BrokerUnavailable(
            f"{who}: [asyncq] broker_url is {mask_url(settings.broker_url)} but no Redis answered there "
            f"within {settings.publish_timeout:g} s ({type(exc).__name__}: {text}); "
            "start Redis or set [asyncq] broker_url / AIRFLOW__ASYNCQ__BROKER_URL"
        ) from exc
