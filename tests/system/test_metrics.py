"""Metrics reach a real StatsD listener from the real scheduler and workers, with values that match the
run that caused them (docs/METRICS.md).

The session's stack sends plain StatsD (``statsd_on``; no DogStatsD, no InfluxDB tags), so tags are
dropped on the wire and this test reads the per-tag names that ``legacy_names_on`` (Airflow's default)
adds: ``airflow.asyncq.worker.task_duration.<worker>.<queue>.<outcome>``.
"""

from __future__ import annotations

import re

import pytest

from devtools.stack import Stack
from tests.system.conftest import StatsdListener, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

DAG = "asyncq_test_sleepers"
# Twelve sleepers of 6 s on w-default's four slots run in three waves, so the default queue holds a
# backlog for more than one queue-gauge period (10 s) and the slots are all busy for several heartbeats.
N, SECONDS, SLOTS = 12, 6, 4
TASKS = N + 2  # items, the N mapped sleepers, gather
W = r"w-default_[\w-]+"  # w-default@<host>, as a name segment ('@' becomes '_', '.' becomes '__')
MIB = 1024**2
LINE = re.compile(r"(?P<name>[^:|]+):(?P<value>-?[\d.]+)\|(?P<type>c|g|ms)(\|.*)?")


def _parse(lines: list[str]) -> list[tuple[str, float]]:
    out = []
    for line in lines:
        match = LINE.fullmatch(line)
        assert match, f"not a StatsD line: {line!r}"
        out.append((match["name"], float(match["value"])))
    return out


def _values(parsed: list[tuple[str, float]], pattern: str) -> list[float]:
    return [value for name, value in parsed if re.fullmatch(pattern, name)]


def _per_beat(parsed: list[tuple[str, float]], first: str, second: str) -> list[tuple[float, float]]:
    """Pairs of two gauges one heartbeat sends in this order (a beat cut by the window start is skipped)."""
    pairs, pending = [], None
    for name, value in parsed:
        if re.fullmatch(first, name):
            pending = value
        elif re.fullmatch(second, name) and pending is not None:
            pairs.append((pending, value))
            pending = None
    return pairs


def test_metrics_match_what_the_run_did(stack: Stack, statsd: StatsdListener) -> None:
    stack.wait_dag(DAG)
    start = len(statsd.received())
    run_id = stack.trigger(DAG, conf={"n": N, "s": SECONDS})
    assert stack.wait_run(DAG, run_id, timeout=300) == "success"
    end = len(statsd.received())

    success = rf"airflow\.asyncq\.worker\.task_duration\.{W}\.default\.success"
    # A task's supervisor reports success before its process exits, so the last timing may trail the run.
    wait_for(lambda: len(_values(_parse(statsd.received()[start:]), success)) >= TASKS, 30,
             "a task_duration timing for every task", stack)
    # One queue sample after the run: the default queue is consumed by a live worker, so it is reported.
    wait_for(lambda: _values(_parse(statsd.received()[end:]), r"airflow\.asyncq\.queue\.depth\.default"), 30,
             "a queue depth sample after the run", stack)
    seen = _parse(statsd.received()[start:])

    # the worker: one success timing per task, the sleepers' at least their sleep; nothing else ended
    durations = _values(seen, success)
    assert len(durations) == TASKS
    assert sum(d >= SECONDS * 1000 for d in durations) >= N, durations
    # the tag-less name carries the same timings (only this run's tasks ran in the window)
    assert sorted(_values(seen, r"airflow\.asyncq\.worker\.task_duration")) == sorted(durations)
    assert _values(seen, rf"airflow\.asyncq\.worker\.task_duration\.{W}\.\w+\.(failed|revoked|duplicate)") == []
    assert len(_values(seen, rf"airflow\.asyncq\.worker\.fork_time\.{W}")) == TASKS
    assert _values(seen, r"airflow\.asyncq\.worker\.dead_letters\..*") == []

    # the executor: every task published once on 'default' (plus any republish), each success applied
    published = sum(_values(seen, r"airflow\.asyncq\.executor\.published\.default"))
    republished = sum(_values(seen, r"airflow\.asyncq\.executor\.republished\.\w+"))
    assert published == TASKS + republished and published >= TASKS
    assert sum(_values(seen, r"airflow\.asyncq\.executor\.events_applied\.success")) == TASKS
    assert sum(_values(seen, r"airflow\.asyncq\.executor\.events_applied\.started")) == TASKS
    assert _values(seen, r"airflow\.asyncq\.executor\.publish_failures\..*") == []
    syncs = _values(seen, r"airflow\.asyncq\.executor\.sync_duration")
    assert syncs and all(0 <= ms < 30_000 for ms in syncs)

    # slots: each heartbeat's busy + free is the worker's four slots, and the waves filled all four
    beats = _per_beat(seen, rf"airflow\.asyncq\.worker\.slots_busy\.{W}", rf"airflow\.asyncq\.worker\.slots_free\.{W}")
    assert beats, "no heartbeat gauges from w-default"
    assert all(0 <= busy <= SLOTS and busy + free == SLOTS for busy, free in beats), beats
    assert max(busy for busy, _free in beats) == SLOTS, beats
    # memory: every task asks for the default 256 MiB, so the reserved budget is whole requests
    used = _values(seen, rf"airflow\.asyncq\.worker\.memory_budget_used\.{W}")
    assert used and all(u % (256 * MIB) == 0 and 0 <= u <= SLOTS * 256 * MIB for u in used), used
    assert set(_values(seen, r"airflow\.asyncq\.worker\.memory_budget\.w-highmem_[\w-]+")) == {1024 * MIB}

    # the queue: a backlog while the waves ran, never more than the run published, drained at the end
    depths = _values(seen, r"airflow\.asyncq\.queue\.depth\.default")
    assert 0 < max(depths) <= N, depths
    assert _values(_parse(statsd.received()[end:]), r"airflow\.asyncq\.queue\.depth\.default")[-1] == 0
    assert max(_values(seen, r"airflow\.asyncq\.queue\.oldest_age\.default")) > 0
