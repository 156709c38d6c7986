"""What one worker slot does with one message: check, admit, claim, fork, watch, report.

Runs on a Celery pool thread. A thread costs no memory worth counting; the workload itself runs in a
process forked from the warm fork server.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import redis

from airflow_asyncq_provider.errors import MalformedMessage
from airflow_asyncq_provider.memory.admission import Admission
from airflow_asyncq_provider.memory.sizes import format_size
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import events
from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.worker.forkclient import ForkClient, InvalidWorkload
from airflow_asyncq_provider.worker.forkserver import EXIT_DUPLICATE, describe_exit

log = logging.getLogger(__name__)

WORKLOAD_TYPES = ("ExecuteTask", "ExecuteCallback")
MIB = 1024**2


def check_payload(payload: Any) -> dict[str, Any]:
    """Cheap shape check in the worker process; full validation happens in the fork server."""
    if not isinstance(payload, str):
        raise MalformedMessage(f"payload is {type(payload).__name__}, expected a JSON string")
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise MalformedMessage(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("type") not in WORKLOAD_TYPES:
        raise MalformedMessage(f"payload is not an Airflow workload (type={_get(data, 'type')!r})")
    if not isinstance(data.get("token"), str) or not data["token"]:
        raise MalformedMessage("payload has no token")
    return data


def check_meta(meta: Any, default_request: int) -> tuple[int, int | None]:
    """(request, limit) in bytes from the executor's message metadata."""
    if meta is None:
        return default_request, None
    if not isinstance(meta, dict):
        raise MalformedMessage(f"message metadata is {type(meta).__name__}, expected an object")
    request, limit = meta.get("memory_request", default_request), meta.get("memory_limit")
    if not isinstance(request, int) or request <= 0 or (limit is not None and
                                                        (not isinstance(limit, int) or limit <= 0)):
        raise MalformedMessage(f"message metadata has an invalid memory request/limit: {meta!r}")
    return request, limit


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it (the api-server verifies)."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        return float(claims["exp"])
    except (IndexError, KeyError, TypeError, ValueError):
        return None


def _get(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else None


def workload_key(data: dict[str, Any]) -> dict[str, Any] | None:
    ti = data.get("ti")
    if isinstance(ti, dict):
        return {k: ti.get(k) for k in ("dag_id", "task_id", "run_id", "try_number", "map_index")}
    callback = data.get("callback")
    if isinstance(callback, dict):
        return {"callback_id": callback.get("id")}
    return None


class Running:
    """One forked workload as the worker tracks it."""

    def __init__(self, pid: int, limit: int | None, log_path: str | None) -> None:
        self.pid = pid
        self.limit = limit
        self.log_path = log_path
        self.stop_reason: str | None = None  # set when the worker itself stops the workload


class WorkloadRunner:
    def __init__(self, settings: AsyncQSettings, hostname: str, forks: ForkClient,
                 client: redis.Redis, admission: Admission,
                 requeue: Callable[[str, str, dict[str, Any] | None, str, int | None], None] | None = None,
                 log_folder: str | None = None) -> None:
        self.settings = settings
        self.hostname = hostname
        self.keys = Keys(settings.key_prefix)
        self.forks = forks
        self.redis = client
        self.admission = admission
        self.requeue = requeue
        self.log_folder = log_folder
        self.running: dict[str, Running] = {}
        self._lock = threading.Lock()
        self.last_claim_at = 0.0
        self.consumer_tick_at = 0.0
        self.draining = False
        self.peak_of: Callable[[str], int] = lambda _task_id: 0

    # ------------------------------------------------------------------ events
    def _emit(self, task_id: str, kind: str, **fields: Any) -> None:
        """Write an event; while Redis is unreachable (restarting), keep trying for a bounded time."""
        deadline = time.monotonic() + self.settings.event_retry_timeout
        delay = 0.2
        while True:
            try:
                events.emit(self.redis, self.keys, task_id, kind, maxlen=self.settings.event_stream_maxlen,
                            ttl=self.settings.state_ttl, hostname=self.hostname, **fields)
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    log.error("Giving up on event %s for %s after %.0f s: %s", kind, task_id,
                              self.settings.event_retry_timeout, exc)
                    return
                log.warning("Redis unreachable writing %s event for %s (%s); retrying", kind, task_id,
                            type(exc).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def dead_letter(self, task_id: str, error: str, payload: Any, queue: str | None = None,
                    meta: Any = None) -> None:
        record = {"id": task_id, "error": error, "hostname": self.hostname, "at": time.time(),
                  "queue": queue, "meta": meta,
                  "payload": payload if isinstance(payload, str) else repr(payload)[:100_000]}
        self.redis.lpush(self.keys.dead_letters, json.dumps(record))
        log.error("Message %s rejected into the dead-letter list %s: %s",
                  task_id, self.keys.dead_letters, error)

    # ------------------------------------------------------------------ one message
    def run(self, task_id: str, payload: Any, meta: Any = None, queue: str | None = None,
            priority: int | None = None) -> str:
        """Returns the outcome kind, for logs and tests."""
        try:
            data = check_payload(payload)
            request, limit = check_meta(meta, self.settings.default_memory_request)
        except MalformedMessage as exc:
            self.dead_letter(task_id, str(exc), payload, queue, meta)
            return "rejected"
        key = workload_key(data)
        deliveries = self.redis.hincrby(self.keys.task(task_id), "deliveries", 1)
        if deliveries > self.settings.max_deliveries and not self.redis.hget(self.keys.task(task_id),
                                                                              "claimed_by"):
            reason = f"delivered {deliveries} times without starting ([asyncq] max_deliveries)"
            self.dead_letter(task_id, reason, payload, queue, meta)
            self._emit(task_id, events.FAILED, key=key, reason=reason)
            return events.FAILED
        expiry = token_expiry(data["token"])
        if expiry is not None and expiry < time.time() + 5:
            # Starting would fail at the Execution API with a bare 403. Hand it back to the executor,
            # which owns the signing key and republishes the same workload with a fresh token.
            log.warning("Workload %s waited past its token's validity; asking the executor for a new one",
                        task_id)
            self._emit(task_id, events.TOKEN_EXPIRED, key=key, reason="token expired while queued")
            return events.TOKEN_EXPIRED
        if not self._admit(task_id, request, payload, meta, queue, priority):
            return "deferred"
        try:
            if not self._claim(task_id):
                return events.DUPLICATE
            return self._run_claimed(task_id, data, key, payload, limit)
        finally:
            self.admission.release(task_id)

    def _admit(self, task_id: str, request: int, payload: str, meta: Any, queue: str | None,
               priority: int | None) -> bool:
        if self.admission.try_acquire(task_id, request):
            return True
        where = "this worker's whole budget" if not self.admission.fits_at_all(request) else "the free budget"
        log.info("Workload %s requests %s, more than %s (%s of %s free); handing it back to the queue",
                 task_id, format_size(request), where, format_size(self.admission.free),
                 format_size(self.admission.budget))
        if self.requeue is None or queue is None:
            raise RuntimeError("no way to hand a message back to the broker")
        self.redis.hincrby(self.keys.task(task_id), "deliveries", -1)  # a hand-back is not a delivery
        self.requeue(task_id, payload, meta, queue, priority)
        time.sleep(0.2)  # let a worker with room take it before this slot asks again
        return False

    def _run_claimed(self, task_id: str, data: dict[str, Any], key: Any, payload: str,
                     limit: int | None) -> str:
        self._emit(task_id, events.RECEIVED, key=key)
        try:
            child = self.forks.spawn(task_id, payload)
        except InvalidWorkload as exc:
            self.dead_letter(task_id, str(exc), payload)
            self._emit(task_id, events.FAILED, key=key, reason=str(exc))
            return events.FAILED
        except Exception as exc:
            log.exception("Could not fork workload %s", task_id)
            self._emit(task_id, events.FAILED, key=key, reason=f"worker could not fork the workload: {exc}")
            return events.FAILED
        entry = Running(child.pid, limit, data.get("log_path"))
        with self._lock:
            self.running[task_id] = entry
        try:
            self._renew_lease(task_id)
            self._emit(task_id, events.STARTED, key=key, pid=child.pid)
            log.info("Workload %s %s started as pid %s", task_id, key, child.pid)
            status = child.wait()
        finally:
            with self._lock:
                self.running.pop(task_id, None)
        return self._report(task_id, key, status, entry)

    def _claim(self, task_id: str) -> bool:
        """Atomic: the first worker to set ``claimed_by`` runs it; any later delivery is a duplicate."""
        record_key = self.keys.task(task_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(record_key, "claimed_by", self.hostname)
        pipe.hget(record_key, "claimed_by")
        pipe.hget(record_key, "revoked")
        pipe.expire(record_key, self.settings.state_ttl)
        won, owner, revoked, _ = pipe.execute()
        self.last_claim_at = time.time()
        if revoked:
            log.info("Workload %s was revoked before it started; dropping it", task_id)
            if won:
                self._emit(task_id, events.REVOKED, reason="revoked before start")
            return False
        if not won:
            log.warning("Workload %s was already claimed by %s; dropping this duplicate delivery",
                        task_id, owner)
            self._emit(task_id, events.DUPLICATE, reason=f"already claimed by {owner}")
            return False
        return True

    def _report(self, task_id: str, key: Any, status: dict[str, Any], entry: Running) -> str:
        code, sig, result = status.get("code"), status.get("signal"), status.get("result")
        peak = self.peak_of(task_id)
        if code == EXIT_DUPLICATE:
            # The Execution API answered 409: another process runs this try. Not a failure of it.
            self._emit(task_id, events.DUPLICATE, reason="task already running elsewhere (409)")
            return events.DUPLICATE
        ok, reason = describe_exit(code, sig, result)
        if result and result.get("traceback"):
            log.error("Workload %s: the supervisor crashed:\n%s", task_id, result["traceback"])
        if entry.stop_reason:
            ok, reason = False, f"{entry.stop_reason} ({reason})"
        if peak:
            self._append_task_log(entry.log_path, f"asyncq: peak memory of the task's process tree: "
                                                  f"{peak / MIB:.0f} MiB", "info")
        if self._was_revoked(task_id):
            self._emit(task_id, events.REVOKED, key=key, reason=f"revoked while running ({reason})")
            return events.REVOKED
        self._emit(task_id, events.SUCCESS if ok else events.FAILED, key=key, exit_code=code,
                   signal=sig, reason=reason, peak_mib=round(peak / MIB, 1) if peak else None)
        log.info("Workload %s finished: %s", task_id, reason)
        return events.SUCCESS if ok else events.FAILED

    def _was_revoked(self, task_id: str) -> bool:
        return bool(self.redis.hget(self.keys.task(task_id), "revoked"))

    # ------------------------------------------------------------------ stopping workloads
    def stop(self, task_id: str, reason: str, kill_now: bool = False) -> None:
        """Stop one workload's task process(es) and let its supervisor report and flush the log.

        The supervisor is left alive on purpose: it sees its task die, marks the try failed or
        up_for_retry through the Execution API and flushes the log. The task gets SIGTERM first
        (``kill_now``: SIGKILL at once, as for a memory overrun), SIGKILL after the grace period, and
        the whole group gets SIGKILL after twice the grace period if the supervisor hangs.
        """
        with self._lock:
            entry = self.running.get(task_id)
        if entry is None or (entry.stop_reason and not kill_now):
            return
        entry.stop_reason = entry.stop_reason or reason
        log.warning("Stopping workload %s (pid %s): %s", task_id, entry.pid, reason)
        self._append_task_log(entry.log_path, f"asyncq: {reason}", "error")
        _signal_task_processes(entry.pid, signal.SIGKILL if kill_now else signal.SIGTERM)
        grace = self.settings.kill_grace_period
        for delay, action in ((grace, _signal_task_processes), (2 * grace, _kill_group)):
            timer = threading.Timer(delay, self._if_still_running, (task_id, entry, action))
            timer.daemon = True
            timer.start()

    def _if_still_running(self, task_id: str, entry: Running, action: Callable[[int, int], None]) -> None:
        with self._lock:
            current = self.running.get(task_id)
        if current is entry:
            action(entry.pid, signal.SIGKILL)

    def stop_all(self, reason: str, kill_now: bool = False) -> None:
        with self._lock:
            task_ids = list(self.running)
        for task_id in task_ids:
            self.stop(task_id, reason, kill_now=kill_now)

    def over_limit(self, task_id: str, used: int, limit: int) -> None:
        self.stop(task_id, f"memory limit exceeded: used {used / MIB:.0f} MiB > limit {limit / MIB:.0f} MiB",
                  kill_now=True)

    def watch_list(self) -> list[tuple[str, int, int | None]]:
        with self._lock:
            return [(task_id, e.pid, e.limit) for task_id, e in self.running.items()]

    def _append_task_log(self, log_path: str | None, message: str, level: str) -> None:
        """Put the worker's verdict where the user looks: the task's own log in the Airflow UI."""
        if not log_path or not self.log_folder:
            return
        path = Path(self.log_folder, log_path)
        line = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "event": message,
                "level": level, "logger": "airflow_asyncq_provider.worker"}
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(line) + "\n")
        except OSError as exc:
            log.warning("Could not append to task log %s: %s", path, exc)

    # ------------------------------------------------------------------ heartbeat duties
    def _renew_lease(self, task_id: str) -> None:
        self.redis.set(self.keys.lease(task_id), self.hostname,
                       px=int(self.settings.worker_lost_timeout * 1000))

    def renew_leases(self) -> None:
        """Renew every running task's lease and re-assert its claim (a restarted Redis forgot both)."""
        with self._lock:
            task_ids = list(self.running)
        if not task_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.set(self.keys.lease(task_id), self.hostname, px=int(self.settings.worker_lost_timeout * 1000))
            pipe.hsetnx(self.keys.task(task_id), "claimed_by", self.hostname)
            pipe.hsetnx(self.keys.task(task_id), "state", events.STARTED)
            pipe.hsetnx(self.keys.task(task_id), "hostname", self.hostname)
            pipe.expire(self.keys.task(task_id), self.settings.state_ttl)
            pipe.hget(self.keys.task(task_id), "revoked")
        replies = pipe.execute()
        for task_id, revoked in zip(task_ids, replies[5::6], strict=True):
            if revoked:
                self.stop(task_id, "revoked by the scheduler while running")


def _signal_task_processes(supervisor_pid: int, sig: int) -> None:
    """Signal every descendant of the supervisor (the task process and anything it started)."""
    try:
        children = psutil.Process(supervisor_pid).children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.send_signal(sig)
        except psutil.Error:
            pass


def _kill_group(pid: int, sig: int) -> None:
    """The supervisor's group and every descendant (the task process runs in a group of its own)."""
    _signal_task_processes(pid, sig)
    try:
        os.killpg(pid, sig)
    except OSError:
        pass
