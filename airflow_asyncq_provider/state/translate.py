"""redis-py's errors become ours at the state boundary (httpx's habit): every function of ``state/``
that talks to Redis is ``@translated``, so callers above it never catch a redis-py exception.

redis is imported only when an error is raised: the executor imports ``state`` on the scheduler's hot
path, where redis is not otherwise needed until ``start()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from airflow_asyncq_provider.errors import StateError, StateUnavailable
from airflow_asyncq_provider.redaction import mask_secrets

F = TypeVar("F", bound=Callable[..., Any])


def translated(fn: F) -> F:
    """A refused, reset or timed-out connection is ``StateUnavailable`` (retry later); any other Redis
    error is ``StateError``. Errors that are not Redis' pass through unchanged."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            import redis

            if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
                raise StateUnavailable(f"{fn.__name__}: Redis unreachable ({type(exc).__name__}: "
                                       f"{mask_secrets(str(exc))})") from exc
            if isinstance(exc, redis.RedisError):
                raise StateError(f"{fn.__name__}: {type(exc).__name__}: {mask_secrets(str(exc))}") from exc
            raise

    return wrapper  # type: ignore[return-value]
