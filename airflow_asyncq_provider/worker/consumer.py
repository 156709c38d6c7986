"""The Celery consumer the worker runs (Celery's ``worker_consumer`` setting): Celery's own, except that
it reconnects to the broker on a short, bounded backoff, and forever.

Celery's consumer reconnects through kombu's ``Connection.ensure_connection`` with its defaults: wait 2
s, then 2 s more after each failed try, up to 30 s (celery/worker/consumer/consumer.py,
``ensure_connected``, passes no interval). After an outage of a few minutes the consumer therefore slept
up to 30 s after Redis was back; measured here: Redis down 60 s, consuming again 12 s after it returned.
With 1 s, then 1 s more, up to ``RECONNECT_MAX``, it consumes again within ``RECONNECT_MAX`` plus one
connect timeout (``[asyncq] publish_timeout``) of Redis' return, whatever the outage lasted.

Imported by Celery only, when the worker starts: never on the scheduler's path.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer

#: The longest wait between two reconnection attempts of the consumer (seconds).
RECONNECT_MAX = 5.0


class AsyncQConsumer(Consumer):  # type: ignore[misc]  # celery ships no type hints
    def ensure_connected(self, conn: Any) -> Any:
        ensure = conn.ensure_connection

        def ensure_connection(*args: Any, **kwargs: Any) -> Any:
            kwargs.update(interval_start=1.0, interval_step=1.0, interval_max=RECONNECT_MAX)
            return ensure(*args, **kwargs)

        conn.ensure_connection = ensure_connection
        return super().ensure_connected(conn)
