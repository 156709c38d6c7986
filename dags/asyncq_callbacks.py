"""Callables that Airflow runs as ExecuteCallback workloads on the fleet (deadline callbacks)."""

from __future__ import annotations

import os
import time


def record_deadline_miss(**kwargs) -> None:
    path = os.environ.get("ASYNCQ_SIDE_EFFECTS")
    if path:
        with open(path, "a") as fh:
            fh.write(f"callback deadline {kwargs.get('tag', '-')} -1 1 {kwargs.get('tag', '-')} "
                     f"- {os.environ.get('ASYNCQ_WORKER_NAME', '')} {time.time():.3f}\n")
    print(f"deadline missed: {sorted(kwargs)}")
