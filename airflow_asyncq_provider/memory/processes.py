"""Process trees: a workload's supervisor, its task process and whatever they started.

One walk for the watchdog that measures a tree, the runner that stops one, and the fork server that
kills its children when the worker is gone. A process that exits mid-walk is skipped, never an error.

The walk follows ``/proc/<pid>/task/<tid>/children`` down from the root: a few small reads per tree.
psutil's ``children(recursive=True)`` reads the stat file of *every* process on the machine to find the
parents, and the watchdog walks every running tree twice a second: at 8 slots and ~200 processes that
scan was most of the consumer's CPU per task (docs/BENCHMARKS.md, "CPU per task"). Kernels built
without CONFIG_PROC_CHILDREN have no such file; there the psutil scan is used.
https://docs.kernel.org/filesystems/proc.html (``/proc/<pid>/task/<tid>/children``)
"""

from __future__ import annotations

import functools
import os

import psutil


@functools.cache
def _children_files() -> bool:
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``, from every one of its threads (a child belongs to the thread that
    forked it); [] for a process that is gone."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(child) for child in f.read().split())
        except OSError:  # the thread ended between listdir and open
            continue
    return found


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        children = child_pids(todo.pop())
        out.extend(children)
        todo.extend(children)
    return out


def tree(pid: int, include_root: bool = True) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        if not _children_files():
            children = root.children(recursive=True)
        else:
            children = []
            for child in _descendants(pid):
                try:
                    children.append(psutil.Process(child))
                except psutil.Error:  # exited since its parent listed it
                    continue
    except psutil.Error:
        return []
    return [root, *children] if include_root else children


def signal_tree(pid: int, sig: int, include_root: bool = True) -> None:
    for proc in tree(pid, include_root):
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def pss_of(procs: list[psutil.Process]) -> int:
    """Bytes of PSS of ``procs`` (RSS where the kernel reports no PSS). A PSS read walks every mapping
    (``smaps_rollup``): about 6 ms of kernel time for a fork of the preloaded fork server on this
    machine (docs/BENCHMARKS.md). Use ``rss_of`` where it can decide."""
    total = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            continue
    return total


def rss_of(procs: list[psutil.Process]) -> int:
    """RSS from ``statm``: 0.05 ms a process. Never below the PSS of the same processes, since PSS
    counts a shared page at a fraction of what RSS counts it."""
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total
