"""What every ``airflow asyncq`` command that talks to Redis does first, with the documented exit codes
(``exitcodes``): 2 for a bad setting, 3 for a Redis that does not answer (or refuses the credentials)."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from airflow_asyncq_provider import exitcodes
from airflow_asyncq_provider.errors import BrokerUnavailable, ConfigError


def fail(message: Any, code: int) -> NoReturn:
    """A one-line error on stderr and the exit code; never a traceback for a user's mistake."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def connect(who: str) -> tuple[Any, Any, Any]:
    """(settings, redis client, keys), or a one-line error and SystemExit."""
    from airflow_asyncq_provider.settings import load_settings
    from airflow_asyncq_provider.state.client import connect as connect_redis
    from airflow_asyncq_provider.state.keys import Keys

    try:
        settings = load_settings()
    except ConfigError as exc:
        fail(exc, exitcodes.CONFIG)
    try:
        client = connect_redis(settings, who)
    except BrokerUnavailable as exc:
        fail(exc, exitcodes.BROKER)
    return settings, client, Keys(settings.key_prefix)
