"""What the executor remembers of each workload it published or adopted, indexed both ways: by
Airflow key (the scheduler's side) and by message id (what events carry)."""

from __future__ import annotations

import dataclasses

from airflow_asyncq_provider.executors.outgoing import Outgoing


@dataclasses.dataclass(slots=True)
class Tracked:
    task_id: str
    queue: str
    published_at: float
    hostname: str | None = None
    received: bool = False
    started: bool = False
    warned_unconsumed: bool = False
    # Kept until a worker starts it, so the executor can publish it again (Redis lost it, or its
    # token expired in the queue). ``None`` for adopted work, which this scheduler never published.
    outgoing: Outgoing | None = None
    lease_missing_since: float | None = None
