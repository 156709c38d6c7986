"""From a window's records to CPU ticks per component and per role inside the worker tree.

Every process' own counter (utime+stime) goes to its role. Every process' reaped counter
(cutime+cstime) is compared with what the sampler saw of the children it reaped: the remainder is CPU
those children used after their last sample (or children that were never sampled at all). It goes to
the children's role when that is unambiguous (a supervisor only ever reaps its task process, so a
supervisor's remainder is task CPU) and to an explicit "unattributed reaped children" row otherwise
(the fork server reaps supervisors, whose own reaped counter holds their task: the two cannot be told
apart once the supervisor is gone).

Roles by parent chain, per executor:

========  ==============================  ==========================  ======================
executor  root                            its children                their descendants
========  ==============================  ==========================  ======================
AsyncQ    consumer (``asyncq worker``)    fork server; other          supervisors, then task
Celery    consumer (celery MainProcess)   prefork children (``Fork    task processes
                                          PoolWorker``), which run
                                          the supervisor; other
Local     scheduler main process          LocalExecutor workers       task processes
                                          (supervisors); other
========  ==============================  ==========================  ======================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.cpu.tracker import Key, Record, Window

CONSUMER, FORKSERVER, SUPERVISOR, TASK, OTHER, SCHEDULER_MAIN = (
    "consumer",
    "fork server",
    "supervisors",
    "task processes",
    "other worker processes",
    "scheduler main",
)


def unattributed(role: str) -> str:
    return f"unattributed reaped children ({role})"


def remainder_role(role: str) -> str:
    """Where CPU that a ``role`` process' reaped counter holds, beyond what was seen, belongs."""
    if role in (SUPERVISOR, TASK):
        return TASK
    if role in (FORKSERVER, CONSUMER, SCHEDULER_MAIN):
        return unattributed(role)
    return role  # other worker processes, and every non-worker component (dag-processor, ...)


def worker_roles(executor: str, window: Window, root: Key, forkserver_pid: int | None) -> dict[Key, str]:
    """Role of every process of the tree under ``root`` (the worker, or Local's scheduler)."""
    roles: dict[Key, str] = {}

    def child_role(parent_role: str, rec: Record) -> str:
        if parent_role in (SUPERVISOR, TASK):
            return TASK
        if parent_role == FORKSERVER:
            return SUPERVISOR
        if parent_role in (CONSUMER, SCHEDULER_MAIN):
            if executor == "asyncq" and rec.key[0] == forkserver_pid:
                return FORKSERVER
            # A prefork child is titled ForkPoolWorker-N until its first task retitles it.
            if executor == "celery" and ("ForkPoolWorker" in rec.cmd or "supervisor" in rec.cmd):
                return SUPERVISOR
            if executor == "local" and "LocalExecutor" in rec.cmd:
                return SUPERVISOR
        return OTHER

    todo = [(root, SCHEDULER_MAIN if executor == "local" else CONSUMER)]
    while todo:
        key, role = todo.pop()
        roles[key] = role
        todo.extend((kid, child_role(role, window.records[kid])) for kid in window.records[key].children)
    return roles


def split(
    window: Window, root: Key, role_of: Callable[[Key], str], use_exits: bool = True
) -> dict[str, dict[str, float]]:
    """Ticks per role in the tree under ``root``: ``seen`` (own counters read by the sampler),
    ``exit`` (what taskstats says a process used after its last read, when a listener ran) and
    ``inferred`` (remainders of reaped counters). Their sum is the tree's CPU in the window.

    A parent's reaped counter is reconciled tick by tick: the children found gone in tick T were
    reaped after the parent's last read in tick T-1 and before its last read in tick T, so the
    counter's growth between those reads is exactly their final CPU. What exceeds what was seen of
    them is their tail (CPU after their last read). When each of them had already reaped all of its
    own children (a supervisor whose task process was reaped before its last read), that tail can
    only be their own: it goes to their role. Otherwise it goes to ``remainder_role`` of the parent.
    """
    seen: dict[str, float] = {}
    exit_tail: dict[str, float] = {}
    inferred: dict[str, float] = {}

    def add(bucket: dict[str, float], role: str, ticks: float) -> None:
        if ticks:
            bucket[role] = bucket.get(role, 0) + ticks

    def complete(rec: Record) -> bool:
        """Every child it ever had (that was seen) is already in its recorded reaped counter."""
        return all(
            window.in_parent_counter(window.records[k]) and complete(window.records[k]) for k in rec.children
        )

    def final_own(rec: Record) -> float | None:
        return window.final_own(rec) if use_exits else None

    def exact(rec: Record) -> bool:
        """Its whole subtree's CPU is known from taskstats."""
        return final_own(rec) is not None and all(exact(window.records[k]) for k in rec.children)

    def subtree(rec: Record) -> float:
        """Adds the subtree's ticks to the buckets; returns their sum."""
        role = role_of(rec.key)
        total: float = rec.own_delta
        add(seen, role, rec.own_delta)
        final = final_own(rec)
        if final is not None:
            add(exit_tail, role, final - rec.own)
            total += final - rec.own
        reaped_by_tick: dict[int, list[tuple[Record, float]]] = {}
        for kid_key in rec.children:
            kid = window.records[kid_key]
            kid_total = subtree(kid)
            total += kid_total
            if window.in_parent_counter(kid):
                # The parent's counter holds the child's whole life, also what it used before the window.
                reaped_by_tick.setdefault(kid.gone_tick, []).append(
                    (kid, kid_total + kid.base_own + kid.base_reaped)
                )
        remainder = rec.reaped_delta - sum(t for kids in reaped_by_tick.values() for _k, t in kids)
        if final is not None and -2 <= remainder <= 0 and all(exact(window.records[k]) for k in rec.children):
            # /proc truncates cutime and cstime to whole ticks each; the children's exact finals are better.
            return total
        for tick, kids in reaped_by_tick.items():
            tail = (window.reaped_at(rec, tick) - window.reaped_at(rec, tick - 1)) - sum(t for _k, t in kids)
            kid_roles = {role_of(k.key) for k, _t in kids}
            if len(kid_roles) == 1 and all(complete(k) for k, _t in kids):
                add(inferred, kid_roles.pop(), tail)
            else:
                add(inferred, remainder_role(role), tail)
            total += tail
            remainder -= tail
        # Growth in ticks where no seen child went: children that lived and died between two reads.
        add(inferred, remainder_role(role), remainder)
        return total + remainder

    subtree(window.records[root])
    return {"seen": seen, "exit": exit_tail, "inferred": inferred}


def totals(parts: dict[str, dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for bucket in parts.values():
        for role, ticks in bucket.items():
            out[role] = out.get(role, 0) + ticks
    return out


def component_records(window: Window, component: str) -> list[Record]:
    return [r for r in window.records.values() if r.component == component]


def root_key(window: Window, component: str) -> Key:
    for rec in window.records.values():
        if rec.component == component and rec.depth == 0 and rec.parent is None:
            return rec.key
    raise KeyError(f"no root process for {component}")


def role_inventory(window: Window, roles: dict[Key, str]) -> dict[str, Any]:
    """How many processes of each role the window saw, and what their command lines looked like."""
    out: dict[str, Any] = {}
    for key, role in roles.items():
        rec = window.records[key]
        entry = out.setdefault(
            role,
            {
                "processes": 0,
                "born_inside": 0,
                "gone": 0,
                "seen_ticks": 0,
                "seen_sys_ticks": 0,
                "examples": [],
            },
        )
        entry["processes"] += 1
        entry["seen_ticks"] += rec.own_delta
        entry["seen_sys_ticks"] += rec.sys - rec.base_sys
        entry["born_inside"] += not rec.alive_at_begin
        entry["gone"] += rec.gone
        if len(entry["examples"]) < 2 and rec.cmd not in entry["examples"]:
            entry["examples"].append(rec.cmd[:100])
    return out


def dump(window: Window, roles: dict[Key, str]) -> list[dict[str, Any]]:
    """Every record of the tree, for checking the attribution by hand (``--dump-records``)."""
    out = []
    for key, role in roles.items():
        rec = window.records[key]
        out.append(
            {
                "pid": key[0],
                "role": role,
                "cmd": rec.cmd[:80],
                "parent": rec.parent[0] if rec.parent else None,
                "base": [rec.base_own, rec.base_reaped],
                "own": rec.own,
                "reaped": rec.reaped,
                "reads": rec.reads,
                "alive_at_begin": rec.alive_at_begin,
                "alive_at_end": rec.alive_at_end,
                "gone_tick": rec.gone_tick if rec.gone else None,
                "in_parent_counter": window.in_parent_counter(rec),
                "reaped_history": rec.reaped_history[-6:],
                "final_own": window.final_own(rec),
            }
        )
    return out
