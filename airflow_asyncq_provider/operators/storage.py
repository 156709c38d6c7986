"""Where chunked operators read and write: local paths, or object storage through ``ObjectStoragePath``.

A path containing ``://`` (``s3://bucket/key``, ``gs://…``, ``file:///…``) goes through Airflow's
``ObjectStoragePath`` (fsspec); anything else is a local path. Inputs are opened for random access,
because every chunk task seeks to its own byte range. Outputs (Parquet parts, attempt markers) must be
on storage that every worker of the fleet can reach: a local directory is only right for a one-host fleet.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Any

from airflow_asyncq_provider.operators.errors import InputNotFoundError


def is_remote(path: str) -> bool:
    return "://" in path


def _object_path(path: str) -> Any:
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(path)


def open_input(path: str) -> IO[bytes]:
    """A seekable binary handle on ``path``; a clear error if it is missing."""
    try:
        if is_remote(path):
            return _object_path(path).open("rb")
        return open(path, "rb")
    except FileNotFoundError as exc:
        raise InputNotFoundError(
            f"input {path!r} does not exist; check the path (after templating) and the upstream task "
            f"that should have written it"
        ) from exc
    except IsADirectoryError as exc:
        raise InputNotFoundError(f"input {path!r} is a directory; point the operator at one file") from exc


def input_size(path: str) -> int:
    try:
        if is_remote(path):
            return int(_object_path(path).stat().st_size)
        return os.path.getsize(path)
    except FileNotFoundError as exc:
        raise InputNotFoundError(
            f"input {path!r} does not exist; check the path (after templating) and the upstream task "
            f"that should have written it"
        ) from exc


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def makedirs(path: str) -> None:
    if is_remote(path):
        _object_path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return bool(_object_path(path).exists()) if is_remote(path) else os.path.exists(path)


def listdir(path: str) -> list[str]:
    """Full paths of the entries in ``path`` (empty when it does not exist), sorted."""
    if is_remote(path):
        base = _object_path(path)
        return sorted(str(p) for p in base.iterdir()) if base.exists() else []
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, name) for name in os.listdir(path))


def open_output(path: str) -> IO[bytes]:
    if is_remote(path):
        return _object_path(path).open("wb")
    return open(path, "wb")


def write_json(path: str, value: Any) -> None:
    """Small JSON files (attempt markers); atomic for local paths."""
    data = json.dumps(value, sort_keys=True).encode()
    if is_remote(path):
        with open_output(path) as fh:
            fh.write(data)
        return
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    if is_remote(path):
        with _object_path(path).open("rb") as fh:
            return json.loads(fh.read())
    with open(path, "rb") as fh:
        return json.loads(fh.read())


def safe_name(value: str) -> str:
    """A run id or task id as one path segment (run ids contain ``:`` and ``+``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in value)


def default_work_dir(dag_id: str, run_id: str, name: str) -> str:
    """Outputs of one run of one chunked step, under the system temp dir (a one-host fleet only)."""
    return os.path.join(tempfile.gettempdir(), "asyncq-chunks", safe_name(dag_id), safe_name(run_id),
                        safe_name(name))
