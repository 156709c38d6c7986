"""The process-tree walk finds the same processes as psutil's full /proc scan, children forked from a
non-main thread included."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import psutil
import pytest

from airflow_asyncq_provider.memory import processes

# A root that forks one child from its main thread and one from a second thread; the first child forks
# a grandchild. Each prints its pid; all sleep until killed.
TREE = textwrap.dedent(r"""
    import os, sys, threading, time
    def fork_sleeper(then=None):
        pid = os.fork()
        if pid == 0:
            if then:
                then()
            os.write(1, f"{os.getpid()}\n".encode())
            time.sleep(120)
            os._exit(0)
    fork_sleeper(then=fork_sleeper)
    t = threading.Thread(target=fork_sleeper)
    t.start(); t.join()
    # keep a second thread alive so the root has two task entries
    threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
    os.write(1, f"{os.getpid()}\n".encode())
    time.sleep(120)
""")


@pytest.fixture
def tree_root():
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    pids = {int(proc.stdout.readline()) for _ in range(4)}  # root, child, grandchild, thread's child
    assert proc.pid in pids and len(pids) == 4
    yield proc.pid, pids - {proc.pid}
    processes.signal_tree(proc.pid, 9)
    proc.wait(10)


def test_the_walk_finds_every_descendant_like_psutil(tree_root):
    root, descendants = tree_root
    assert processes._children_files(), "this kernel has /proc/<pid>/task/<tid>/children"
    walked = {p.pid for p in processes.tree(root, include_root=False)}
    scanned = {p.pid for p in psutil.Process(root).children(recursive=True)}
    assert walked == scanned == descendants
    assert {p.pid for p in processes.tree(root)} == descendants | {root}


def test_the_psutil_scan_is_the_fallback(tree_root, monkeypatch):
    root, descendants = tree_root
    monkeypatch.setattr(processes, "_children_files", lambda: False)
    assert {p.pid for p in processes.tree(root, include_root=False)} == descendants


def test_a_tree_that_is_gone_is_empty_and_measures_zero():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    assert processes.tree(proc.pid) == []
    assert processes.child_pids(proc.pid) == []
    assert processes.pss_of(processes.tree(proc.pid)) == 0


def test_tree_pss_counts_the_whole_tree(tree_root):
    root, descendants = tree_root
    total = processes.pss_of(processes.tree(root))
    own = psutil.Process(root).memory_full_info().pss
    assert total > own > 0

