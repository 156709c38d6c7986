"""Broker URL validation and masking. No secret may leave this process unmasked."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from airflow_asyncq_provider.errors import ConfigError

SUPPORTED_SCHEMES = ("redis", "rediss")

# userinfo is greedy up to the *last* "@" of the token, as redis-py splits it: "u:my@pass@host"
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^\s'\"<>]*)@(?=[^\s'\"<>@]*)")
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&]password=)[^&\s'\"<>]*", re.IGNORECASE)


def _mask_userinfo(match: re.Match[str]) -> str:
    user, sep, _password = match.group("userinfo").partition(":")
    return f"{match.group('scheme')}{f'{user}:***' if sep else '***'}@"


def mask_secrets(text: str) -> str:
    """Mask the password of every URL anywhere in ``text``, in userinfo and in ``?password=``."""
    if "://" not in text:
        return text
    return _QUERY_PASSWORD.sub(r"\g<key>***", _URL_USERINFO.sub(_mask_userinfo, text))


def mask_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0``; a bare password is masked too."""
    return mask_secrets(url)


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
    except ValueError:
        # urllib's message may quote part of the password: say only what is safe to say
        raise ConfigError(f"{source} ({scheme}://…) is not a valid URL: check the host and port") from None
    if not parts.hostname:
        raise ConfigError(f"{source} is {mask_url(url)!r}: it names no host")
    return url
