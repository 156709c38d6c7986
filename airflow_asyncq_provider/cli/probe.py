"""``airflow asyncq probe [--hostname NODE]``: a liveness check for Kubernetes and Docker.

It reads the worker's registry record, the same one ``airflow asyncq status`` shows, and exits 0 when
the worker heartbeats and its consumer ticks (``consumer_tick_at``: the Celery consumer's event loop
turns). Otherwise it exits 1 (``exitcodes.UNHEALTHY``, Docker's "unhealthy") with a one-line reason,
2 for a bad setting and 3 when Redis cannot be reached. A worker that drains or is in maintenance takes
no new work on purpose and is reported healthy: restarting it would kill what it still runs.

Without ``--hostname`` it checks every worker registered from this host (node names ``…@<hostname>``);
``--hostname`` takes the worker's node name, with Celery's ``%h`` for this host's name.
"""

from __future__ import annotations

import argparse
import socket
import time
from typing import Any

from airflow_asyncq_provider import exitcodes
from airflow_asyncq_provider.cli.connect import fail


def verdict(node: str, info: dict[str, Any] | None, now: float, interval: float, lost_timeout: float,
            publish_timeout: float) -> str | None:
    """None when ``node`` is healthy, else why not (one line)."""
    from airflow_asyncq_provider.state import registry

    if info is None:
        return (f"worker {node} has no heartbeat in Redis: it is not running, or it has not reached Redis for "
                f"more than [asyncq] worker_lost_timeout ({lost_timeout:g} s)")
    beat = float(info.get("heartbeat_at") or 0)
    stale_after = 2 * interval + publish_timeout
    if now - beat > stale_after:
        return (f"worker {node}'s last heartbeat is {now - beat:.0f} s old (one is due every {interval:g} s, "
                "[asyncq] worker_heartbeat_interval)")
    health = registry.health(info, now)
    if registry.is_stuck(health):
        return (f"worker {node} heartbeats but its consumer has not ticked for {health[len('stuck consumer ('):-1]}: "
                "it takes no new work")
    if health == "starting":
        return f"worker {node} heartbeats but its consumer has not started yet"
    return None


def nodes_of_this_host(workers: dict[str, dict[str, Any]], host: str) -> list[str]:
    return sorted(name for name in workers if "@" in name and name.rpartition("@")[2] == host)


def probe(args: argparse.Namespace) -> None:
    from airflow_asyncq_provider.cli.connect import connect
    from airflow_asyncq_provider.state import registry

    settings, client, keys = connect("airflow asyncq probe")
    workers = registry.live_workers(client, keys)
    host = socket.gethostname()
    if args.hostname:
        from celery.utils.nodenames import host_format

        nodes = [host_format(args.hostname, host=host)]
    else:
        nodes = nodes_of_this_host(workers, host)
        if not nodes:
            fail(f"no worker of host {host} has a heartbeat in Redis (live workers: "
                 f"{', '.join(sorted(workers)) or 'none'}); is `airflow asyncq worker` running here? Pass "
                 "--hostname NODE if its node name does not end in @<this host's name>", exitcodes.UNHEALTHY)
    now = time.time()
    for node in nodes:
        reason = verdict(node, workers.get(node), now, settings.worker_heartbeat_interval,
                         settings.worker_lost_timeout, settings.publish_timeout)
        if reason is not None:
            fail(reason, exitcodes.UNHEALTHY)
    for node in nodes:
        info = workers[node]
        print(f"ok: {node} {registry.health(info, now)}, heartbeat {now - float(info['heartbeat_at']):.0f} s ago, "
              f"consumer ticked {now - float(info['consumer_tick_at']):.0f} s ago")
