"""Native tasks of the ``asyncq_native_tasks`` example DAG. List this module in ``[asyncq] task_modules``
(``AIRFLOW__ASYNCQ__TASK_MODULES=airflow_asyncq_provider.native.examples``) for a lane to run them."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from airflow_asyncq_provider.native.app import fleet


@fleet.task(name="asyncq.examples.fetch_page", soft_time_limit=20, time_limit=30)
async def fetch_page(url: str) -> dict[str, Any]:
    """One page. An ``http(s)://`` URL is an HTTP GET on the event loop: hundreds of these share one
    thread. Anything else is read from storage, a path every host mounts or an object storage URL
    (``[asyncq] shared_storage``, where the example DAG writes its pages), on a thread so the loop never
    blocks; ``status`` is then 200, and a missing page raises ``FileNotFoundError``."""
    started = time.monotonic()
    if url.startswith(("http://", "https://")):
        import httpx

        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(url)
            response.raise_for_status()
        status, body = response.status_code, response.content
    else:
        status, body = 200, await asyncio.to_thread(read_stored, url)
    return {"url": url, "status": status, "bytes": len(body), "words": len(body.decode(errors="replace").split()),
            "seconds": round(time.monotonic() - started, 3)}


def read_stored(path: str) -> bytes:
    """A local path, or a URL through Airflow's ObjectStoragePath (``s3://aws_default@bucket/key``: the
    lane resolves the connection as any Airflow process does, e.g. from ``AIRFLOW_CONN_AWS_DEFAULT``)."""
    if "://" in path:
        from airflow.sdk import ObjectStoragePath

        with ObjectStoragePath(path).open("rb") as fh:
            return fh.read()
    with open(path, "rb") as fh:
        return fh.read()


@fleet.task(name="asyncq.examples.checksum")
def checksum(texts: list[str]) -> dict[str, Any]:
    """A plain ``def`` task: CPU work on a sync thread, never on the loop."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    return {"sha256": digest, "items": len(texts)}


@fleet.task(name="asyncq.examples.flaky", bind=True, max_retries=4, default_retry_delay=1)
async def flaky(self: Any, fail_times: int) -> dict[str, Any]:
    """Fails its first ``fail_times`` attempts, retrying each time after 1 s (Celery's self.retry)."""
    if self.request.retries < fail_times:
        raise self.retry(exc=ConnectionError(f"attempt {self.request.retries + 1} failed on purpose"),
                         countdown=1)
    await asyncio.sleep(0)
    return {"attempts": self.request.retries + 1}


@fleet.task(name="asyncq.examples.rank", bind=True)
def rank(self: Any, label: str) -> dict[str, Any]:
    """Reports the priority its message was delivered with."""
    return {"label": label, "priority": (self.request.delivery_info or {}).get("priority")}
