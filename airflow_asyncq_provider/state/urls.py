"""Broker URL validation and masking. No secret may leave this process unmasked."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from airflow_asyncq_provider.errors import ConfigError

SUPPORTED_SCHEMES = ("redis", "rediss")

_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^@/]*)@")


def mask_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0``; a bare password is masked too."""
    match = _USERINFO.match(url)
    if not match:
        return url
    userinfo = match.group("userinfo")
    user, sep, _password = userinfo.partition(":")
    masked = f"{user}:***" if sep else "***"
    return f"{match.group('scheme')}{masked}@{url[match.end():]}"


def validate_broker_url(url: str, source: str) -> str:
    if not url:
        raise ConfigError(f"{source} is empty; set it to a Redis URL such as redis://127.0.0.1:6379/0")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise ConfigError(
            f"{source} is {mask_url(url)!r}: scheme {scheme or '(none)'!r} is not supported; "
            f"use one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"{source} is {mask_url(url)!r}: {exc}") from None
    if not parts.hostname:
        raise ConfigError(f"{source} is {mask_url(url)!r}: it names no host")
    return url
