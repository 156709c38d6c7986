"""Where chunked operators read and write: local paths, or object storage through ``ObjectStoragePath``.

A path containing ``://`` (``s3://aws_default@bucket/key``, ``gs://…``, ``file:///…``) goes through
Airflow's ``ObjectStoragePath`` (fsspec); anything else is a local path. Inputs are opened for random
access, because every chunk task seeks to its own byte range. Outputs (Parquet parts, attempt markers)
must be on storage that every worker of the fleet can reach, because the chunk that wrote a part and the
task that reads it may run on different hosts: ``[asyncq] shared_storage`` names it, and the default work
directories live under it. Unset, they fall back to the system temp dir, which is only right for a
one-host fleet (a warning says so once per process).

The option is read when a task runs (``shared_root``), never at import: DAG files import this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from airflow_asyncq_provider.operators.errors import InputNotFoundError

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)
CHUNKS_DIR = "asyncq-chunks"
# One warning per process about the temp-dir fallback: a task process builds several paths.
_warned_one_host = False


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


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[IO[bytes]]:
    """A binary handle whose content appears at ``path`` only when the block ends without an error.

    Local paths go through a temp file in the same directory and ``os.replace``. An object store
    publishes an object when its upload completes, which is atomic already.
    """
    if is_remote(path):
        with open_output(path) as fh:
            yield fh
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, value: Any) -> None:
    """Small JSON files (attempt markers); atomic for local paths."""
    with atomic_output(path) as fh:
        fh.write(json.dumps(value, sort_keys=True).encode())


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        with _object_path(path).open("rb") as fh:
            return fh.read()
    with open(path, "rb") as fh:
        return fh.read()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def remove_tree(path: str) -> bool:
    """Delete a file or a directory with everything under it; False when nothing was there."""
    if is_remote(path):
        target = _object_path(path)
        if not target.exists():
            return False
        target.fs.rm(target.path, recursive=True)
        return True
    if os.path.isdir(path):
        shutil.rmtree(path)
        return True
    if os.path.exists(path):
        os.remove(path)
        return True
    return False


def safe_name(value: str) -> str:
    """A run id or task id as one path segment (run ids contain ``:`` and ``+``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in value)


def shared_root() -> str:
    """``[asyncq] shared_storage``, or the system temp dir (a one-host fleet only) when it is unset."""
    from airflow_asyncq_provider.settings import load_settings

    configured = load_settings().shared_storage
    if configured:
        return configured
    global _warned_one_host
    if not _warned_one_host:
        _warned_one_host = True
        log.warning("[asyncq] shared_storage is not set, so chunk outputs and example files go to this "
                    "host's temp dir %s. That is right for a one-host fleet only: a task on another "
                    "worker host will not find them. Set [asyncq] shared_storage "
                    "(AIRFLOW__ASYNCQ__SHARED_STORAGE) to a path every host mounts or to an object "
                    "storage URL such as s3://aws_default@bucket/prefix.", tempfile.gettempdir())
    return tempfile.gettempdir()


def shared_path(*parts: str) -> str:
    """``parts`` under the shared root, e.g. ``shared_path("asyncq-reports")``."""
    return join(shared_root(), *parts)


def run_work_dir(dag_id: str, run_id: str) -> str:
    """Everything the chunked steps of one DAG run write, unless they were given an ``output_dir``."""
    return shared_path(CHUNKS_DIR, safe_name(dag_id), safe_name(run_id))


def default_work_dir(dag_id: str, run_id: str, name: str) -> str:
    """Outputs of one run of one chunked step: ``<shared root>/asyncq-chunks/<dag>/<run>/<name>``."""
    return join(run_work_dir(dag_id, run_id), safe_name(name))


def work_dir_for(output_dir: str | None, context: Context, name: str) -> str:
    """``output_dir`` if given, else the default work dir of this run and step."""
    if output_dir:
        return output_dir
    return default_work_dir(context["dag"].dag_id, context["run_id"], name)
