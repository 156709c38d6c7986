"""Typed settings: the one place that turns ``[asyncq]`` config into values we trust.

``load_settings`` is pure apart from reading the config object it is given, so tests pass a stub and
nothing reads config at import time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol
from urllib.parse import SplitResult, unquote, urlsplit

from airflow_asyncq_provider.errors import ConfigError
from airflow_asyncq_provider.get_provider_info import CONFIG_OPTIONS, ConfigOption
from airflow_asyncq_provider.redaction import mask_url
from airflow_asyncq_provider.sizes import parse_size

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
    event_wait: float = 0.5
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
    sentinel_master: str = ""
    sentinel_password: str = ""
    sentinel_ssl: bool = False
    fork_preload_modules: tuple[str, ...] = ()
    default_memory_request: int = 256 * 1024**2
    default_memory_limit: int | None = None
    worker_memory_budget: int | None = None
    worker_memory_fraction: float = 0.8
    watchdog_interval: float = 0.5
    kill_grace_period: float = 10.0
    supervisor_idle_timeout: float = 30.0
    worker_drain_timeout: float = 60.0
    event_retry_timeout: float = 300.0
    max_deliveries: int = 3
    # native queue tasks (docs/NATIVE_TASKS.md)
    task_modules: tuple[str, ...] = ()
    loop_concurrency: int = 0
    sync_threads: int = 0
    result_expires: int = 86_400
    # chunked operators and example DAGs (docs/OPERATORS.md): None means the system temp dir
    shared_storage: str | None = None


def _fix_hint(key: str) -> str:
    return f"set [{SECTION}] {key} in airflow.cfg or AIRFLOW__{SECTION.upper()}__{key.upper()}"


def _number(key: str, raw: str, option: ConfigOption) -> int | float:
    kind = int if option["type"] == "integer" else float
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(
            f"[{SECTION}] {key} must be {'an integer' if kind is int else 'a number'}, got {raw!r}; "
            f"{_fix_hint(key)}"
        ) from None
    minimum, inclusive = option["minimum"] or 0, option["inclusive"]
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ConfigError(f"[{SECTION}] {key} must be {bound}, got {raw!r}; {_fix_hint(key)}")
    return value


def _parse(key: str, raw: str, option: ConfigOption) -> Any:
    """One option's value, by the kind its declaration gives."""
    kind = option["kind"]
    if option["optional"] and not raw.strip():
        return None
    if kind in ("integer", "float"):
        return _number(key, raw, option)
    if kind == "size":
        return parse_size(raw, f"[{SECTION}] {key} ({_fix_hint(key)})")
    if kind == "modules":
        return parse_module_list(raw, f"[{SECTION}] {key} ({_fix_hint(key)})")
    if kind == "broker_url":
        return validate_broker_url(raw.strip(), f"[{SECTION}] {key}")
    if kind == "boolean":
        return _boolean(key, raw)
    return raw.strip()


def _boolean(key: str, raw: str) -> bool:
    # the spellings Airflow's conf.getboolean takes
    value = raw.strip().lower()
    if value in ("true", "t", "1"):
        return True
    if value in ("false", "f", "0"):
        return False
    raise ConfigError(f"[{SECTION}] {key} must be True or False, got {raw!r}; {_fix_hint(key)}")


SENTINEL_SCHEME = "sentinel"
SUPPORTED_SCHEMES = ("redis", "rediss", SENTINEL_SCHEME)
# What people write for Redis Cluster (redis-py's RedisCluster.from_url takes redis://, so a cluster
# behind a plain URL is caught at connect time instead: state.client.ping_or_raise).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster", "rediscluster", "redis-cluster", "cluster")
NO_CLUSTER = ("Redis Cluster is not supported: kombu's Redis transport cannot use it (celery/celery#9019); "
              "use a standalone Redis (redis://, rediss://) or Redis Sentinel (sentinel://… with "
              f"[{SECTION}] sentinel_master)")
SENTINEL_PORT = 26379  # kombu's SentinelTransport.default_port


@dataclasses.dataclass(frozen=True)
class SentinelURL:
    """A sentinel:// broker URL as kombu's SentinelChannel reads it (kombu/transport/redis.py,
    ``_sentinel_managed_pool``): every ``;``-separated part names one sentinel, and the user, password
    and database number of the *first* part are the Redis master's (kombu's Connection parses only
    ``alt[0]``; Celery's SentinelBackend takes them from ``hosts[0]``)."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int


def is_sentinel_url(url: str) -> bool:
    return url[:len(SENTINEL_SCHEME) + 3].lower() == f"{SENTINEL_SCHEME}://"


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def validate_broker_url(url: str, source: str) -> str:
    if not url:
        raise ConfigError(f"{source} is empty; set it to a Redis URL such as redis://127.0.0.1:6379/0")
    scheme = _scheme(url)
    if scheme in CLUSTER_SCHEMES:
        raise ConfigError(f"{source} is {mask_url(url)!r}: {NO_CLUSTER}")
    if scheme not in SUPPORTED_SCHEMES:
        raise ConfigError(
            f"{source} is {mask_url(url)!r}: scheme {scheme or '(none)'!r} is not supported; "
            f"use one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}"
        )
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url, source)
        return url
    if ";" in url:
        raise ConfigError(f"{source} is {mask_url(url)!r}: several ;-separated URLs are only taken as "
                          "Redis Sentinel nodes (sentinel://h1:26379;sentinel://h2:26379); name one Redis")
    parts = _split(url, scheme, source)
    if not parts.hostname:
        raise ConfigError(f"{source} is {mask_url(url)!r}: it names no host")
    return url


def _split(url: str, scheme: str, source: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        # urllib's message may quote part of the password: say only what is safe to say
        raise ConfigError(f"{source} ({scheme}://…) is not a valid URL: check the host and port") from None
    return parts


def _db(parts: SplitResult, source: str) -> int:
    path = parts.path.strip("/")
    if not path:
        return 0  # kombu's and Celery's default (kombu: Channel._prepare_virtual_host)
    if not path.isdigit():
        raise ConfigError(f"{source}: the database {path!r} is not a number; end the URL with /0, /1, ...")
    return int(path)


def parse_sentinel_url(url: str, source: str) -> SentinelURL:
    """The sentinels and the master's credentials and database of a sentinel:// URL, or a ConfigError.

    A later part may repeat the first part's password and database but not contradict them: kombu and
    Celery would silently use the first part's, so a ``/3`` written only on the last part would put the
    broker in database 0."""
    sentinels: list[tuple[str, int]] = []
    first: SplitResult | None = None
    for number, text in enumerate(url.split(";"), start=1):
        text = text.strip()
        where = f"{source} (part {number}, {mask_url(text) or 'empty'!r})"
        if _scheme(text) != SENTINEL_SCHEME:
            raise ConfigError(f"{where}: every ;-separated part of a Sentinel URL must be "
                              "sentinel://host:port, as in sentinel://h1:26379;sentinel://h2:26379/0")
        parts = _split(text, SENTINEL_SCHEME, where)
        if not parts.hostname:
            raise ConfigError(f"{where}: it names no host")
        if parts.query or parts.fragment:
            raise ConfigError(f"{where}: a Sentinel URL takes no ?options; use the [{SECTION}] options "
                              "(sentinel_password, sentinel_ssl, ssl_*)")
        _db(parts, where)
        if first is None:
            first = parts
        else:
            _agrees_with_first(first, parts, where)
        sentinels.append((parts.hostname, parts.port or SENTINEL_PORT))
    assert first is not None
    return SentinelURL(tuple(sentinels), unquote(first.username) if first.username else None,
                       unquote(first.password) if first.password is not None else None, _db(first, source))


def _agrees_with_first(first: SplitResult, later: SplitResult, where: str) -> None:
    fix = ("kombu and Celery read the user, password and database of the Redis master from the first "
           "part only: write them there (sentinel://:password@h1:26379/0;sentinel://h2:26379)")
    if later.path.strip("/") and _db(later, where) != _db(first, where):
        raise ConfigError(f"{where} names database {_db(later, where)} but the first part "
                          f"{_db(first, where)}; {fix}")
    if (later.username or later.password is not None) and (
            (later.username, later.password) != (first.username, first.password)):
        raise ConfigError(f"{where} names other credentials than the first part; {fix}")


def validate_queue_name(name: str, source: str) -> str:
    """Queue names end up as Redis keys and CLI arguments; reject the ones that silently never match."""
    stripped = name.strip()
    if not stripped or any(ch.isspace() for ch in stripped) or "," in stripped:
        raise ConfigError(
            f"{source}: queue name {name!r} is empty or contains whitespace or a comma; "
            "use names like 'default' or 'high_mem'"
        )
    return stripped


def parse_queue_list(raw: str, source: str) -> tuple[str, ...]:
    """Comma-separated queue names, as ``-q`` and ``--native-queues`` take them: each one checked by
    ``validate_queue_name`` (so an empty list or an empty item is refused), and none named twice."""
    queues = tuple(validate_queue_name(name, source) for name in raw.split(","))
    twice = sorted({queue for queue in queues if queues.count(queue) > 1})
    if twice:
        raise ConfigError(f"{source}: queue {twice[0]!r} is named twice in {raw!r}; name each queue once")
    return queues


def parse_module_list(raw: str, source: str) -> tuple[str, ...]:
    """Comma-separated dotted module names (``task_modules``, ``fork_preload_modules``); blank items
    are skipped, so "" is no module."""
    modules = tuple(m.strip() for m in raw.split(",") if m.strip())
    for module in modules:
        if not all(part.isidentifier() for part in module.split(".")):
            raise ConfigError(f"{source}: {module!r} is not a dotted module name; "
                              "use comma-separated import names like 'mycompany.tasks,pandas'")
    return modules


def load_settings(conf: ConfigSource | None = None) -> AsyncQSettings:
    """Every option of ``CONFIG_OPTIONS`` parsed as its declaration says, then the checks that span
    options; the first bad value raises a ConfigError that names it."""
    if conf is None:
        from airflow.configuration import conf as airflow_conf

        conf = airflow_conf
    values = {key: _parse(key, _raw(conf, key, option), option) for key, option in CONFIG_OPTIONS.items()}
    values["ssl_cert_reqs"] = _ssl_cert_reqs(values["ssl_cert_reqs"])
    values["shared_storage"] = _shared_storage(values["shared_storage"])
    _check_sentinel(values["broker_url"], values["sentinel_master"], values["sentinel_password"],
                    values["sentinel_ssl"])
    _check_key_prefix(values["key_prefix"])
    # One source of truth with Airflow: tasks without queue= go to [operators] default_queue.
    values["default_queue"] = validate_queue_name(
        str(conf.get("operators", "default_queue", fallback="default")), "[operators] default_queue")
    settings = AsyncQSettings(**values)
    _check_across_options(settings)
    return settings


def _raw(conf: ConfigSource, key: str, option: ConfigOption) -> str:
    value = conf.get(SECTION, key, fallback=option["default"])
    return option["default"] if value is None else str(value)


def _ssl_cert_reqs(value: str) -> str:
    value = value.lower()
    if value not in ("required", "optional", "none"):
        raise ConfigError(f"[{SECTION}] ssl_cert_reqs must be required, optional or none, got {value!r}; "
                          f"{_fix_hint('ssl_cert_reqs')}")
    return value


def _shared_storage(value: str | None) -> str | None:
    """An absolute local path (every host mounts the same one) or ``scheme://[conn_id@]bucket[/prefix]``;
    a trailing ``/`` is dropped, so paths join the same way whatever was written."""
    if value is None:
        return None
    if "://" in value:
        scheme, _, rest = value.partition("://")
        if not scheme or not rest.split("@")[-1].strip("/"):
            raise ConfigError(f"[{SECTION}] shared_storage is {mask_url(value)!r}: an object storage URL "
                              "names a bucket, as in s3://aws_default@my-bucket/airflow-shared; "
                              f"{_fix_hint('shared_storage')}")
        return value.rstrip("/")
    if not value.startswith("/"):
        raise ConfigError(f"[{SECTION}] shared_storage is {value!r}: a local path must be absolute, the "
                          f"mount point every host shares (e.g. /mnt/airflow-shared); {_fix_hint('shared_storage')}")
    return value.rstrip("/") or "/"


def _check_sentinel(url: str, master: str, password: str, use_ssl: bool) -> None:
    """sentinel_master is required with a sentinel:// URL (kombu's SentinelChannel raises a bare
    ValueError without its ``master_name``), and the sentinel options are refused with any other URL:
    left over, they would let an operator believe the fleet follows a failover when it does not."""
    if is_sentinel_url(url):
        require_sentinel_master(url, master)
        return
    extra = [name for name, value in (("sentinel_master", master), ("sentinel_password", password),
                                      ("sentinel_ssl", use_ssl)) if value]
    if extra:
        raise ConfigError(f"[{SECTION}] {', '.join(extra)} {'is' if len(extra) == 1 else 'are'} set but "
                          f"broker_url is {mask_url(url)!r}, not a sentinel:// URL; use "
                          "sentinel://host1:26379;sentinel://host2:26379/0 or unset "
                          f"{'it' if len(extra) == 1 else 'them'}")


def require_sentinel_master(url: str, master: str) -> str:
    if not master.strip():
        raise ConfigError(f"[{SECTION}] broker_url is the Sentinel URL {mask_url(url)!r} but "
                          f"[{SECTION}] sentinel_master is empty; set it to the name the sentinels "
                          "monitor (`SENTINEL MASTERS` on a sentinel lists it), "
                          f"{_fix_hint('sentinel_master')}")
    return master.strip()


def _check_key_prefix(value: str) -> None:
    if not value or any(ch.isspace() for ch in value):
        raise ConfigError(f"[{SECTION}] key_prefix must be a non-empty word, got {value!r}; "
                          f"{_fix_hint('key_prefix')}")


def _check_across_options(settings: AsyncQSettings) -> None:
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
