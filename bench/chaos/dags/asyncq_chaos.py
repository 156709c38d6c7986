"""asyncq_chaos: ``params.n`` mapped tasks that each leave a side effect in two halves.

Every try records ``start`` and, after a short sleep, ``done``: ``<tag> <dag_id> <task_id> <map_index>
<try_number> <run_id> <hostname> <worker> <time>`` (the format of dags/asyncq_hosts_dags.py). When
``$ASYNCQ_SIDE_EFFECTS`` is ``tcp://host:port``, as bench/chaos/run.py sets it, the line goes over the
network to the side-effect server (bench/chaos/sink.py), as a user's INSERT would. The try waits for the
server's ``ok`` and raises when it does not come, so a try that cannot reach the server fails and is
retried. Any other value is a file that every worker host can write. bench/chaos/run.py counts the
lines: a try whose ``done`` appears twice, or a task instance with a ``done`` in two tries, did its side
effect twice.

The sender lives here, not in bench/: a task process imports this file from the DAG folder, and the
``bench`` package is not on its path. tests/unit/test_chaos_sink.py runs it against the server.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import urllib.parse

import pendulum
from airflow.sdk import dag, get_current_context, task

RETRIES = 3
RETRY_DELAY = datetime.timedelta(seconds=2)
SEND_TIMEOUT = 5.0  # seconds for the connect, the line and the server's ok, together


class SideEffectFailed(Exception):
    """The side-effect server did not confirm the line: the try fails, and Airflow retries it."""


def send_line(url: str, line: str, timeout: float = SEND_TIMEOUT) -> None:
    """Send ``line`` to the side-effect server at ``url`` (``tcp://host:port``) and wait for its ``ok``.

    Sent once, never again within the try: a second send could write the line twice. When the ``ok``
    does not come, the line may still have been written (a cut between the write and the reply).
    """
    target = urllib.parse.urlsplit(url)
    if target.scheme != "tcp" or not target.hostname or not target.port:
        raise ValueError(f"$ASYNCQ_SIDE_EFFECTS is {url!r}; use tcp://host:port or a file path")
    deadline = time.monotonic() + timeout
    reply = b""
    try:
        with socket.create_connection((target.hostname, target.port), timeout=timeout) as sock:
            sock.sendall(line.encode())
            while not reply.endswith(b"\n") and len(reply) < 16:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(16)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:  # refused, unreachable, timed out, reset
        raise SideEffectFailed(f"side-effect server {url} was not reached or did not answer within "
                               f"{timeout:g} s: {type(exc).__name__}: {exc}") from exc
    if reply != b"ok\n":
        raise SideEffectFailed(f"side-effect server {url} answered {reply!r}, not ok, to {line.strip()!r} "
                               f"(its log says why)")


def _record(tag: str) -> None:
    target = os.environ.get("ASYNCQ_SIDE_EFFECTS")
    if not target:
        return
    ctx = get_current_context()
    ti = ctx["ti"]
    line = (f"{tag} {ti.dag_id} {ti.task_id} {ti.map_index} {ti.try_number} {ctx['run_id']} "
            f"{socket.gethostname()} {os.environ.get('ASYNCQ_WORKER_NAME', '')} {time.time():.3f}\n")
    if target.startswith("tcp://"):
        send_line(target, line)
        return
    with open(target, "a") as fh:  # one write of one short line: O_APPEND keeps lines whole
        fh.write(line)


@dag(dag_id="asyncq_chaos", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     max_active_tasks=64, max_active_runs=32, params={"n": 100, "sleep": 1.5})
def asyncq_chaos():
    """``n`` tasks of ``sleep`` × 0.5–1.4 s each, with retries, as a user's batch would be."""

    @task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def items() -> list[int]:
        return list(range(int(get_current_context()["params"]["n"])))

    @task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def work(i: int) -> int:
        _record("start")
        time.sleep(float(get_current_context()["params"]["sleep"]) * (0.5 + (i % 10) / 10))
        _record("done")
        return i

    work.expand(i=items())


asyncq_chaos()
