"""bench/results/chaos.json and the generated part of docs/RELIABILITY.md.

The JSON keeps one result per run shape (``<minutes>min-<tasks>tasks``) and names the latest, so a short
run does not overwrite the full one. The document keeps its hand-written text: only the block between
``<!-- chaos:<shape> -->`` and ``<!-- /chaos:<shape> -->`` is rewritten, and a new shape's block is added
before ``<!-- /chaos:results -->``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bench.chaos.account import MEASURES

DOC = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"
END = "<!-- /chaos:results -->"


def shape(result: dict[str, Any]) -> str:
    return f"{result['args']['minutes']:g}min-{result['args']['tasks']}tasks"


def save(result: dict[str, Any] | None, path: Path) -> None:
    if result is None:
        return
    data: dict[str, Any] = {"runs": {}}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            pass
    data.setdefault("runs", {})[shape(result)] = result
    data["latest"] = shape(result)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def _s(value: Any) -> str:
    return "–" if value is None else f"{value:.1f} s"


def block(result: dict[str, Any]) -> str:
    """The Markdown of one run: what ran, the counts, the recovery per kind, the targets, every fault."""
    m, ti, fx = result["machine"], result["task_instances"], result["side_effects"]
    most = f", at most {fx['most_tries_of_one_ti']} (of 4 allowed)" if "most_tries_of_one_ti" in fx else ""
    lines = [
        f"### {result['args']['minutes']:g} minutes, {result['args']['tasks']} tasks (seed {result['seed']})",
        "",
        f"`{result['command']}` on {result['date']}: {m['node']}, {m['cpus']} cores, {m['memory_gib']} GiB, "
        f"kernel {m['kernel']}, Airflow {m['airflow']}, celery {m['celery']}, kombu {m['kombu']}, "
        f"redis-py {m['redis_py']}. Load average {m.get('loadavg_at_start', ['?'])[0]} before, "
        f"{m['loadavg_at_end'][0]} after (the machine is shared).",
        "",
        f"{len(result['runs'])} runs, {sum(1 for f in result['faults'] if not f['skipped'])} faults "
        f"({sum(1 for f in result['faults'] if f['skipped'])} skipped), settle {result['settle']['seconds']:.0f} s "
        f"(limit {result['settle']['limit_s']:.0f} s).",
        "",
        "| target | result | |",
        "|---|---|---|",
    ]
    names = {"every_ti_success": "every task instance succeeds", "no_doubles": "no side effect done twice",
             "nothing_stuck": "nothing left queued or running",
             "no_queued_timeout": "(also) nothing waits for `task_queued_timeout`"}
    for key, target in result["targets"].items():
        lines.append(f"| {names[key]} | {target['value']} | {'met' if target['met'] else '**missed**'} |")
    lines += [
        "",
        f"Task instances: {ti['total']} ({ti['expected']} expected), by state "
        + ", ".join(f"{k} {v}" for k, v in sorted(ti["by_state"].items()))
        + f". Tries started: {fx['tries_started']}; {fx['tis_with_retries']} task instances needed more than "
        f"one{most}. Earlier tries by state: "
        + (", ".join(f"{k} {v}" for k, v in sorted(result["earlier_tries_by_state"].items())) or "none")
        + f". Done twice in one try: {len(fx['done_twice_same_try'])}; done in two tries: "
        f"{len(fx['done_in_two_tries'])}; a try started twice: {len(fx['start_twice_same_try'])}. "
        f"Fleet events: " + (", ".join(f"{k} {v}" for k, v in sorted(result["fleet_events"].items())) or "none")
        + f"; dead letters: {result['dead_letters']}. Master changes seen: {len(result['master_changes']) - 1}. "
        f"Components that exited by themselves: {len(result['unexpected_exits'])}"
        + (" (" + ", ".join(f"{e['name']} code {e['code']}" for e in result["unexpected_exits"]) + ")"
           if result["unexpected_exits"] else "") + ".",
        "",
        "`measured` counts the faults a measure applies to: a fault with no work waiting has no \"next start\", "
        "a kill of an idle host has no try to run again. `not recovered` counts those that did not recover within "
        "300 s of their fault.",
        "",
        "| fault | ran | measure | measured | median | max | not recovered |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, measures in MEASURES.items():
        entry = result["recovery"][kind]
        ran = f"{entry['ran']}" + (f" (+{entry['skipped']} skipped)" if entry["skipped"] else "")
        for index, (name, meaning) in enumerate(measures):
            stat = entry[name]
            lines.append(f"| {kind if index == 0 else ''} | {ran if index == 0 else ''} | {meaning} | "
                         f"{stat['n'] + stat['unrecovered']} | {_s(stat['median'])} | {_s(stat['max'])} | "
                         f"{stat['unrecovered'] or ''} |")
    lines += ["", "<details><summary>Every fault</summary>", "",
              "| at | fault | target | parameters | recovery |", "|---|---|---|---|---|"]
    for f in result["faults"]:
        p = f["planned"]
        params = {"worker_kill": f"restart after {p['hold']:.1f} s", "scheduler_kill": f"restart after {p['hold']:.1f} s",
                  "redis_kill": f"restart as replica after {p['hold']:.1f} s", "sentinel_failover": "",
                  "partition": f"{p['variant']} for {p['hold']:.1f} s",
                  "netem": f"{p['delay'] * 1000:.0f} ms, {p['loss']:.1%} loss for {p['hold']:.1f} s"}[p["kind"]]
        if f["skipped"]:
            recovery = f"skipped: {f['skipped']}"
        else:
            recovery = ", ".join(f"{k} {v}" for k, v in f["recovery"].items() if not isinstance(v, dict))
            if f["error"]:
                recovery += f"; error: {f['error']}"
        lines.append(f"| +{f['offset_s']:.0f} s | {p['kind']} | {f['target']} | {params} | {recovery} |")
    lines += ["", "</details>", ""]
    missed = [k for k, t in result["targets"].items() if not t["met"]]
    if missed:
        lines += ["Where the target was missed, the evidence:", ""]
        for item in ti["not_success"][:20]:
            lines.append(f"- `{item['run_id']} {item['task_id']}[{item['map_index']}]`: {item['state']} "
                         f"after try {item['try_number']}")
        for item in fx["done_in_two_tries"][:20]:
            ti_name = f"{item['ti'][0]} {item['ti'][1]}[{item['ti'][2]}]"
            recorded = ", ".join(f"try {t} {state}" for t, state in item.get("states", {}).items())
            lines.append(f"- `{ti_name}` done in tries {item['tries']} ({recorded}): " + "; ".join(item["evidence"]))
        for item in fx["done_twice_same_try"][:20]:
            lines.append(f"- `{' '.join(map(str, item))}`: done twice in one try")
        for item in result.get("stuck_in_queued", [])[:20]:
            lines.append(f"- `{item['run_id']} {item['task_id']}[{item['map_index']}]`: \"Task stuck in queued\" "
                         f"at +{item['at'] - result['window_opened']:.0f} s ({item['log']})")
        lines.append("")
    return "\n".join(lines)


def document(result: dict[str, Any] | None, path: Path = DOC) -> None:
    if result is None:
        return
    key = shape(result)
    opening, closing = f"<!-- chaos:{key} -->", f"<!-- /chaos:{key} -->"
    text = path.read_text() if path.exists() else f"# Reliability\n\n<!-- chaos:results -->\n{END}\n"
    generated = f"{opening}\n{block(result)}\n{closing}"
    pattern = re.compile(re.escape(opening) + ".*?" + re.escape(closing), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: generated, text)
    elif END in text:
        text = text.replace(END, f"{generated}\n\n{END}")
    else:
        text += f"\n{generated}\n"
    path.write_text(text)


def print_summary(result: dict[str, Any] | None, log) -> None:
    if result is None:
        log("no result: the run did not get as far as counting")
        return
    ti, fx = result["task_instances"], result["side_effects"]
    log(f"seed {result['seed']}: {ti['success']}/{ti['expected']} task instances succeeded, "
        f"{ti['queued_or_running']} queued or running, {ti['not_final']} not final; "
        f"done twice: {len(fx['done_twice_same_try'])} in one try, {len(fx['done_in_two_tries'])} in two tries")
    for kind, entry in result["recovery"].items():
        parts = [f"{name} median {_s(entry[name]['median'])} max {_s(entry[name]['max'])}"
                 for name, _m in MEASURES[kind] if entry[name]["n"]]
        log(f"  {kind}: ran {entry['ran']}, skipped {entry['skipped']}; " + "; ".join(parts))
    for key, target in result["targets"].items():
        log(f"  target {key}: {'met' if target['met'] else 'MISSED'} ({target['value']})")
