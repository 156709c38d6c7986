"""What a chunk's ``process`` returns, on its way to ``combine``: Parquet part files or small values.

A DataFrame result is written as a Parquet file and only its path travels through XCom; anything else
must be a small JSON value (an aggregate). The attempt markers that drive the adaptive retry live here
too, next to the parts, because both need the same shared work directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from airflow_asyncq_provider.operators import storage
from airflow_asyncq_provider.operators.errors import ChunkingError, ResultTooLargeError
from airflow_asyncq_provider.sizes import format_size

MAX_VALUE_BYTES = 64 * 1024


def is_frame(value: Any) -> bool:
    module = type(value).__module__
    if not module.startswith("pandas"):
        return False
    import pandas as pd

    return isinstance(value, pd.DataFrame)


def write_parquet(frame: Any, path: str) -> None:
    """Write atomically for local paths: a reader never sees half a part."""
    if storage.is_remote(path):
        with storage.open_output(path) as fh:
            frame.to_parquet(fh, index=False)
        return
    storage.makedirs(os.path.dirname(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def read_parquet(path: str) -> Any:
    import pandas as pd

    if not storage.exists(path):
        raise ChunkingError(f"chunk output {path} is missing; was the work directory cleaned up or is it "
                            f"not shared between workers? Clear the chunk task that wrote it to redo it")
    if storage.is_remote(path):
        with storage._object_path(path).open("rb") as fh:
            return pd.read_parquet(fh)
    return pd.read_parquet(path)


def check_small(value: Any, what: str) -> Any:
    try:
        size = len(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ResultTooLargeError(
            f"{what} returned a {type(value).__name__}, which is neither a DataFrame nor JSON-serializable "
            f"({exc}); return a pandas DataFrame (written as Parquet) or a small dict/list/number"
        ) from exc
    if size > MAX_VALUE_BYTES:
        raise ResultTooLargeError(
            f"{what} returned {format_size(size)} of JSON, more than the {MAX_VALUE_BYTES // 1024} KiB that "
            f"may travel through XCom; return a pandas DataFrame instead, and it is written as Parquet"
        )
    return value


def store(value: Any, path_without_suffix: str, what: str) -> dict[str, Any]:
    """``{"parquet": path, "rows": n}`` for a DataFrame, ``{"value": v}`` for a small value."""
    if is_frame(value):
        path = f"{path_without_suffix}.parquet"
        write_parquet(value, path)
        return {"parquet": path, "rows": len(value)}
    return {"value": check_small(value, what)}


def load(output: dict[str, Any]) -> Any:
    if "parquet" in output:
        return read_parquet(output["parquet"])
    return output["value"]


def publish(value: Any, work_dir: str, name: str, what: str) -> Any:
    """The XCom return value of a fold: a DataFrame becomes ``{"parquet", "rows", "columns"}``."""
    if is_frame(value):
        path = storage.join(work_dir, f"{name}.parquet")
        write_parquet(value, path)
        return {"parquet": path, "rows": len(value), "columns": [str(c) for c in value.columns]}
    return check_small(value, what)


# ------------------------------------------------------------------ attempt markers
class Attempts:
    """One small JSON file per try of one chunk: ``running`` while it works, then ``success``,
    ``error`` (a Python exception) or ``memory`` (MemoryError).

    A try that was killed (the memory watchdog's "memory limit exceeded", the kernel OOM killer, a lost
    worker) never writes its end, so it stays ``running``; the next try reads that as a memory failure
    and splits the chunk. Misreading a lost worker as memory costs only a finer split.
    """

    def __init__(self, work_dir: str, index: int) -> None:
        self.dir = storage.join(work_dir, "attempts", f"chunk-{index:05d}")

    def _path(self, try_number: int) -> str:
        return storage.join(self.dir, f"try-{try_number:03d}.json")

    def history(self, before_try: int) -> list[dict[str, Any]]:
        records = []
        for path in storage.listdir(self.dir):
            name = os.path.basename(path)
            if not (name.startswith("try-") and name.endswith(".json")):
                continue
            try:
                record = storage.read_json(path)
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and int(record.get("try", 0)) < before_try:
                records.append(record)
        return sorted(records, key=lambda r: int(r.get("try", 0)))

    def mark(self, try_number: int, status: str, **fields: Any) -> None:
        storage.makedirs(self.dir)
        storage.write_json(self._path(try_number), {
            "try": try_number, "status": status, "at": time.time(), "pid": os.getpid(),
            "host": socket.gethostname(), **fields,
        })
