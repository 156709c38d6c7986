"""Provider metadata read by Airflow's ProvidersManager.

Every ``[asyncq]`` option is declared here once: what Airflow shows (description, type, default,
example, ``sensitive``) and how ``settings.load_settings`` parses it (kind, minimum, optional). Nothing
here imports Celery or Redis, because the api-server and DAG parsing load this module too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from airflow_asyncq_provider import __version__

# The keys of a config option in Airflow's provider_info.schema.json. That schema means to forbid any
# other key (its "additional_properties": false is misspelt, so today nothing enforces it), so
# get_provider_info() hands Airflow these and keeps the parse keys below to ourselves.
AIRFLOW_OPTION_KEYS = ("description", "version_added", "type", "example", "default", "sensitive")

Kind = Literal["integer", "float", "string", "boolean", "size", "modules", "broker_url"]
Type = Literal["string", "integer", "float", "boolean"]


class ConfigOption(TypedDict):
    description: str
    version_added: str
    type: Type
    example: str | None
    default: str
    sensitive: bool
    # How settings.load_settings parses it. kind: "size" is a memory size, "modules" a comma-separated
    # list of dotted module names, "broker_url" a Redis or Sentinel URL; otherwise it is the type
    # ("boolean" takes what Airflow's conf.getboolean takes: true/false, t/f, 1/0).
    kind: Kind
    minimum: float | None  # numbers only: the value must be above it, or equal to it if inclusive
    inclusive: bool
    optional: bool  # an empty value means None


def _opt(description: str, type_: Type, default: str,
         example: str | None = None, *, sensitive: bool = False, kind: Kind | None = None,
         minimum: float = 0, inclusive: bool = False, optional: bool = False) -> ConfigOption:
    """One option. A number must be above ``minimum`` (0 unless given), or equal to it if ``inclusive``."""
    number = type_ in ("integer", "float")
    return {
        "description": description,
        "version_added": "0.1.0",
        "type": type_,
        "example": example,
        "default": default,
        "sensitive": sensitive,
        "kind": kind or type_,
        "minimum": minimum if number else None,
        "inclusive": inclusive and number,
        "optional": optional,
    }


CONFIG_OPTIONS: dict[str, ConfigOption] = {
    "broker_url": _opt(
        "Redis URL of the broker and of the fleet's state (event stream, task records, worker "
        "registry). Schemes: redis:// and rediss:// (TLS), or Redis Sentinel in kombu's form "
        "sentinel://:password@host1:26379/0;sentinel://host2:26379 with sentinel_master set (the "
        "password and database number are read from the first part, and apply to the Redis master). "
        "Redis Cluster is not supported. Put an ACL user and password "
        "in the URL (redis://user:password@host:6379/0). It is shown masked in every log and CLI output.",
        "string", "redis://127.0.0.1:6379/0", "rediss://airflow:secret@redis.internal:6380/0",
        sensitive=True, kind="broker_url",
    ),
    "worker_concurrency": _opt(
        "How many Airflow workloads one worker runs at the same time (fork slots). Idle slots cost no "
        "memory: each workload is forked when it starts.",
        "integer", "8", "16",
    ),
    "publish_timeout": _opt(
        "Seconds one publish to the broker may take before the executor gives up on it for this "
        "heartbeat and tries again on the next one.",
        "float", "5.0", "2.0",
    ),
    "publish_max_retries": _opt(
        "How many heartbeats in a row the executor retries a workload whose publish failed before it "
        "reports the task instance failed with the broker error as reason.",
        "integer", "3", "5", inclusive=True,
    ),
    "event_batch_size": _opt(
        "Most events the executor reads from the event stream in one heartbeat. The rest are read on "
        "the next heartbeat, so one busy moment cannot stall the scheduler loop.",
        "integer", "5000", "5000",
    ),
    "event_wait": _opt(
        "Seconds the executor's sync() waits for a worker's next event when the scheduler is about to "
        "idle: the executor tracks tasks, was handed no work this loop, has no event pending and is the "
        "scheduler's only executor. An event ends the wait at once, so a freed slot is refilled in the "
        "next scheduler loop instead of after [scheduler] scheduler_idle_sleep_time. 0 turns it off; "
        "at most half of publish_timeout, the executor's Redis read timeout, is used.",
        "float", "0.5", "0.5", inclusive=True,
    ),
    "event_stream_maxlen": _opt(
        "Approximate length the event stream is trimmed to. Must be far larger than the number of "
        "events produced between two scheduler heartbeats.",
        "integer", "200000", "200000", minimum=1000, inclusive=True,
    ),
    "state_ttl": _opt(
        "Seconds a task's record (published, claimed, finished) is kept in Redis. Adoption after a "
        "scheduler restart needs it, so keep it longer than your longest task plus queue time.",
        "integer", "604800", "604800", minimum=60, inclusive=True,
    ),
    "worker_heartbeat_interval": _opt(
        "Seconds between two heartbeats of a worker to the registry.",
        "float", "5.0", "5.0",
    ),
    "worker_lost_timeout": _opt(
        "Seconds without a worker heartbeat after which the executor reports every task that worker "
        "ran as failed with the reason 'worker <name> lost', so Airflow's retries take over.",
        "float", "30.0", "30.0",
    ),
    "unconsumed_queue_warning": _opt(
        "Seconds a workload may wait unclaimed on a queue that no live worker consumes before the "
        "scheduler logs a warning that names the queue and the command that would serve it.",
        "float", "60.0", "60.0",
    ),
    "visibility_timeout": _opt(
        "Redis transport visibility timeout in seconds. Messages are acknowledged when a slot starts "
        "them, so this only bounds how long a message reserved by a worker that died before starting "
        "it waits before Redis hands it to another worker.",
        "integer", "3600", "3600",
    ),
    "key_prefix": _opt(
        "Prefix of the Redis keys of the fleet's own state (event stream, task records, leases, worker "
        "registry, dead letters). Celery's queue lists are not prefixed, so give each Airflow deployment "
        "its own Redis database number (redis://host:6379/<db>), not just its own prefix.",
        "string", "asyncq", "asyncq-prod",
    ),
    "ssl_ca_certs": _opt("CA bundle that verifies the Redis server, for rediss:// URLs (and for sentinel:// "
                         "URLs with sentinel_ssl).",
                         "string", "", "/etc/ssl/redis/ca.pem"),
    "ssl_certfile": _opt("Client certificate for mutual TLS with Redis, for rediss:// URLs (and for "
                         "sentinel:// URLs with sentinel_ssl).",
                         "string", "", "/etc/ssl/redis/client.pem"),
    "ssl_keyfile": _opt("Private key of the client certificate, for rediss:// URLs (and for sentinel:// "
                        "URLs with sentinel_ssl).",
                        "string", "", "/etc/ssl/redis/client.key", sensitive=True),
    "ssl_cert_reqs": _opt("Whether the Redis server certificate must verify: required, optional or none.",
                          "string", "required", "required"),
    # --- Redis Sentinel (docs/OPERATIONS.md, "Redis Sentinel") ---
    "sentinel_master": _opt(
        "Name of the master the sentinels monitor (`sentinel monitor <name> ...`), required with a "
        "sentinel:// broker_url and refused with any other. The broker, the native results and the "
        "fleet's state all ask the sentinels for this master, and follow it when they fail over.",
        "string", "", "mymaster",
    ),
    "sentinel_password": _opt(
        "Password of the sentinels themselves (their `requirepass`), with a sentinel:// broker_url. "
        "Empty: the sentinels need none. The Redis master's password goes in the URL.",
        "string", "", "sentinel-secret", sensitive=True,
    ),
    "sentinel_ssl": _opt(
        "With a sentinel:// broker_url: speak TLS to the sentinels and to the Redis master they name, "
        "with ssl_ca_certs, ssl_certfile, ssl_keyfile and ssl_cert_reqs. kombu has no TLS form of "
        "sentinel://, so this one switch covers both; a TLS master behind plain-text sentinels (or "
        "the reverse) is not supported.",
        "boolean", "False", "True", kind="boolean",
    ),
    "fork_preload_modules": _opt(
        "Comma-separated extra modules the worker's warm fork parent imports before it freezes its "
        "heap, for example heavy libraries your tasks use. Every forked workload shares them.",
        "string", "", "pandas,numpy", kind="modules",
    ),
    "default_memory_request": _opt(
        "Memory a task is assumed to need when its executor_config does not say "
        "(executor_config={'asyncq': {'memory_request': '2GiB'}}). Workers admit a task only when its "
        "request fits their free budget.",
        "string", "256MiB", "512MiB", kind="size",
    ),
    "default_memory_limit": _opt(
        "Memory a task's process tree may use before the worker stops it with 'memory limit exceeded', "
        "when its executor_config does not set memory_limit. Empty: no per-task limit.",
        "string", "", "4GiB", kind="size", optional=True,
    ),
    "worker_memory_budget": _opt(
        "Memory a worker hands out to the requests of the tasks it runs. Empty: "
        "worker_memory_fraction of the cgroup limit, or of system memory where there is none. "
        "`airflow asyncq worker --memory-budget` overrides it. A budget above the machine's memory is "
        "capped with a warning.",
        "string", "", "12GiB", kind="size", optional=True,
    ),
    "worker_memory_fraction": _opt(
        "Fraction of the cgroup limit (or of system memory) used as the budget when "
        "worker_memory_budget is empty.",
        "float", "0.8", "0.75",
    ),
    "watchdog_interval": _opt(
        "Seconds between two samples of every running task's process tree by the memory watchdog.",
        "float", "0.5", "0.5",
    ),
    "kill_grace_period": _opt(
        "Seconds between SIGTERM and SIGKILL when the worker stops a task (memory limit, revoke, "
        "drain timeout), so the supervisor can flush logs and report.",
        "float", "10.0", "10.0",
    ),
    "supervisor_idle_timeout": _opt(
        "Seconds a worker's warm supervisor host waits for its next task before it exits. A host runs "
        "one task's supervisor after another, so a task costs one fork instead of two; an idle worker "
        "keeps none. 0: a fresh supervisor for every task, which exits after it.",
        "float", "30.0", "30.0", inclusive=True,
    ),
    "worker_drain_timeout": _opt(
        "Seconds a worker that got SIGTERM lets running tasks finish before it terminates them with a "
        "reason. A second SIGTERM skips the wait and kills them at once.",
        "float", "60.0", "300.0", inclusive=True,
    ),
    "event_retry_timeout": _opt(
        "Seconds a worker keeps retrying while Redis fails (for example restarting): to write a task's "
        "outcome before it gives up on that event, and to claim a message it has taken before it hands "
        "the message back to the queue.",
        "float", "300.0", "300.0",
    ),
    "max_deliveries": _opt(
        "How many times one message may be delivered to workers before it is moved to the dead-letter "
        "list instead of being run again.",
        "integer", "3", "3",
    ),
    # --- native queue tasks (docs/NATIVE_TASKS.md) ---
    "task_modules": _opt(
        "Comma-separated modules that define native queue tasks (`@fleet.task` or `shared_task`). The "
        "native lane of `airflow asyncq worker` imports them at start; a module that fails to import "
        "stops the lane with its name.",
        "string", "", "mycompany.tasks.http,mycompany.tasks.reports", kind="modules",
    ),
    "loop_concurrency": _opt(
        "How many `async def` native tasks one worker's native lane runs at once on its event loop. "
        "0 together with sync_threads 0: no native lane. `--loop-concurrency` overrides it.",
        "integer", "0", "500", inclusive=True,
    ),
    "sync_threads": _opt(
        "How many plain `def` native tasks one worker's native lane runs at once, each on its own "
        "thread. `--sync-threads` overrides it.",
        "integer", "0", "8", inclusive=True,
    ),
    "result_expires": _opt(
        "Seconds a native task's result (or failure with its traceback) is kept in Redis for the "
        "QueueTaskOperator to collect.",
        "integer", "86400", "86400",
    ),
    # --- chunked operators and example DAGs (docs/OPERATORS.md, "Shared storage") ---
    "shared_storage": _opt(
        "Storage every worker host reaches, where the chunked operators keep their Parquet parts and "
        "attempt markers and the example DAGs their files: an absolute path that every host mounts "
        "(NFS, a shared volume), or an object storage URL that Airflow's ObjectStoragePath opens, with "
        "the connection id in it (s3://aws_default@bucket/prefix). Empty: the system temp dir, which "
        "is right for a one-host fleet only.",
        "string", "", "s3://aws_default@my-bucket/airflow-shared", optional=True,
    ),
}


def _for_airflow(option: Mapping[str, object]) -> dict[str, object]:
    return {key: option[key] for key in AIRFLOW_OPTION_KEYS}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-asyncq-provider",
        "name": "AsyncQ",
        "description": "AsyncQExecutor: Airflow task instances on a memory-aware Celery fleet over Redis.",
        "versions": [__version__],
        "executors": ["airflow_asyncq_provider.executors.asyncq_executor.AsyncQExecutor"],
        "cli": ["airflow_asyncq_provider.cli.definition.get_asyncq_cli_commands"],
        # The fleet page in the Airflow UI; also the `airflow.plugins` entry point (pyproject.toml).
        "plugins": [{"name": "asyncq_fleet",
                     "plugin-class": "airflow_asyncq_provider.plugins.fleet_page.AsyncQFleetPlugin"}],
        "config": {
            "asyncq": {
                "description": "AsyncQExecutor and its worker fleet (`airflow asyncq worker`).",
                "options": {name: _for_airflow(option) for name, option in CONFIG_OPTIONS.items()},
            }
        },
    }
