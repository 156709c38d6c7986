"""asyncq_native_tasks: call native queue tasks (plain Celery tasks) from a DAG and combine their results.

* ``serve_pages`` starts a small HTTP server on 127.0.0.1 (no internet needed) that lives at most ten
  minutes; ``stop_pages`` (a teardown) stops it.
* ``fetch_pages`` fetches five pages concurrently with the ``async def`` task
  ``asyncq.examples.fetch_page`` on the native lane's event loop and returns their results in order.
* ``checksum`` runs the ``def`` task ``asyncq.examples.checksum`` on a sync thread.
* ``flaky`` fails twice on the lane and succeeds on its third attempt (Celery's ``self.retry``).
* ``urgent`` is sent with priority 0, served before anything else waiting on the native queue.
* ``combine`` reads all four through XCom.

While the native tasks run, their Airflow tasks are deferred: no worker slot is held. The lane must run
on the same host as ``serve_pages`` (it fetches from 127.0.0.1) and import
``airflow_asyncq_provider.native.examples`` (``[asyncq] task_modules``); docs/NATIVE_TASKS.md.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from airflow_asyncq_provider.operators.queue_task import QueueTaskGroupOperator, QueueTaskOperator

PAGES = 5
SERVER = r"""
import http.server, signal, sys, threading
class Pages(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        n = self.path.rstrip("/").rsplit("/", 1)[-1]
        body = (" ".join(["page", n] + ["word"] * (10 * int(n or 0)))).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pages)
print(server.server_address[1], flush=True)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
threading.Timer(float(sys.argv[1]), server.shutdown).start()
server.serve_forever()
"""


@dag(
    dag_id="asyncq_native_tasks",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["asyncq", "example", "native"],
)
def asyncq_native_tasks():
    @task
    def serve_pages() -> dict:
        import subprocess
        import sys

        proc = subprocess.Popen([sys.executable, "-c", SERVER, "600"], stdout=subprocess.PIPE,
                                start_new_session=True)
        port = int(proc.stdout.readline())
        print(f"serving {PAGES} pages on http://127.0.0.1:{port} (pid {proc.pid})")
        return {"base_url": f"http://127.0.0.1:{port}", "pid": proc.pid}

    @task
    def stop_pages(server: dict) -> None:
        import os
        import signal

        try:
            os.kill(server["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass

    server = serve_pages()
    base = "{{ ti.xcom_pull(task_ids='serve_pages')['base_url'] }}"
    fetch_pages = QueueTaskGroupOperator(
        task_id="fetch_pages",
        signatures=[{"task_name": "asyncq.examples.fetch_page", "args": [f"{base}/page/{i}"]}
                    for i in range(1, PAGES + 1)],
    )
    checksum = QueueTaskOperator(task_id="checksum", task_name="asyncq.examples.checksum",
                                 args=[["{{ run_id }}", "asyncq", "native"]])
    flaky = QueueTaskOperator(task_id="flaky", task_name="asyncq.examples.flaky", args=[2])
    urgent = QueueTaskOperator(task_id="urgent", task_name="asyncq.examples.rank", args=["urgent"], priority=0)

    @task
    def combine(pages: list, digest: dict, flaky_result: dict, urgent_result: dict) -> dict:
        summary = {
            "pages": len(pages),
            "words": sum(p["words"] for p in pages),
            "statuses": sorted({p["status"] for p in pages}),
            "sha256": digest["sha256"],
            "flaky_attempts": flaky_result["attempts"],
            "urgent_priority": urgent_result["priority"],
        }
        print(f"combined: {summary}")
        return summary

    server >> fetch_pages
    combined = combine(fetch_pages.output, checksum.output, flaky.output, urgent.output)
    combined >> stop_pages(server).as_teardown(setups=server)


asyncq_native_tasks()
