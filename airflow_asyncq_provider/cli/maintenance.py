"""``airflow asyncq maintenance WORKER on|off [--comment TEXT]``: a worker that takes no new work.

A worker in maintenance finishes what it runs, stays in ``airflow asyncq status`` and on the fleet page
with its comment, and keeps that state across its restarts until it is turned off.
"""

from __future__ import annotations

import argparse
import getpass

from airflow_asyncq_provider import exitcodes
from airflow_asyncq_provider.cli.connect import fail


def maintenance(args: argparse.Namespace) -> None:
    from airflow_asyncq_provider.cli.connect import connect
    from airflow_asyncq_provider.state import registry

    _settings, client, keys = connect("airflow asyncq maintenance")
    on = args.state == "on"
    if on:
        live = registry.live_workers(client, keys)
        if args.worker not in live:
            known = ", ".join(sorted(live)) or "none"
            fail(f"no live worker named {args.worker!r} (live workers: {known}); use the WORKER column of "
                 "`airflow asyncq status`", exitcodes.CONFIG)
    registry.set_maintenance(client, keys, args.worker, on, comment=args.comment or "", by=_who())
    print(f"{args.worker}: maintenance {'on' if on else 'off'}"
          + (f" ({args.comment})" if on and args.comment else "")
          + ("; it takes no new work and finishes what it runs" if on else "; it takes work again"))


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in a container: still record where it came from
        return "cli"
