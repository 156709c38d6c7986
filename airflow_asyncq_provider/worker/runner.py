"""What one worker slot does with one message: check, admit, claim, fork, watch, report.

Runs on a Celery pool thread. A thread costs no memory worth counting; the workload itself runs in a
process forked from the warm fork server.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from airflow_asyncq_provider import metrics
from airflow_asyncq_provider.broker.messages import check_meta, check_payload, token_expiry, workload_key
from airflow_asyncq_provider.errors import MalformedMessage, StateError, StateUnavailable
from airflow_asyncq_provider.memory.admission import Admission
from airflow_asyncq_provider.redaction import mask_secrets
from airflow_asyncq_provider.settings import AsyncQSettings
from airflow_asyncq_provider.sizes import MIB, format_size
from airflow_asyncq_provider.state import dlq, events, fleet_events, records
from airflow_asyncq_provider.state.keys import Keys
from airflow_asyncq_provider.worker.forkclient import ForkClient, InvalidWorkload
from airflow_asyncq_provider.worker.forkserver import EXIT_DUPLICATE, describe_exit
from airflow_asyncq_provider.worker.running import Running, RunningTasks

log = logging.getLogger(__name__)

#: ``requeue(task_id, payload, meta, queue, priority, key)``: hand a message back to the broker.
Requeue = Callable[[str, str, Any, str, "int | None", "dict[str, Any] | None"], None]


@dataclasses.dataclass
class Delivery:
    """One message between its acknowledgement and its claim, kept across retries: a retry neither
    counts the delivery twice nor takes its own claim, whose reply Redis lost, for another worker's."""

    task_id: str
    payload: str
    meta: Any
    queue: str | None
    priority: int | None
    key: dict[str, Any] | None
    request: int
    deliveries: int | None = None  # None: not counted (yet, or again after a hand-back undid it)
    owner: str | None = None
    reserved: bool = False  # this slot, and no other of this process, may claim the task id
    count_attempts: int = 0  # counts sent without a reply: each may have counted this delivery too


class WorkloadRunner(RunningTasks):
    """``requeue`` hands a message back to the broker (admission deferred it); ``peak_of`` tells the
    memory peak the watchdog saw for a finished task."""

    def __init__(self, settings: AsyncQSettings, hostname: str, forks: ForkClient,
                 client: redis.Redis, admission: Admission, requeue: Requeue | None = None,
                 log_folder: str | None = None, peak_of: Callable[[str], int] | None = None) -> None:
        self.settings = settings
        self.hostname = hostname
        self.keys = Keys(settings.key_prefix)
        self.forks = forks
        self.redis = client
        self.admission = admission
        self._requeue = requeue
        self.log_folder = log_folder
        self._peak_of = peak_of or (lambda _task_id: 0)
        self.running: dict[str, Running] = {}
        self._lock = threading.Lock()
        #: Task ids a slot of this process is claiming or has claimed; at most one slot holds each.
        self._claiming: set[str] = set()
        self.last_claim_at = 0.0
        self.consumer_tick_at = 0.0
        self.draining = False
        #: The maintenance record while this worker is in maintenance (refreshed every heartbeat).
        self.maintenance: dict[str, str] | None = None
        #: Why the worker fenced itself, while it cannot renew its leases (worker/fencing.py).
        self.fenced: str | None = None

    # ------------------------------------------------------------------ events
    def _emit(self, task_id: str, kind: str, **fields: Any) -> None:
        """Write an event; while Redis fails (restarting, failing over), keep trying for a bounded time."""
        deadline = time.monotonic() + self.settings.event_retry_timeout
        delay = 0.2
        while True:
            try:
                self._write_event(task_id, kind, **fields)
                return
            except StateError as exc:
                if time.monotonic() > deadline:
                    log.error("Giving up on event %s for %s after %.0f s: %s", kind, task_id,
                              self.settings.event_retry_timeout, exc)
                    return
                log.warning("Redis failed writing %s event for %s (%s); retrying", kind, task_id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _write_event(self, task_id: str, kind: str, **fields: Any) -> None:
        """One attempt; raises ``StateError``."""
        events.emit(self.redis, self.keys, task_id, kind, maxlen=self.settings.event_stream_maxlen,
                    ttl=self.settings.state_ttl, hostname=self.hostname, **fields)

    def dead_letter(self, task_id: str, error: str, payload: Any, queue: str | None = None,
                    meta: Any = None) -> None:
        dlq.push(self.redis, self.keys, task_id, error, payload, self.hostname, queue, meta)
        metrics.incr("asyncq.worker.dead_letters", {"worker": self.hostname, "queue": queue})
        log.error("Message %s rejected into the dead-letter list %s: %s",
                  task_id, self.keys.dead_letters, error)
        self._fleet_event(fleet_events.DEAD_LETTER, task=task_id, worker=self.hostname, reason=error)

    def _fleet_event(self, kind: str, **fields: Any) -> None:
        """For the fleet page; losing one of these must never fail a task."""
        try:
            fleet_events.record(self.redis, self.keys, kind, **fields)
        except Exception as exc:
            log.debug("Could not record fleet event %s: %s", kind, exc)

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
        delivery = Delivery(task_id, payload, meta, queue, priority, key, request)
        dropped = self._until_claimed(delivery, data["token"])
        if dropped is not None:
            return dropped
        try:
            return self._run_claimed(task_id, data, key, payload, request, limit, queue)
        finally:
            self._release(delivery)

    # ------------------------------------------------------------------ from acknowledgement to claim
    def _until_claimed(self, delivery: Delivery, token: str) -> str | None:
        """Check, admit and claim; None when claimed (memory admitted), else what became of the message.

        The message was acknowledged when this slot took it, so until the claim only this slot knows
        it. A Redis error here is retried for ``[asyncq] event_retry_timeout``, then the message is
        handed back to the broker: it is never dropped (docs/OPERATIONS.md, "Between acknowledgement
        and claim")."""
        deadline = time.monotonic() + self.settings.event_retry_timeout
        delay = 0.2
        while True:
            try:
                outcome = self._before_claim(delivery, token)
            except StateError as exc:
                self.admission.release(delivery.task_id)  # the reservation stays: a claim may be ours
                if self.draining or time.monotonic() + delay > deadline:
                    outcome = self._give_back(delivery, exc)
                else:
                    log.warning("Redis failed before workload %s was claimed (%s); retrying in %.1f s",
                                delivery.task_id, exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
            if outcome is not None:
                self._release(delivery)
            return outcome

    def _release(self, d: Delivery) -> None:
        self.admission.release(d.task_id)
        if d.reserved:
            with self._lock:
                self._claiming.discard(d.task_id)
            d.reserved = False

    def _before_claim(self, d: Delivery, token: str) -> str | None:
        """One attempt at every step up to the claim; raises ``StateError`` and is then retried whole."""
        if d.deliveries is None:
            d.count_attempts += 1
            counted, d.owner = records.count_delivery(self.redis, self.keys, d.task_id)
            # Judge by the lower bound, so that lost replies alone never dead-letter a message.
            d.deliveries, d.count_attempts = max(1, counted - (d.count_attempts - 1)), 0
        if d.deliveries > self.settings.max_deliveries and not d.owner:
            reason = f"delivered {d.deliveries} times without starting ([asyncq] max_deliveries)"
            self.dead_letter(d.task_id, reason, d.payload, d.queue, d.meta)
            self._emit(d.task_id, events.FAILED, key=d.key, reason=reason)
            return events.FAILED
        expiry = token_expiry(token)
        if expiry is not None and expiry < time.time() + 5:
            # Starting would fail at the Execution API with a bare 403. Hand it back to the executor,
            # which owns the signing key and republishes the same workload with a fresh token.
            log.warning("Workload %s waited past its token's validity; asking the executor for a new one",
                        d.task_id)
            self._write_event(d.task_id, events.TOKEN_EXPIRED, key=d.key, reason="token expired while queued")
            return events.TOKEN_EXPIRED
        if self.maintenance is not None or self.fenced is not None or self.draining:
            # Fetched just before maintenance was switched on (or the worker fenced itself, or began
            # to drain): another worker takes it.
            log.info("Workload %s arrived while this worker is in maintenance, fenced or draining; "
                     "handing it back", d.task_id)
            self._hand_back(d)
            return "deferred"
        if not self._admit(d):
            return "deferred"
        return self._claim(d)

    def _admit(self, d: Delivery) -> bool:
        if self.admission.try_acquire(d.task_id, d.request):
            return True
        where = "this worker's whole budget" if not self.admission.fits_at_all(d.request) else "the free budget"
        log.info("Workload %s requests %s, more than %s (%s of %s free); handing it back to the queue",
                 d.task_id, format_size(d.request), where, format_size(self.admission.free),
                 format_size(self.admission.budget))
        self._hand_back(d)
        metrics.incr("asyncq.worker.admissions_deferred", {"worker": self.hostname, "queue": d.queue})
        time.sleep(0.2)  # let a worker with room take it before this slot asks again
        return False

    def _hand_back(self, d: Delivery) -> None:
        if self._requeue is None or d.queue is None:
            raise RuntimeError("no way to hand a message back to the broker")
        if d.deliveries is not None:  # a hand-back is not a delivery
            records.count_delivery(self.redis, self.keys, d.task_id, by=-1)
            d.deliveries = None
        self._send_back(d)

    def _send_back(self, d: Delivery) -> None:
        """Publish the message again; a broker error is raised as ``StateUnavailable``, to be retried."""
        assert self._requeue is not None and d.queue is not None
        try:
            self._requeue(d.task_id, d.payload, d.meta, d.queue, d.priority, d.key)
        except Exception as exc:
            raise StateUnavailable(f"handing {d.task_id} back to queue {d.queue!r} failed: "
                                   f"{type(exc).__name__}: {mask_secrets(str(exc))}") from exc

    def _give_back(self, d: Delivery, exc: StateError) -> str:
        """Redis failed for ``event_retry_timeout`` (or the worker drains): let another delivery run it."""
        why = "the worker is draining" if self.draining else \
            f"Redis failed for {self.settings.event_retry_timeout:g} s ([asyncq] event_retry_timeout)"
        try:
            if self._requeue is None or d.queue is None:
                raise StateError("this worker has no way to hand a message back to the broker")
            self._send_back(d)
        except StateError as final:
            log.error(
                "Workload %s was acknowledged but neither claimed nor handed back (%s: %s; then %s). This "
                "worker no longer holds it. The scheduler recovers it: it republishes unclaimed workloads "
                "when it sees Redis restart, and otherwise [scheduler] task_queued_timeout requeues or "
                "fails the task instance, which stays queued until then.", d.task_id, why, exc, final)
            return "lost"
        log.warning("Workload %s handed back to queue %r before its claim: %s (%s)", d.task_id, d.queue,
                    why, exc)
        return "requeued"

    def refresh_maintenance(self) -> None:
        """Read this worker's maintenance record; the consumer fetches nothing while it is set."""
        from airflow_asyncq_provider.state import registry

        record = registry.maintenance(self.redis, self.keys, self.hostname)
        if (record is None) != (self.maintenance is None):
            log.warning("Maintenance %s for %s%s", "on" if record else "off", self.hostname,
                        f": {record.get('comment')}" if record and record.get("comment") else "")
        self.maintenance = record

    def _run_claimed(self, task_id: str, data: dict[str, Any], key: Any, payload: str, request: int,
                     limit: int | None, queue: str | None = None) -> str:
        self._emit(task_id, events.RECEIVED, key=key)
        try:
            forking = time.monotonic()
            child = self.forks.spawn(task_id, payload)
            metrics.timing("asyncq.worker.fork_time", time.monotonic() - forking, {"worker": self.hostname})
        except InvalidWorkload as exc:
            self.dead_letter(task_id, str(exc), payload)
            self._emit(task_id, events.FAILED, key=key, reason=str(exc))
            return events.FAILED
        except Exception as exc:
            log.exception("Could not fork workload %s", task_id)
            self._emit(task_id, events.FAILED, key=key, reason=f"worker could not fork the workload: {exc}")
            return events.FAILED
        entry = Running(child.pid, limit, data.get("log_path"), request, key, queue)
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
            child.release()
        ran_for = time.time() - entry.started_at
        outcome = self._report(task_id, key, status, entry)
        metrics.timing("asyncq.worker.task_duration", ran_for,
                       {"worker": self.hostname, "queue": queue, "outcome": outcome})
        return outcome

    def _claim(self, d: Delivery) -> str | None:
        """The first worker to claim runs it (None); a later delivery is dropped as a duplicate, and a
        workload the scheduler revoked before it started is dropped as revoked (records.claim).

        A claim can reach Redis while its reply is lost (a timeout, a cut connection). The retry then
        finds the id claimed under this worker's name, held by no other slot of this process
        (``_claiming``) and never reported received: that claim is this slot's, and dropping it as a
        duplicate would strand the workload. The same holds for a client that resends by itself (a
        redis-py ``Retry``; the clients of state/client.py have none)."""
        task_id = d.task_id
        if not d.reserved:
            with self._lock:
                held = task_id in self._claiming
                self._claiming.add(task_id)
            if held:
                log.warning("Workload %s is already held by another slot of this worker; dropping this "
                            "duplicate delivery", task_id)
                self._emit(task_id, events.DUPLICATE, reason=f"already claimed by {self.hostname}")
                return events.DUPLICATE
            d.reserved = True
        claim = records.claim(self.redis, self.keys, task_id, self.hostname, self.settings.state_ttl)
        self.last_claim_at = time.time()
        won = claim.won or (claim.owner == self.hostname and self._unreported(task_id))
        if won and not claim.won:
            log.info("Workload %s: this worker's earlier claim reached Redis, its reply did not; running it",
                     task_id)
        if claim.revoked:
            log.info("Workload %s was revoked before it started; dropping it", task_id)
            if won:
                self._emit(task_id, events.REVOKED, reason="revoked before start")
            return events.REVOKED
        if not won:
            log.warning("Workload %s was already claimed by %s; dropping this duplicate delivery",
                        task_id, claim.owner)
            self._emit(task_id, events.DUPLICATE, reason=f"already claimed by {claim.owner}")
            return events.DUPLICATE
        return None

    def _unreported(self, task_id: str) -> bool:
        """No slot wrote ``received`` for it (the first event after a claim): nobody went on to run it."""
        (record,) = records.read(self.redis, self.keys, [task_id])
        return record.get(records.STATE, records.PUBLISHED) == records.PUBLISHED

    def _report(self, task_id: str, key: Any, status: dict[str, Any], entry: Running) -> str:
        code, sig, result = status.get("code"), status.get("signal"), status.get("result")
        peak = self._peak_of(task_id)
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
        if self._revoked_or_unknown(task_id, entry):
            self._emit(task_id, events.REVOKED, key=key, reason=f"revoked while running ({reason})")
            return events.REVOKED
        self._emit(task_id, events.SUCCESS if ok else events.FAILED, key=key, exit_code=code,
                   signal=sig, reason=reason, peak_mib=round(peak / MIB, 1) if peak else None)
        log.info("Workload %s finished: %s", task_id, reason)
        return events.SUCCESS if ok else events.FAILED

    def _revoked_or_unknown(self, task_id: str, entry: Running) -> bool:
        """Whether the scheduler revoked the task; False when Redis cannot say (a fenced worker: the
        outcome event is then retried like any other, for ``event_retry_timeout``)."""
        try:
            return records.is_revoked(self.redis, self.keys, task_id)
        except StateError as exc:
            log.warning("Could not read whether %s was revoked (%s); reporting %s", task_id, exc,
                        "its stop" if entry.stop_reason else "its end")
            return False

    # ------------------------------------------------------------------ stopping workloads
    def over_limit(self, task_id: str, used: int, limit: int) -> None:
        reason = f"memory limit exceeded: used {used / MIB:.0f} MiB > limit {limit / MIB:.0f} MiB"
        with self._lock:
            entry = self.running.get(task_id)
        if entry is not None and not entry.stop_reason:
            self._fleet_event(fleet_events.MEMORY_KILL, task=task_id, worker=self.hostname, key=entry.key,
                              used=used, limit=limit)
            metrics.incr("asyncq.worker.memory_kills", {"worker": self.hostname, "queue": entry.queue})
        self.stop(task_id, reason, kill_now=True)

    # ------------------------------------------------------------------ heartbeat duties
    def _renew_lease(self, task_id: str) -> None:
        """The first lease. The workload is forked by now, so a Redis error must not leave it unwatched:
        the next heartbeat's ``renew_leases`` takes the lease instead."""
        try:
            records.take_lease(self.redis, self.keys, task_id, self.hostname, self._lease_ms)
        except StateError as exc:
            log.warning("Could not take the lease of %s (%s); the next heartbeat takes it", task_id, exc)

    @property
    def _lease_ms(self) -> int:
        return int(self.settings.worker_lost_timeout * 1000)

    def renew_leases(self) -> None:
        """Renew every running task's lease and re-assert its claim (a restarted Redis forgot both)."""
        with self._lock:
            task_ids = list(self.running)
        revoked = records.renew(self.redis, self.keys, task_ids, self.hostname, self._lease_ms,
                                self.settings.state_ttl)
        for task_id in task_ids:
            if task_id in revoked:
                self.stop(task_id, "revoked by the scheduler while running")
