"""The same workload as ``def`` tasks for a stock prefork worker:
``celery -A bench.native.prefork_app worker -P prefork -c 8``."""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("bench-prefork", broker=os.environ["BENCH_REDIS_URL"], backend=os.environ["BENCH_REDIS_URL"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_prefetch_multiplier=1, worker_hijack_root_logger=False)


@app.task(name="bench.sync_sleep")
def sync_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds
