"""What every ``airflow asyncq`` command that talks to Redis does first, with the documented exit codes:
2 for a bad setting, 3 for a Redis that does not answer (or refuses the credentials)."""

from __future__ import annotations

import sys
from typing import Any

from airflow_asyncq_provider.errors import BrokerUnavailable, ConfigError

EXIT_CONFIG, EXIT_BROKER = 2, 3


def redis_or_exit(settings: Any, who: str) -> Any:
    """A Redis client that answered a PING, or a one-line error and SystemExit(3)."""
    from airflow_asyncq_provider.state.client import make_redis, ping_or_raise

    client = make_redis(settings)
    try:
        ping_or_raise(client, settings, who)
    except BrokerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BROKER) from None
    return client


def connect(who: str) -> tuple[Any, Any, Any]:
    """(settings, redis client, keys), or a one-line error and SystemExit."""
    from airflow_asyncq_provider.settings import load_settings
    from airflow_asyncq_provider.state.keys import Keys

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    return settings, redis_or_exit(settings, who), Keys(settings.key_prefix)
