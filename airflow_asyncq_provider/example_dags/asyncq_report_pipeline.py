"""asyncq_report_pipeline: a daily sales report on a cron schedule, the Airflow way to run a Celery beat job.

Runs at 06:15 UTC every day once unpaused (``schedule="15 6 * * *"``, no catchup), and on demand.

1. ``seed_source`` stands in for the upstream system: it makes sure the day's order export exists as
   a JSONL file under ``[asyncq] shared_storage`` (``params.orders`` orders, seeded by the date, so a
   re-run sees the same data), where every page task can read it, whichever host it runs on. Pass
   ``params.source`` to report on an existing file instead (a path every worker reaches, or a URL).
2. ``pages`` is a ``chunked_fan_out`` over that file with ``file_format="jsonl"``: ``split`` cuts it
   into at least ``params.pages`` record-aligned pages, the mapped ``process`` fetches its page in
   parallel on the fleet and returns a small per-product summary (it travels through XCom as a value,
   no Parquet needed), and ``combine`` adds the summaries up.
3. ``write_report`` writes ``sales-report-<date>.csv`` (product, orders, quantity, revenue) under
   ``params.reports_dir`` (default: ``asyncq-reports`` under the shared storage) and returns its path
   and totals.

Every task has ``on_failure_callback=notify_failure``: with a recipient (``params.notify_email`` or
the ``ASYNCQ_REPORT_EMAIL`` environment variable) and an ``smtp_default`` connection it sends an
e-mail; otherwise it writes one clear ``REPORT FAILURE NOTIFICATION`` record to the task's log. Trigger
with ``{"source": "/no/such/file.jsonl"}`` to see it: ``split`` fails at once with "does not exist".
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from airflow_asyncq_provider.operators import chunked_fan_out, storage

DAG_ID = "asyncq_report_pipeline"
PRODUCTS = [f"SKU-{i:03d}" for i in range(20)]
log = logging.getLogger(__name__)


def report_date(context) -> str:
    run = context["dag_run"]
    when = run.logical_date or run.run_after
    return when.strftime("%Y-%m-%d")


def write_orders(path: str, orders: int, seed: str) -> None:
    """The day's export: one JSON object per line, appearing whole or not at all."""
    rng = random.Random(seed)
    storage.makedirs(os.path.dirname(path))
    with storage.atomic_output(path) as out:
        for i in range(orders):
            out.write((json.dumps({"order_id": i, "product": rng.choice(PRODUCTS), "store": rng.randint(1, 40),
                                   "qty": rng.randint(1, 5), "price_cents": rng.randint(199, 9999),
                                   "note": rng.choice(["", "gift", "express, fragile"])}) + "\n").encode())


def page_summary(frame, chunk):
    """process: per product, [orders, quantity, revenue in cents] for one page."""
    if frame.empty:
        return {}
    revenue = frame["qty"] * frame["price_cents"]
    grouped = frame.assign(revenue=revenue).groupby("product").agg(
        orders=("order_id", "size"), quantity=("qty", "sum"), revenue=("revenue", "sum"))
    return {str(product): [int(row.orders), int(row.quantity), int(row.revenue)]
            for product, row in grouped.iterrows()}


def merge_summaries(accumulated, page):
    merged = dict(accumulated)
    for product, values in page.items():
        old = merged.get(product, [0, 0, 0])
        merged[product] = [a + b for a, b in zip(old, values, strict=True)]
    return merged


def notify_failure(context) -> None:
    """E-mail when SMTP is set up for this DAG, else one clear record in the task's log."""
    ti = context["ti"]
    where = f"{ti.task_id}" + (f"[{ti.map_index}]" if getattr(ti, "map_index", -1) >= 0 else "")
    summary = (f"{ti.dag_id} run {ti.run_id}: task {where} try {ti.try_number} failed: "
               f"{context.get('exception')!r}")
    recipient = context["params"].get("notify_email") or os.environ.get("ASYNCQ_REPORT_EMAIL")
    if recipient:
        try:
            from airflow.providers.smtp.hooks.smtp import SmtpHook

            with SmtpHook(smtp_conn_id="smtp_default") as hook:
                hook.send_email_smtp(to=recipient, subject=f"[airflow] {ti.dag_id} failed in {where}",
                                     html_content=f"<pre>{summary}</pre>")
            log.warning("Failure notification e-mailed to %s: %s", recipient, summary)
            return
        except Exception:
            log.exception("Could not e-mail the failure notification to %s; logging it instead", recipient)
    log.error("REPORT FAILURE NOTIFICATION: %s. No e-mail was sent: set the DAG param notify_email (or "
              "ASYNCQ_REPORT_EMAIL) and an smtp_default connection to get these by e-mail.", summary)


@dag(
    dag_id=DAG_ID,
    schedule="15 6 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    is_paused_upon_creation=True,  # an example should not start reporting until someone turns it on
    max_active_runs=2,
    params={
        "orders": Param(40_000, type="integer", minimum=0, description="orders in the seeded export"),
        "pages": Param(4, type="integer", minimum=1, description="read the export in at least N pages"),
        "source": Param("", type="string", description="report on this JSONL file instead of the seeded one"),
        "reports_dir": Param("", type="string", description="default: asyncq-reports under [asyncq] shared_storage"),
        "notify_email": Param("", type="string", description="recipient of failure e-mails"),
    },
    default_args={"on_failure_callback": notify_failure},
    tags=["asyncq", "example", "chunked", "scheduled"],
    doc_md=__doc__,
)
def asyncq_report_pipeline():
    @task
    def seed_source() -> str:
        context = get_current_context()
        params = context["params"]
        if params["source"]:
            return params["source"]
        day = report_date(context)
        path = storage.shared_path("asyncq-report-source", f"orders-{day}-{params['orders']}.jsonl")
        if not storage.exists(path):
            write_orders(path, int(params["orders"]), seed=day)
        print(f"export for {day}: {path} ({storage.input_size(path):,} bytes)")
        return path

    source = seed_source()
    pages = chunked_fan_out(
        group_id="pages",
        path=source,
        file_format="jsonl",
        memory_budget="512MiB",
        process=page_summary,
        combine=merge_summaries,
        min_chunks="{{ params.pages }}",
        on_bad_rows="skip",
    )

    @task
    def write_report(summary: dict | None) -> dict:
        context = get_current_context()
        day = report_date(context)
        reports_dir = context["params"]["reports_dir"] or storage.shared_path("asyncq-reports")
        storage.makedirs(reports_dir)
        path = storage.join(reports_dir, f"sales-report-{day}.csv")
        rows = sorted((summary or {}).items())
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["product", "orders", "quantity", "revenue"])
        for product, (orders, quantity, cents) in rows:
            writer.writerow([product, orders, quantity, f"{cents // 100}.{cents % 100:02d}"])
        with storage.atomic_output(path) as out:  # one small file: a product per row
            out.write(text.getvalue().encode())
        totals = {"path": path, "products": len(rows), "orders": sum(v[0] for _, v in rows),
                  "revenue_cents": sum(v[2] for _, v in rows)}
        print(f"report for {day}: {totals}")
        return totals

    write_report(pages.output)


asyncq_report_pipeline()
