"""Typed settings: the one place that turns ``[asyncq]`` config into values we trust.

``load_settings`` is pure apart from reading the config object it is given, so tests pass a stub and
nothing reads config at import time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.get_provider_info import CONFIG_OPTIONS
from airflow_asyncq_provider.memory.sizes import parse_size
from airflow_asyncq_provider.state.urls import validate_broker_url

SECTION = "asyncq"


class ConfigSource(Protocol):
    def get(self, section: str, key: str, fallback: Any = ...) -> Any: ...


@dataclasses.dataclass(frozen=True)
class AsyncQSettings:
    broker_url: str
    default_queue: str = "default"
    worker_concurrency: int = 8
    publish_timeout: float = 5.0
    publish_max_retries: int = 3
    event_batch_size: int = 5000
    event_stream_maxlen: int = 200_000
    state_ttl: int = 604_800
    worker_heartbeat_interval: float = 5.0
    worker_lost_timeout: float = 30.0
    unconsumed_queue_warning: float = 60.0
    visibility_timeout: int = 3600
    key_prefix: str = "asyncq"
    ssl_ca_certs: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_cert_reqs: str = "required"
    fork_preload_modules: tuple[str, ...] = ()
    default_memory_request: int = 256 * 1024**2
    default_memory_limit: int | None = None
    worker_memory_budget: int | None = None
    worker_memory_fraction: float = 0.8
    watchdog_interval: float = 0.5
    kill_grace_period: float = 10.0
    worker_drain_timeout: float = 60.0
    event_retry_timeout: float = 300.0
    max_deliveries: int = 3
    # native queue tasks (docs/NATIVE_TASKS.md)
    task_modules: tuple[str, ...] = ()
    loop_concurrency: int = 0
    sync_threads: int = 0
    result_expires: int = 86_400


def _fix_hint(key: str) -> str:
    return f"set [{SECTION}] {key} in airflow.cfg or AIRFLOW__{SECTION.upper()}__{key.upper()}"


def _number(key: str, raw: str, kind: type, minimum: float, allow_equal: bool = False) -> Any:
    try:
        value = kind(str(raw).strip())
    except ValueError:
        raise ConfigError(
            f"[{SECTION}] {key} must be {'an integer' if kind is int else 'a number'}, got {raw!r}; "
            f"{_fix_hint(key)}"
        ) from None
    if not math.isfinite(value) or value < minimum or (value == minimum and not allow_equal):
        bound = f">= {minimum}" if allow_equal else f"> {minimum}"
        raise ConfigError(f"[{SECTION}] {key} must be {bound}, got {raw!r}; {_fix_hint(key)}")
    return value


def _size(key: str, raw: str, optional: bool = False) -> int | None:
    if optional and not raw.strip():
        return None
    return parse_size(raw, f"[{SECTION}] {key} ({_fix_hint(key)})")


def _module_list(key: str, raw: str) -> tuple[str, ...]:
    modules = tuple(m.strip() for m in raw.split(",") if m.strip())
    for module in modules:
        if not all(part.isidentifier() for part in module.split(".")):
            raise ConfigError(f"[{SECTION}] {key}: {module!r} is not a dotted module name; {_fix_hint(key)}")
    return modules


def validate_queue_name(name: str, source: str) -> str:
    """Queue names end up as Redis keys and CLI arguments; reject the ones that silently never match."""
    stripped = name.strip()
    if not stripped or any(ch.isspace() for ch in stripped) or "," in stripped:
        raise ConfigError(
            f"{source}: queue name {name!r} is empty or contains whitespace or a comma; "
            "use names like 'default' or 'high_mem'"
        )
    return stripped


def load_settings(conf: ConfigSource | None = None) -> AsyncQSettings:
    if conf is None:
        from airflow.configuration import conf as airflow_conf

        conf = airflow_conf

    def raw(key: str) -> str:
        default = CONFIG_OPTIONS[key]["default"]
        value = conf.get(SECTION, key, fallback=default)
        return default if value is None else str(value)

    ssl_cert_reqs = raw("ssl_cert_reqs").strip().lower()
    if ssl_cert_reqs not in ("required", "optional", "none"):
        raise ConfigError(
            f"[{SECTION}] ssl_cert_reqs must be required, optional or none, got {ssl_cert_reqs!r}; "
            f"{_fix_hint('ssl_cert_reqs')}"
        )
    key_prefix = raw("key_prefix").strip()
    if not key_prefix or any(ch.isspace() for ch in key_prefix):
        raise ConfigError(f"[{SECTION}] key_prefix must be a non-empty word, got {key_prefix!r}")
    settings = AsyncQSettings(
        broker_url=validate_broker_url(raw("broker_url").strip(), f"[{SECTION}] broker_url"),
        # One source of truth with Airflow: tasks without queue= go to [operators] default_queue.
        default_queue=validate_queue_name(str(conf.get("operators", "default_queue", fallback="default")),
                                          "[operators] default_queue"),
        worker_concurrency=_number("worker_concurrency", raw("worker_concurrency"), int, 0),
        publish_timeout=_number("publish_timeout", raw("publish_timeout"), float, 0),
        publish_max_retries=_number("publish_max_retries", raw("publish_max_retries"), int, 0, True),
        event_batch_size=_number("event_batch_size", raw("event_batch_size"), int, 0),
        event_stream_maxlen=_number("event_stream_maxlen", raw("event_stream_maxlen"), int, 1000, True),
        state_ttl=_number("state_ttl", raw("state_ttl"), int, 60, True),
        worker_heartbeat_interval=_number(
            "worker_heartbeat_interval", raw("worker_heartbeat_interval"), float, 0
        ),
        worker_lost_timeout=_number("worker_lost_timeout", raw("worker_lost_timeout"), float, 0),
        unconsumed_queue_warning=_number(
            "unconsumed_queue_warning", raw("unconsumed_queue_warning"), float, 0
        ),
        visibility_timeout=_number("visibility_timeout", raw("visibility_timeout"), int, 0),
        key_prefix=key_prefix,
        ssl_ca_certs=raw("ssl_ca_certs").strip(),
        ssl_certfile=raw("ssl_certfile").strip(),
        ssl_keyfile=raw("ssl_keyfile").strip(),
        ssl_cert_reqs=ssl_cert_reqs,
        fork_preload_modules=tuple(m.strip() for m in raw("fork_preload_modules").split(",") if m.strip()),
        default_memory_request=_size("default_memory_request", raw("default_memory_request")),
        default_memory_limit=_size("default_memory_limit", raw("default_memory_limit"), optional=True),
        worker_memory_budget=_size("worker_memory_budget", raw("worker_memory_budget"), optional=True),
        worker_memory_fraction=_number("worker_memory_fraction", raw("worker_memory_fraction"), float, 0),
        watchdog_interval=_number("watchdog_interval", raw("watchdog_interval"), float, 0),
        kill_grace_period=_number("kill_grace_period", raw("kill_grace_period"), float, 0),
        worker_drain_timeout=_number("worker_drain_timeout", raw("worker_drain_timeout"), float, 0, True),
        event_retry_timeout=_number("event_retry_timeout", raw("event_retry_timeout"), float, 0),
        max_deliveries=_number("max_deliveries", raw("max_deliveries"), int, 0),
        # native queue tasks
        task_modules=_module_list("task_modules", raw("task_modules")),
        loop_concurrency=_number("loop_concurrency", raw("loop_concurrency"), int, 0, True),
        sync_threads=_number("sync_threads", raw("sync_threads"), int, 0, True),
        result_expires=_number("result_expires", raw("result_expires"), int, 0),
    )
    if settings.worker_memory_fraction > 1:
        raise ConfigError(f"[{SECTION}] worker_memory_fraction must be at most 1, got "
                          f"{settings.worker_memory_fraction}; {_fix_hint('worker_memory_fraction')}")
    if (settings.default_memory_limit is not None
            and settings.default_memory_limit < settings.default_memory_request):
        raise ConfigError(f"[{SECTION}] default_memory_limit is below default_memory_request; "
                          "the limit must be at least the request")
    if settings.worker_lost_timeout < 2 * settings.worker_heartbeat_interval:
        raise ConfigError(
            f"[{SECTION}] worker_lost_timeout ({settings.worker_lost_timeout}) must be at least twice "
            f"worker_heartbeat_interval ({settings.worker_heartbeat_interval}), or one late heartbeat "
            "would report a healthy worker lost"
        )
    return settings
