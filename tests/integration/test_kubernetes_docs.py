"""docs/KUBERNETES.md is a tested example.

Its YAML parses; the KEDA triggers name exactly the lists kombu writes for the queues the documented
worker consumes (``state.queues.list_name``, the ``\\x06\\x16`` decoded as YAML decodes it); the Helm
values run ``airflow asyncq worker`` with flags the real command accepts; the grace period outlasts the
drain. Then real workloads, published at every priority step to a real Redis (DB 14, own queue and key
prefix), land in exactly the documented lists, and ``state.queues.depths`` counts the same.
"""

from __future__ import annotations

import argparse
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_asyncq_provider.broker.config import priority_step
from airflow_asyncq_provider.broker.messages import send_workload, ti_key
from airflow_asyncq_provider.get_provider_info import CONFIG_OPTIONS
from airflow_asyncq_provider.settings import AsyncQSettings, load_settings
from airflow_asyncq_provider.state import queues
from airflow_asyncq_provider.state.keys import Keys

from ._support import REDIS_URL

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "KUBERNETES.md"
EXECUTOR = "airflow_asyncq_provider.executors.AsyncQExecutor"
_YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.MULTILINE | re.DOTALL)
#: seconds the doc allows the worker to report its last events and exit after the group SIGKILL
MARGIN = 30


class _Conf:
    """The documented ``config:`` as Airflow's config would serve it (``[section] key``)."""

    def __init__(self, config: dict[str, dict[str, Any]], **asyncq: Any) -> None:
        self.sections = {name: dict(values or {}) for name, values in config.items()}
        self.sections.setdefault("asyncq", {}).update(asyncq)

    def get(self, section: str, key: str, fallback: Any = None) -> Any:
        return self.sections.get(section, {}).get(key, fallback)


# ------------------------------------------------------------------------------------------ parsing
@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    blocks = _YAML_BLOCK.findall(DOC.read_text())
    assert blocks, f"no ```yaml blocks in {DOC}"
    docs = [doc for block in blocks for doc in yaml.safe_load_all(block)]
    assert all(isinstance(doc, dict) for doc in docs), "every YAML document is a mapping"
    return docs


def _only(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents if d.get("kind") == kind]
    return found


@pytest.fixture(scope="module")
def scaled_object(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return _only(documents, "ScaledObject")


@pytest.fixture(scope="module")
def trigger_auth(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return _only(documents, "TriggerAuthentication")


@pytest.fixture(scope="module")
def helm_values(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (values,) = [d for d in documents if "workers" in d and "kind" not in d]
    return values


@pytest.fixture(scope="module")
def settings(helm_values: dict[str, Any]) -> AsyncQSettings:
    """The documented ``[asyncq]`` values through the one function that reads them."""
    return load_settings(_Conf(helm_values.get("config") or {}, broker_url="redis://airflow-redis:6379/0"))


@pytest.fixture(scope="module")
def worker_args(helm_values: dict[str, Any], settings: AsyncQSettings) -> Any:
    """The documented worker command, parsed by the command's own arguments and resolved like the
    real ``airflow asyncq worker`` resolves it."""
    from airflow_asyncq_provider.cli.definition import ASYNCQ_COMMANDS
    from airflow_asyncq_provider.worker.command import worker_options

    args = helm_values["workers"]["args"]
    assert args[:3] == ["airflow", "asyncq", "worker"], args
    (worker,) = [c for c in ASYNCQ_COMMANDS if c.name == "worker"]
    parser = argparse.ArgumentParser(prog="airflow asyncq worker")
    for arg in worker.args:
        arg.add_to_parser(parser)
    return worker_options(parser.parse_args(args[3:]), settings)


def _redis_triggers(scaled_object: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in scaled_object["spec"]["triggers"] if t["type"] == "redis"]


def _formula_name(queue: str) -> str:
    """How the doc names a queue in trigger names (the formula takes identifiers only)."""
    return re.sub(r"\W", "_", queue)


def _claimed(trigger: dict[str, Any], consumed: tuple[str, ...]) -> tuple[str, int]:
    """(queue, step) a trigger's name claims: ``<queue>_p<step>``."""
    prefix, sep, step = trigger["name"].rpartition("_p")
    assert sep and step.isdigit(), f"trigger {trigger['name']!r} is not named <queue>_p<step>"
    (queue,) = [q for q in consumed if _formula_name(q) == prefix] or [None]
    assert queue is not None, f"trigger {trigger['name']!r} names no queue the worker consumes ({consumed})"
    return queue, int(step)


# ------------------------------------------------------------------------------------------ the doc
def test_every_yaml_block_is_valid(documents):
    kinds = Counter(d.get("kind", "helm values") for d in documents)
    assert kinds == {"TriggerAuthentication": 1, "ScaledObject": 1, "helm values": 1}
    for doc in documents:
        if "kind" in doc:
            assert doc["apiVersion"] == "keda.sh/v1alpha1"
            assert doc["metadata"]["name"] and doc["metadata"]["namespace"]


def test_the_priority_table_is_priority_step_and_list_name():
    """docs/KUBERNETES.md's table: each row's list name (as written, escapes and all) and weight range."""
    import codecs

    rows = re.findall(r"^\| (\d) \| `([^`]+)` \| (\d+)(?:-(\d+)| and (more|less))?\b", DOC.read_text(), re.M)
    assert [int(r[0]) for r in rows] == queues.PRIORITY_STEPS
    for step, written, low, high, open_end in rows:
        step, low = int(step), int(low)
        assert codecs.decode(written, "unicode_escape") == queues.list_name("default", step), written
        high = None if open_end == "more" else int(high or low)
        if open_end == "less":
            low, high = None, low
        for weight in (low, high):
            if weight is not None:
                assert priority_step(weight) == step, (step, weight)
        if low is not None and step < 9:
            assert priority_step(low - 1) == step + 1, (step, low)
        if high is not None and step > 0:
            assert priority_step(high + 1) == step - 1, (step, high)


def test_list_names_are_kombus(scaled_object, worker_args):
    """Each listName is what kombu LPUSHes for its queue and step, byte for byte."""
    from kombu.transport.redis import Channel

    assert queues.PRIORITY_SEP == Channel.sep  # the separator is kombu's, not ours
    for trigger in _redis_triggers(scaled_object):
        queue, step = _claimed(trigger, worker_args.queues)
        name = trigger["metadata"]["listName"]
        assert name == queues.list_name(queue, step), trigger["name"]
        expected = queue.encode() + (b"\x06\x16" + str(step).encode() if step else b"")
        assert name.encode() == expected, trigger["name"]


def test_one_trigger_per_priority_step_of_each_consumed_queue(scaled_object, worker_args):
    claimed = [_claimed(t, worker_args.queues) for t in _redis_triggers(scaled_object)]
    assert sorted(claimed) == sorted((q, s) for q in worker_args.queues for s in queues.PRIORITY_STEPS)


def test_formula_adds_every_trigger_and_targets_one_workers_slots(scaled_object, worker_args):
    modifiers = scaled_object["spec"]["advanced"]["scalingModifiers"]
    names = [t["name"] for t in scaled_object["spec"]["triggers"]]
    terms = [term.strip() for term in modifiers["formula"].split("+")]
    assert sorted(terms) == sorted(names)  # a sum of all triggers, each once
    assert modifiers.get("metricType", "AverageValue") == "AverageValue"
    assert float(modifiers["target"]) == worker_args.concurrency
    (running,) = [t for t in scaled_object["spec"]["triggers"] if t["type"] == "postgresql"]
    for queue in worker_args.queues:
        assert f"queue = '{queue}'" in running["metadata"]["query"]
    assert "state = 'running'" in running["metadata"]["query"]


def test_scaled_object_targets_the_charts_worker_and_redis(scaled_object, trigger_auth, helm_values):
    """The chart names its objects after the release: <release>-worker, -redis, -redis-password,
    -broker-url (chart/templates/workers/worker-deployment.yaml, secrets/redis-secrets.yaml)."""
    spec = scaled_object["spec"]
    kind = "StatefulSet" if helm_values["workers"]["persistence"]["enabled"] else "Deployment"
    assert spec["scaleTargetRef"]["kind"] == kind
    assert spec["scaleTargetRef"]["name"].endswith("-worker")
    release = spec["scaleTargetRef"]["name"][: -len("-worker")]
    namespace = scaled_object["metadata"]["namespace"]
    assert trigger_auth["metadata"]["namespace"] == namespace
    (password,) = trigger_auth["spec"]["secretTargetRef"]
    assert (password["parameter"], password["name"]) == ("password", f"{release}-redis-password")
    for trigger in _redis_triggers(scaled_object):
        assert trigger["authenticationRef"]["name"] == trigger_auth["metadata"]["name"]
        assert trigger["metadata"]["address"] == f"{release}-redis.{namespace}.svc.cluster.local:6379"
        assert trigger["metadata"]["databaseIndex"] == "0"  # the chart's broker URL ends in /0
    (broker,) = [s for s in helm_values["secret"] if s["envName"] == "AIRFLOW__ASYNCQ__BROKER_URL"]
    assert (broker["secretName"], broker["secretKey"]) == (f"{release}-broker-url", "connection")


def test_helm_values_run_the_asyncq_worker(helm_values, worker_args):
    workers = helm_values["workers"]
    assert workers.get("command") is None and workers["args"][:3] == ["airflow", "asyncq", "worker"]
    assert worker_args.queues == ("default",)
    # the chart renders its worker Deployment only for an executor naming CeleryExecutor
    assert "CeleryExecutor" in helm_values["executor"]
    assert helm_values["config"]["core"]["executor"] == EXECUTOR
    assert not workers["keda"]["enabled"] and not workers["hpa"]["enabled"]
    assert not workers["livenessProbe"]["enabled"]  # the default probe pings a celery@ node


def test_documented_asyncq_options_exist(helm_values):
    assert set(helm_values["config"]["asyncq"]) <= set(CONFIG_OPTIONS)


def test_grace_period_outlasts_the_drain(helm_values, settings):
    """SIGTERM at 0, the drain's stop at D, SIGKILL at D + G, the supervisor's group at D + 2G."""
    grace = helm_values["workers"]["terminationGracePeriodSeconds"]
    drain, kill = settings.worker_drain_timeout, settings.kill_grace_period
    assert (drain, kill) == (600, 10)  # what the prose computes with
    assert grace >= drain + kill
    assert grace >= drain + 2 * kill + MARGIN


# ------------------------------------------------------------------------------------------ real Redis
def test_documented_lists_hold_what_was_published(redis_client, key_prefix, new_queue, make_workload,
                                                  scaled_object, worker_args):
    """Workloads at all ten priority steps, published the way the executor publishes them, are all in
    the documented lists (rebased onto this test's own queue), and ``depths`` agrees per step."""
    (doc_queue,) = worker_args.queues
    queue = new_queue()
    documented = {}
    for trigger in _redis_triggers(scaled_object):
        name = trigger["metadata"]["listName"]
        assert name.startswith(doc_queue)
        documented[_claimed(trigger, worker_args.queues)[1]] = queue + name[len(doc_queue):]
    weights = [1000, 500, 100, 50, 20, 10, 5, 3, 2, 1, 7000, 1, 1, 25]  # every step, some twice
    settings = AsyncQSettings(broker_url=REDIS_URL, key_prefix=key_prefix, default_queue=queue)
    for weight in weights:
        w = make_workload(queue=queue, priority_weight=weight, task_id=f"w{weight}")
        send_workload(redis_client, task_id=str(uuid.uuid4()), payload=w.model_dump_json(),
                      meta={"memory_request": settings.default_memory_request, "memory_limit": None},
                      queue=queue, priority=priority_step(weight),
                      key=ti_key(w.ti.dag_id, w.ti.task_id, w.ti.run_id, w.ti.try_number, w.ti.map_index))

    published = Counter(priority_step(w) for w in weights)
    assert set(published) == set(queues.PRIORITY_STEPS)
    lengths = {step: redis_client.llen(name) for step, name in documented.items()}
    assert lengths == dict(published)
    assert sum(lengths.values()) == len(weights)
    # nothing went to a list the doc does not name
    assert set(redis_client.scan_iter(match=f"{queue}*")) == set(documented.values())

    (depth,) = queues.depths(redis_client, Keys(key_prefix), [queue])
    assert depth.queue == queue and depth.depth == len(weights)
    assert depth.by_step == lengths
