"""What one worker slot does with one message: check, claim, fork, wait, report.

Runs on a Celery pool thread. A thread costs no memory worth counting; the workload itself runs in a
process forked from the warm fork server.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any

import redis

from airflow_asyncq_provider.errors import MalformedMessage
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.state import events
from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.worker.forkclient import ForkClient, InvalidWorkload
from airflow_asyncq_provider.worker.forkserver import EXIT_DUPLICATE, describe_exit

log = logging.getLogger(__name__)

WORKLOAD_TYPES = ("ExecuteTask", "ExecuteCallback")


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


class WorkloadRunner:
    def __init__(self, settings: AsyncQSettings, hostname: str, forks: ForkClient,
                 client: redis.Redis) -> None:
        self.settings = settings
        self.hostname = hostname
        self.keys = Keys(settings.key_prefix)
        self.forks = forks
        self.redis = client
        self.running: dict[str, int] = {}  # task id -> child pid
        self._lock = threading.Lock()
        self.last_claim_at = 0.0

    def _emit(self, task_id: str, kind: str, **fields: Any) -> None:
        events.emit(self.redis, self.keys, task_id, kind, maxlen=self.settings.event_stream_maxlen,
                    ttl=self.settings.state_ttl, hostname=self.hostname, **fields)

    def dead_letter(self, task_id: str, error: str, payload: Any) -> None:
        record = {"id": task_id, "error": error, "hostname": self.hostname, "at": time.time(),
                  "payload": payload if isinstance(payload, str) else repr(payload)[:100_000]}
        self.redis.lpush(self.keys.dead_letters, json.dumps(record))
        log.error("Message %s rejected into the dead-letter list %s: %s",
                  task_id, self.keys.dead_letters, error)

    def run(self, task_id: str, payload: Any) -> str:
        """Returns the outcome kind, for logs and tests."""
        try:
            data = check_payload(payload)
        except MalformedMessage as exc:
            self.dead_letter(task_id, str(exc), payload)
            return "rejected"
        key = workload_key(data)
        if not self._claim(task_id):
            return events.DUPLICATE
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
        with self._lock:
            self.running[task_id] = child.pid
        try:
            self._emit(task_id, events.STARTED, key=key, pid=child.pid)
            log.info("Workload %s %s started as pid %s", task_id, key, child.pid)
            status = child.wait()
        finally:
            with self._lock:
                self.running.pop(task_id, None)
        return self._report(task_id, key, status)

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

    def _report(self, task_id: str, key: dict[str, Any] | None, status: dict[str, Any]) -> str:
        code, sig, result = status.get("code"), status.get("signal"), status.get("result")
        if code == EXIT_DUPLICATE:
            # The Execution API answered 409: another process runs this try. Not a failure of it.
            self._emit(task_id, events.DUPLICATE, reason="task already running elsewhere (409)")
            return events.DUPLICATE
        ok, reason = describe_exit(code, sig, result)
        if self._was_revoked(task_id):
            self._emit(task_id, events.REVOKED, key=key, reason=f"revoked while running ({reason})")
            return events.REVOKED
        self._emit(task_id, events.SUCCESS if ok else events.FAILED, key=key, exit_code=code,
                   signal=sig, reason=reason)
        log.info("Workload %s finished: %s", task_id, reason)
        return events.SUCCESS if ok else events.FAILED

    def _was_revoked(self, task_id: str) -> bool:
        return bool(self.redis.hget(self.keys.task(task_id), "revoked"))

    def kill_revoked(self) -> None:
        """Called from the heartbeat thread: stop running workloads the executor revoked."""
        with self._lock:
            running = dict(self.running)
        if not running:
            return
        pipe = self.redis.pipeline(transaction=False)
        for task_id in running:
            pipe.hget(self.keys.task(task_id), "revoked")
        for (task_id, pid), revoked in zip(running.items(), pipe.execute(), strict=True):
            if revoked:
                log.warning("Workload %s was revoked while running; terminating pid %s", task_id, pid)
                _kill_group(pid, signal.SIGTERM)
                threading.Timer(10.0, _kill_group, (pid, signal.SIGKILL)).start()


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except OSError:
        pass
