"""Sending native tasks from DAGs: checks that fail before anything is sent, then ``send_task``.

Used by ``QueueTaskOperator`` inside ``execute`` (on the worker that runs the Airflow task), never at
DAG parse time.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from typing import Any

from airflow_asyncq_provider.native.errors import (
    ArgumentNotSerializable,
    NativeTaskFailed,
    UnknownTaskError,
)


@dataclasses.dataclass(frozen=True)
class Signature:
    """One native task call: what ``QueueTaskOperator`` sends."""

    task_name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    countdown: float | None = None
    expires: float | None = None

    @classmethod
    def of(cls, spec: Any, **defaults: Any) -> Signature:
        if isinstance(spec, Signature):
            return spec
        if isinstance(spec, str):
            return cls(task_name=spec, **defaults)
        if isinstance(spec, dict):
            unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
            if unknown or "task_name" not in spec:
                raise ValueError(f"signature {spec!r}: needs 'task_name' and may have args, kwargs, queue, "
                                 f"priority, countdown, expires; unknown keys {sorted(unknown)}")
            merged = {**defaults, **{k: v for k, v in spec.items() if v is not None}}
            merged["args"] = tuple(merged.get("args") or ())
            merged["kwargs"] = dict(merged.get("kwargs") or {})
            return cls(**merged)
        raise ValueError(f"signature {spec!r} must be a task name, a dict or a Signature")


def check_arguments(sig: Signature) -> None:
    """Every argument must survive JSON; name the first one that does not."""
    named = [(f"args[{i}]", v) for i, v in enumerate(sig.args)] + [
        (f"kwargs[{k!r}]", v) for k, v in sig.kwargs.items()]
    for where, value in named:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ArgumentNotSerializable(
                f"native task {sig.task_name}: argument {where} ({type(value).__name__}) is not "
                f"JSON-serializable ({exc}); pass plain str/int/float/bool/list/dict values, e.g. "
                "an ISO date string instead of a datetime or a file path instead of a file object"
            ) from None
    if sig.priority is not None and not (isinstance(sig.priority, int) and 0 <= sig.priority <= 9):
        raise ValueError(f"native task {sig.task_name}: priority must be an integer 0..9 "
                         f"(0 is served first), got {sig.priority!r}")


def check_registered(client: Any, prefix: str, names: list[str]) -> None:
    from airflow_asyncq_provider.state import native
    from airflow_asyncq_provider.state.keys import Keys

    keys = Keys(prefix)
    for name in dict.fromkeys(names):
        record, known = native.lookup_task(client, keys, name)
        if record is not None:
            continue
        if not known:
            raise UnknownTaskError(
                f"native task {name!r}: no native lane has registered any task yet. Start a worker with "
                "`airflow asyncq worker --loop-concurrency N --sync-threads M` and list the module that "
                "defines it in [asyncq] task_modules, or pass check_task_name=False to send anyway")
        close = [k for k in known if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
        close = close or difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownTaskError(
            f"native task {name!r} is not registered by any native lane.{hint} Registered: "
            f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}. Add its module to "
            "[asyncq] task_modules, or pass check_task_name=False to send anyway")


def send(sig: Signature, task_id: str, store_result: bool) -> str:
    from airflow_asyncq_provider.native.app import fleet

    fleet.send_task(sig.task_name, args=list(sig.args), kwargs=sig.kwargs, queue=sig.queue,
                    priority=sig.priority, countdown=sig.countdown, expires=sig.expires, task_id=task_id,
                    ignore_result=not store_result)
    return task_id


_IDENT = re.compile(r"[^0-9A-Za-z_]")


def remote_error(event: dict[str, Any]) -> NativeTaskFailed:
    """An exception whose class is named after the remote one (``asyncq.remote.builtins.ValueError``)."""
    exc_type = _IDENT.sub("_", str(event.get("exc_type") or "RemoteError")) or "RemoteError"
    module = str(event.get("exc_module") or "unknown")
    cls = type(exc_type, (NativeTaskFailed,), {"__module__": f"asyncq.remote.{module}"})
    traceback = event.get("traceback") or "(no traceback recorded)"
    error = cls(f"native task {event.get('task_name')}[{event.get('task_id')}] raised "
                f"{module}.{event.get('exc_type')}: {event.get('exc_message')}\n"
                f"--- remote traceback ---\n{traceback.rstrip()}")
    error.remote_type = f"{module}.{event.get('exc_type')}"
    error.remote_traceback = traceback
    return error
