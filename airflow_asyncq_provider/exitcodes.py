"""Exit codes of every ``airflow asyncq`` command and of the worker's child processes, in one place.

docs/OPERATIONS.md lists them, and a test keeps that table in step with this module.
"""

from __future__ import annotations

OK = 0
#: ``airflow asyncq probe``: this host's worker does not heartbeat, or its consumer does not tick (the
#: reason is on stderr). 1 is what Docker's HEALTHCHECK reads as unhealthy.
UNHEALTHY = 1
#: A bad argument or ``[asyncq]`` setting; the message names it.
CONFIG = 2
#: Redis could not be reached (or refused the credentials); the message shows the masked URL.
BROKER = 3
#: The worker's warm fork parent could not start.
FORKSERVER = 4
#: The worker drained, but ``[asyncq] worker_drain_timeout`` ran out and running tasks were terminated.
DRAIN_TIMEOUT = 5
#: A second SIGTERM: the worker killed its running tasks at once.
FORCED = 6
