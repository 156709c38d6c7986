"""Check the accounting on a process tree whose CPU is known, without Airflow (about 15 s).

    .venv/bin/python -m bench.cpu.selftest [--workloads 20] [--interval 0.1]

A root forks a "fork server", which forks short-lived "supervisors" two at a time. Each burns 50 ms of
CPU, forks a "task process" that burns 100 ms, reaps it, burns 30 ms more and exits, which is the shape
of an AsyncQ workload. The split of ``bench.cpu.attribute`` must add up to the tree's counters exactly.
With taskstats, supervisors and task processes must come out at their known CPU within 10 %. The
sampler alone leaves part of it as "unattributed" and does not have to meet that bound.
Exit code 0 when both checks pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.cpu import attribute, procfs  # noqa: E402
from bench.cpu.exits import ExitListener  # noqa: E402
from bench.cpu.tracker import Window, subtree_ticks  # noqa: E402

SUPERVISOR_S, TASK_S, SUPERVISOR_AFTER_S = 0.05, 0.10, 0.03


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def supervisor() -> None:
    burn(SUPERVISOR_S)
    pid = os.fork()
    if pid == 0:
        burn(TASK_S)
        os._exit(0)
    os.waitpid(pid, 0)
    burn(SUPERVISOR_AFTER_S)
    os._exit(0)


def fork_server(workloads: int) -> None:
    running: list[int] = []
    for _ in range(workloads):
        pid = os.fork()
        if pid == 0:
            supervisor()
        running.append(pid)
        if len(running) >= 2:
            os.waitpid(running.pop(0), 0)
    for pid in running:
        os.waitpid(pid, 0)
    time.sleep(3600)  # stays alive, as the real one does: the window reads its reaped counter at the end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args(argv)
    root = os.fork()
    if root == 0:  # the "consumer": forks the fork server, then waits
        server = os.fork()
        if server == 0:
            time.sleep(1.0)  # lets the window begin first
            fork_server(args.workloads)
            os._exit(0)
        time.sleep(3600)
        os._exit(0)
    exits: ExitListener | None = ExitListener()
    if not exits.start():  # type: ignore[union-attr]
        print(f"taskstats unavailable ({exits.error}); checking the sampler alone")  # type: ignore[union-attr]
        exits = None
    window = Window({"worker": root}, interval=args.interval, exits=exits)
    try:
        time.sleep(0.3)
        window.begin()
        time.sleep(1.0 + args.workloads / 2 * (SUPERVISOR_S + TASK_S + SUPERVISOR_AFTER_S) * 3 + 2)
        window.end()
    finally:
        for rec in list(window.records.values()):
            if rec.parent is not None and not rec.gone:  # the fork server
                os.kill(rec.key[0], 9)
        os.kill(root, 9)
        os.waitpid(root, 0)
        if exits is not None:
            exits.stop()
    assert window.begin_snapshot and window.end_snapshot
    key = attribute.root_key(window, "worker")
    fs_pid = window.records[window.records[key].children[0]].key[0]
    roles = attribute.worker_roles("asyncq", window, key, fs_pid)
    counters = subtree_ticks(window.end_snapshot.processes, root) - subtree_ticks(
        window.begin_snapshot.processes, root
    )
    ok = True
    expected = {
        attribute.SUPERVISOR: args.workloads * (SUPERVISOR_S + SUPERVISOR_AFTER_S),
        attribute.TASK: args.workloads * TASK_S,
    }
    for use_exits in (True, False) if exits is not None else (False,):
        split = attribute.totals(attribute.split(window, key, roles.__getitem__, use_exits=use_exits))
        total = sum(split.values())
        label = "with taskstats" if use_exits else "sampler alone"
        print(f"{label}: " + ", ".join(f"{r} {procfs.seconds(t):.3f} s" for r, t in sorted(split.items())))
        print(f"  split sum {procfs.seconds(total):.3f} s, tree counters {procfs.seconds(counters):.3f} s")
        ok &= abs(total - counters) < 0.5
        if use_exits:
            for role, seconds in expected.items():
                got = procfs.seconds(split.get(role, 0))
                within = abs(got - seconds) <= 0.1 * seconds
                print(
                    f"  {role}: {got:.3f} s, known {seconds:.3f} s (+ fork/exit overhead): "
                    f"{'ok' if within else 'OFF'}"
                )
                ok &= within
    print("selftest", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
