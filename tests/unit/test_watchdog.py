"""The watchdog reads a tree's RSS every sample and its PSS only when that can change a decision or a
figure; the limit is enforced as if PSS were read every time."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_asyncq_provider.memory import watchdog as wd

MIB = 1024**2


class Proc:
    started: dict[int, float] = {}  # pid -> start time (wall clock); absent: long ago

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def create_time(self) -> float:
        return self.started.get(self.pid, 1.0)


class Trees:
    """Each root pid's processes, each process' (rss, pss); a clock the test moves."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.members: dict[int, list[int]] = {}
        self.sizes: dict[int, tuple[int, int]] = {}
        self.now = 1000.0
        monkeypatch.setattr(wd, "tree", lambda pid: [Proc(p) for p in self.members.get(pid, [pid])])
        monkeypatch.setattr(wd, "rss_of", lambda procs: sum(self.sizes[p.pid][0] for p in procs))
        monkeypatch.setattr(wd, "pss_of", lambda procs: sum(self.sizes[p.pid][1] for p in procs))
        monkeypatch.setattr(wd.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(wd.time, "time", lambda: self.now)
        monkeypatch.setattr(Proc, "started", {})


@pytest.fixture
def trees(monkeypatch: pytest.MonkeyPatch) -> Trees:
    return Trees(monkeypatch)


def _dog(running: list[tuple[str, int, int | None]]) -> tuple[wd.Watchdog, list[Any]]:
    stopped: list[Any] = []
    dog = wd.Watchdog(0.5, lambda: list(running), lambda *args: stopped.append(args))
    return dog, stopped


def test_a_steady_tree_is_read_by_pss_once(trees):
    trees.sizes[1] = (300 * MIB, 60 * MIB)
    dog, _ = _dog([("t", 1, None)])
    for _ in range(5):
        dog.sample_once()
    assert dog.pss_reads == 1
    assert dog.usage("t") == 60 * MIB and dog.pop_peak("t") == 60 * MIB


def test_pss_is_read_again_when_the_rss_moves_or_the_read_is_old(trees):
    trees.sizes[1] = (300 * MIB, 60 * MIB)
    dog, _ = _dog([("t", 1, None)])
    dog.sample_once()
    trees.sizes[1] = (310 * MIB, 70 * MIB)  # within 16 MiB / 10 %: the last read still stands
    dog.sample_once()
    assert (dog.pss_reads, dog.usage("t")) == (1, 60 * MIB)
    trees.sizes[1] = (400 * MIB, 160 * MIB)  # grew: the peak is read
    dog.sample_once()
    assert (dog.pss_reads, dog.usage("t")) == (2, 160 * MIB)
    trees.sizes[1] = (401 * MIB, 150 * MIB)
    trees.now += wd.PSS_EVERY
    dog.sample_once()
    assert (dog.pss_reads, dog.usage("t")) == (3, 150 * MIB)
    assert dog.pop_peak("t") == 160 * MIB


def test_over_the_limit_by_rss_reads_pss_every_sample_and_stops_only_over_it_by_pss(trees):
    trees.sizes[1] = (300 * MIB, 150 * MIB)  # RSS over a 200 MiB limit, PSS under it
    dog, stopped = _dog([("t", 1, 200 * MIB)])
    for _ in range(3):
        dog.sample_once()
    assert dog.pss_reads == 3 and stopped == []
    trees.sizes[1] = (301 * MIB, 201 * MIB)
    dog.sample_once()
    assert stopped == [("t", 201 * MIB, 200 * MIB)]


def test_under_the_limit_by_rss_is_under_it(trees):
    trees.sizes[1] = (190 * MIB, 100 * MIB)
    dog, stopped = _dog([("t", 1, 200 * MIB)])
    for _ in range(4):
        dog.sample_once()
    assert dog.pss_reads == 1 and stopped == []


def test_a_host_is_not_read_again_for_its_next_workload(trees):
    """Host 1 runs workload "a" in task process 2, then workload "b" in task process 3."""
    trees.sizes.update({1: (250 * MIB, 40 * MIB), 2: (260 * MIB, 30 * MIB), 3: (260 * MIB, 35 * MIB)})
    running = [("a", 1, None)]
    dog = wd.Watchdog(0.5, lambda: list(running), lambda *args: None)
    trees.members[1] = [1, 2]
    dog.sample_once()
    assert (dog.pss_reads, dog.usage("a")) == (2, 70 * MIB)
    running[:] = [("b", 1, None)]
    trees.members[1] = [1, 3]
    dog.sample_once()
    assert (dog.pss_reads, dog.usage("b")) == (3, 75 * MIB)  # only the new task process was read
    assert set(dog._reads) == {(1, 1.0), (3, 1.0)}  # process 2 is gone, and so is its read


def test_a_young_process_is_read_once_it_is_a_second_old_or_over_the_limit(trees):
    trees.members[1] = [1, 2]
    trees.sizes.update({1: (250 * MIB, 40 * MIB), 2: (260 * MIB, 30 * MIB)})
    Proc.started[2] = trees.now - 0.3  # the task process, forked 0.3 s ago
    dog, stopped = _dog([("t", 1, None)])
    dog.sample_once()
    assert (dog.pss_reads, dog.usage("t")) == (1, 40 * MIB)  # the host only
    trees.now += wd.PSS_MIN_AGE
    dog.sample_once()
    assert (dog.pss_reads, dog.usage("t")) == (2, 70 * MIB)

    trees.members[3] = [3, 4]
    trees.sizes.update({3: (250 * MIB, 40 * MIB), 4: (260 * MIB, 180 * MIB)})
    Proc.started[4] = trees.now - 0.1
    dog, stopped = _dog([("big", 3, 200 * MIB)])  # over its limit by RSS: every process, at once
    dog.sample_once()
    assert dog.pss_reads == 2 and stopped == [("big", 220 * MIB, 200 * MIB)]
