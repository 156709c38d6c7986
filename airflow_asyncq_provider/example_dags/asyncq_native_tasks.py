"""asyncq_native_tasks: call native queue tasks (plain Celery tasks) from a DAG and combine their results.

* ``serve_pages`` checks that a native lane runs this example's tasks (it fails at once, naming the
  command and setting that would start one, when none does), then writes five small pages to
  ``[asyncq] shared_storage``, where every worker host, and so every lane, can read them (no internet
  and no server needed). ``stop_pages``, a teardown, removes them.
* ``fetch_pages`` fetches the five pages concurrently with the ``async def`` task
  ``asyncq.examples.fetch_page`` on the native lane's event loop and returns their results in order.
  The same task does an HTTP GET when it is given an ``http(s)://`` URL.
* ``checksum`` runs the ``def`` task ``asyncq.examples.checksum`` on a sync thread.
* ``flaky`` fails twice on the lane and succeeds on its third attempt (Celery's ``self.retry``).
* ``urgent`` is sent with priority 0, served before anything else waiting on the native queue.
* ``combine`` reads all four through XCom.

While the native tasks run, their Airflow tasks are deferred: no worker slot is held. A fleet started
with defaults runs no native lane; start one with
``airflow asyncq worker --loop-concurrency 50 --sync-threads 2`` and
``[asyncq] task_modules = airflow_asyncq_provider.native.examples`` (docs/NATIVE_TASKS.md). With
``[asyncq] shared_storage`` unset the pages go to the temp dir, so the lane must share the host of
``serve_pages``.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from airflow_asyncq_provider.operators import storage
from airflow_asyncq_provider.operators.queue_task import QueueTaskGroupOperator, QueueTaskOperator

DAG_ID = "asyncq_native_tasks"
PAGES = 5
FETCH_PAGE = "asyncq.examples.fetch_page"
TASK_MODULES = "airflow_asyncq_provider.native.examples"
LANE_COMMAND = "airflow asyncq worker --loop-concurrency 50 --sync-threads 2"
START_A_LANE = (f"This example needs a native lane that runs its tasks: start a worker with `{LANE_COMMAND}` "
                f"(any -q) and set [asyncq] task_modules = {TASK_MODULES} for it "
                f"(AIRFLOW__ASYNCQ__TASK_MODULES={TASK_MODULES}); see docs/NATIVE_TASKS.md")


def page_text(n: int) -> str:
    """Page ``n``: "page n" and 10 × n words."""
    return " ".join(["page", str(n)] + ["word"] * (10 * n))


def require_native_lane() -> list[str]:
    """The live workers whose native lane consumes the default native queue, or AirflowFailException.

    Registered names are never pruned (docs/NATIVE_TASKS.md, "Not yet"), so a name alone does not prove
    a lane is running now: the worker registry has to show one.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_asyncq_provider.settings import load_settings
    from airflow_asyncq_provider.state import native, registry
    from airflow_asyncq_provider.state.client import make_redis
    from airflow_asyncq_provider.state.keys import NATIVE_QUEUE, Keys

    settings = load_settings()
    client, keys = make_redis(settings), Keys(settings.key_prefix)
    try:
        record, _ = native.lookup_task(client, keys, FETCH_PAGE)
        if record is None:
            raise AirflowFailException(f"No native lane has registered {FETCH_PAGE}. {START_A_LANE}")
        lanes = sorted(name for name, info in registry.live_workers(client, keys).items()
                       if isinstance(info.get("native"), dict) and not info["native"].get("gave_up")
                       and NATIVE_QUEUE in (info["native"].get("queues") or [NATIVE_QUEUE]))
    finally:
        client.close()
    if not lanes:
        raise AirflowFailException(
            f"{FETCH_PAGE} was registered by the lane of {record.get('hostname')}, but no live worker runs "
            f"a native lane on queue {NATIVE_QUEUE!r} now. {START_A_LANE}")
    return lanes


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["asyncq", "example", "native"],
    doc_md=__doc__,
)
def asyncq_native_tasks():
    @task
    def serve_pages() -> dict:
        lanes = require_native_lane()
        print(f"native lane(s) on the native queue: {', '.join(lanes)}")
        pages_dir = storage.shared_path("asyncq-native-pages", storage.safe_name(get_current_context()["run_id"]))
        base = storage.join(pages_dir, "page")
        storage.makedirs(base)
        for n in range(1, PAGES + 1):
            with storage.atomic_output(storage.join(base, str(n))) as fh:
                fh.write(page_text(n).encode())
        print(f"wrote {PAGES} pages under {base}")
        return {"base": base, "dir": pages_dir}

    @task
    def stop_pages(server: dict) -> None:
        storage.remove_tree(server["dir"])
        print(f"removed {server['dir']}")

    server = serve_pages()
    base = "{{ ti.xcom_pull(task_ids='serve_pages')['base'] }}"
    fetch_pages = QueueTaskGroupOperator(
        task_id="fetch_pages",
        signatures=[{"task_name": FETCH_PAGE, "args": [f"{base}/{i}"]} for i in range(1, PAGES + 1)],
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

    # Every native call waits for serve_pages: without a lane, they end upstream_failed at once
    # instead of waiting deferred for a lane that is not there.
    server >> [fetch_pages, checksum, flaky, urgent]
    combined = combine(fetch_pages.output, checksum.output, flaky.output, urgent.output)
    combined >> stop_pages(server).as_teardown(setups=server)


asyncq_native_tasks()
