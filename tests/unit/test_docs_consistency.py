"""The deployment files and the docs agree with the code: fast, no services, no Docker.

docker-compose.yaml is parsed with PyYAML (merge keys resolved, no ${VAR} interpolation), and the docs'
generated [asyncq] table is compared with what devtools/config_table.py renders from the provider's
option declarations now.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from airflow_asyncq_provider.broker.config import _WEIGHT_THRESHOLDS, PRIORITY_STEPS, priority_step
from airflow_asyncq_provider.get_provider_info import CONFIG_OPTIONS, get_provider_info

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
CONFIGURATION = REPO / "docs" / "CONFIGURATION.md"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
README = REPO / "README.md"

EXECUTOR_PATH = "airflow_asyncq_provider.executors.AsyncQExecutor"
REQUIRED_SERVICES = {"postgres", "redis", "airflow-init", "api-server", "scheduler", "dag-processor",
                     "triggerer", "asyncq-worker", "flower"}
LONG_RUNNING_AIRFLOW = {"api-server", "scheduler", "dag-processor", "triggerer", "asyncq-worker", "flower"}
# Variables devtools/stack.py sets that the compose deployment deliberately does differently.
STACK_ONLY = {
    "AIRFLOW__API__PORT",  # compose: fixed 8080 inside the container, published as ${AIRFLOW_API_PORT}
    "AIRFLOW__CORE__DAGS_FOLDER",  # compose: the image default /opt/airflow/dags, bind-mounted
    "AIRFLOW__LOGGING__BASE_LOG_FOLDER",  # compose: the default /opt/airflow/logs, a shared volume
    "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR",  # no such option in Airflow 3.3
    "AIRFLOW__CELERY__BROKER_URL",  # only for the CeleryExecutor benchmark comparison
    "AIRFLOW__CELERY__RESULT_BACKEND",
}


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config_table() -> ModuleType:
    return _load("asyncq_devtools_config_table", REPO / "devtools" / "config_table.py")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "no services: mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def airflow_image(compose: dict[str, Any]) -> str:
    return compose["x-airflow-common"]["image"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=value list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _airflow_services(services: dict[str, dict[str, Any]], image: str) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if svc.get("image") == image or "build" in svc}


def _seconds(duration: str) -> float:
    """Compose durations such as 90s, 2m, 1m30s, and ${VAR:-2m} (its default)."""
    text = str(duration).strip()
    default = re.fullmatch(r"\$\{[A-Z0-9_]+:-([^}]+)\}", text)
    if default:
        text = default.group(1)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"cannot read duration {duration!r}"
    factor = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * factor[u] for n, u in parts)


# ------------------------------------------------------------------ docker-compose.yaml
def test_compose_has_every_required_service(services: dict[str, Any]) -> None:
    missing = REQUIRED_SERVICES - set(services)
    assert not missing, f"docker-compose.yaml lacks services {sorted(missing)}"


def test_worker_service_scales(services: dict[str, Any]) -> None:
    worker = services["asyncq-worker"]
    assert "container_name" not in worker, "a container_name breaks `--scale asyncq-worker=N`"
    assert "hostname" not in worker, "one fixed hostname would give every replica the same Celery node name"
    assert worker.get("command")[:3] == ["airflow", "asyncq", "worker"]
    assert not worker.get("profiles"), "the worker must start with a plain `docker compose up`"


def test_flower_is_behind_its_profile(services: dict[str, Any]) -> None:
    flower = services["flower"]
    assert flower.get("profiles") == ["flower"]
    command = " ".join(flower["command"]) if isinstance(flower["command"], list) else flower["command"]
    assert "celery" in command and "--broker=" in command and "flower" in command
    for name in REQUIRED_SERVICES - {"flower"}:
        assert not services[name].get("profiles"), f"{name} must not need a profile"


def test_every_airflow_service_runs_the_asyncq_executor(services: dict[str, Any], airflow_image: str) -> None:
    airflow = _airflow_services(services, airflow_image)
    assert set(airflow) >= LONG_RUNNING_AIRFLOW | {"airflow-init"}
    for name, service in airflow.items():
        assert _env(service).get("AIRFLOW__CORE__EXECUTOR") == EXECUTOR_PATH, name


def test_executor_path_names_the_executor() -> None:
    """The compose path is the package re-export; the provider registers the module path behind it."""
    stack = _load("asyncq_devtools_stack", REPO / "devtools" / "stack.py")
    assert stack.ASYNCQ_EXECUTOR == EXECUTOR_PATH
    init = (REPO / "airflow_asyncq_provider" / "executors" / "__init__.py").read_text()
    assert "from airflow_asyncq_provider.executors.asyncq_executor import AsyncQExecutor" in init
    assert get_provider_info()["executors"] == ["airflow_asyncq_provider.executors.asyncq_executor.AsyncQExecutor"]


def test_airflow_services_share_one_configuration(services: dict[str, Any], airflow_image: str) -> None:
    """Secrets, database, broker and bundles must be identical everywhere (they come from one anchor)."""
    shared = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
              "AIRFLOW__ASYNCQ__BROKER_URL", "AIRFLOW__ASYNCQ__KEY_PREFIX",
              "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST")
    airflow = _airflow_services(services, airflow_image)
    for key in shared:
        values = {name: _env(svc).get(key) for name, svc in airflow.items()}
        assert len(set(values.values())) == 1 and None not in values.values(), f"{key} differs: {values}"


def test_compose_sets_what_the_local_stack_sets(tmp_path: Path, services: dict[str, Any]) -> None:
    stack = _load("asyncq_devtools_stack", REPO / "devtools" / "stack.py")
    env = stack.Stack(tmp_path, sql_conn="postgresql+psycopg2://airflow:airflow@localhost/airflow",
                      broker_url="redis://127.0.0.1:6379/0").env
    wanted = {k for k in env if k.startswith("AIRFLOW__")} - STACK_ONLY
    missing = wanted - set(_env(services["scheduler"]))
    assert not missing, (f"devtools/stack.py sets {sorted(missing)} but docker-compose.yaml does not; "
                         "add them to x-airflow-common (or to STACK_ONLY here, saying why)")


def test_compose_wiring(services: dict[str, Any]) -> None:
    env = _env(services["scheduler"])
    api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert (api.hostname, api.path) == ("api-server", "/execution/")
    assert str(api.port or 80) in {str(p).rsplit(":", 1)[-1] for p in services["api-server"]["ports"]}
    db = urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert db.scheme == "postgresql+psycopg2" and db.hostname == "postgres"
    default_broker = re.fullmatch(r"\$\{ASYNCQ_BROKER_URL:-([^}]+)\}", env["AIRFLOW__ASYNCQ__BROKER_URL"])
    assert default_broker, env["AIRFLOW__ASYNCQ__BROKER_URL"]
    broker = urlsplit(default_broker.group(1))
    assert broker.scheme == "redis" and broker.hostname == "redis"
    for key, placeholder in (("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW_JWT_SECRET"),
                             ("AIRFLOW__API__SECRET_KEY", "AIRFLOW_API_SECRET_KEY")):
        assert re.fullmatch(r"\$\{" + placeholder + r":-[^}]+\}", env[key]), (
            f"{key} must be an env placeholder with a default, got {env[key]!r}")
    assert services["postgres"]["image"].split(":")[1].startswith("16")
    assert services["redis"]["image"].split(":")[1].startswith("7")
    redis_command = services["redis"]["command"]
    assert "--appendonly" in redis_command and "--save" in redis_command, "Redis must default to no persistence"


def test_worker_logs_reach_the_api_server(services: dict[str, Any]) -> None:
    def logs_volume(service: dict[str, Any]) -> str | None:
        for volume in service.get("volumes") or []:
            source, _, rest = str(volume).partition(":")
            if rest.split(":")[0] == "/opt/airflow/logs":
                return source
        return None

    assert logs_volume(services["asyncq-worker"]) is not None
    assert logs_volume(services["asyncq-worker"]) == logs_volume(services["api-server"]), (
        "finished task logs are only visible if workers and the api-server share the log folder")
    worker_env = _env(services["asyncq-worker"])
    assert worker_env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == "8793"
    assert worker_env.get("AIRFLOW__CORE__HOSTNAME_CALLABLE") == "airflow.utils.net.get_host_ip_address"
    assert worker_env.get("DUMB_INIT_SETSID") == "0", "docker stop must signal the worker, not its process group"


def test_bundles_point_at_the_example_dags_the_image_installs(services: dict[str, Any]) -> None:
    bundles = json.loads(_env(services["dag-processor"])["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"])
    by_name = {b["name"]: b for b in bundles}
    assert set(by_name) == {"dags-folder", "asyncq-examples"}
    path = by_name["asyncq-examples"]["kwargs"]["path"]
    env_line = re.search(r"^ENV ASYNCQ_EXAMPLE_DAGS=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert env_line, "docker/Dockerfile must declare ENV ASYNCQ_EXAMPLE_DAGS (it checks the path at build)"
    assert path == env_line.group(1)
    assert path.endswith("/site-packages/airflow_asyncq_provider/example_dags")
    assert (REPO / "airflow_asyncq_provider" / "example_dags" / "asyncq_quickstart.py").is_file()


def test_healthchecks_and_startup_order(services: dict[str, Any]) -> None:
    for name in {"postgres", "redis"} | LONG_RUNNING_AIRFLOW:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in LONG_RUNNING_AIRFLOW - {"flower"}:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    assert services["asyncq-worker"]["depends_on"]["api-server"]["condition"] == "service_healthy"
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["airflow-init"]["command"] == ["airflow", "db", "migrate"]
    assert services["airflow-init"].get("restart") == "no"


def test_worker_stop_grace_outlasts_the_drain(services: dict[str, Any]) -> None:
    env = _env(services["asyncq-worker"])

    def effective(option: str) -> float:
        raw = env.get(f"AIRFLOW__ASYNCQ__{option.upper()}", CONFIG_OPTIONS[option]["default"])
        default = re.fullmatch(r"\$\{[A-Z0-9_]+:-([^}]+)\}", raw)
        return float(default.group(1) if default else raw)

    grace = _seconds(services["asyncq-worker"].get("stop_grace_period", "10s"))
    # the drain, SIGKILL to the task after one grace, SIGKILL to the supervisor's group after a second
    drain = effective("worker_drain_timeout") + 2 * effective("kill_grace_period")
    assert grace >= drain + 10, (f"stop_grace_period {grace:g} s would kill the worker during its "
                                 f"{drain:g} s drain")


def test_dockerfile_builds_on_airflow_and_installs_the_repo() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM apache/airflow:3\.3\.2-python3\.11$", text, re.MULTILINE)
    assert "[postgres,data]" in text, "the shipped chunked examples need pandas and pyarrow (the data extra)"
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in text, "pin Airflow so pip cannot replace the image's"


def test_docker_compose_config_accepts_the_file() -> None:
    """``docker compose config`` validates the file without an engine; .ci/run installs Debian's
    docker-compose where no compose CLI exists, so this never skips in CI."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            continue
        for profile in ([], ["--profile", "flower"], ["--profile", "sentinel"]):
            result = subprocess.run([*command, "-f", str(COMPOSE), *profile, "config", "--quiet"],
                                    capture_output=True, text=True, timeout=60, cwd=REPO)
            assert result.returncode == 0, result.stderr
        return
    pytest.fail("no docker compose CLI: install Debian's docker-compose (`apt-get install -y docker-compose`) "
                "or Docker's compose plugin; .ci/run does")


# ------------------------------------------------------------------ generated config table
def test_configuration_doc_has_the_current_table(config_table: ModuleType) -> None:
    problem = config_table.check_file(CONFIGURATION)
    assert problem is None, problem


def test_readme_has_the_current_table(config_table: ModuleType) -> None:
    text = README.read_text(encoding="utf-8")
    assert config_table.START in text and config_table.END in text, (
        f"README.md has no {config_table.START} / {config_table.END} markers; add them and run "
        "`python devtools/config_table.py --write README.md`")
    problem = config_table.check_file(README)
    assert problem is None, problem


def test_table_lists_every_option(config_table: ModuleType) -> None:
    table = config_table.render_table()
    rows = table.splitlines()[2:]
    assert len(rows) == len(CONFIG_OPTIONS)
    for name, spec in CONFIG_OPTIONS.items():
        row = next(r for r in rows if r.startswith(f"| `{name}`"))
        assert f"`AIRFLOW__ASYNCQ__{name.upper()}`" in row
        assert ("(sensitive)" in row) == bool(spec.get("sensitive")), name
        assert row.count(" | ") == 4, f"a stray | breaks the row of {name}"


def test_config_table_check_and_write(tmp_path: Path, config_table: ModuleType) -> None:
    table = config_table.render_table()
    doc = tmp_path / "doc.md"
    doc.write_text(f"# t\n\n{config_table.START}\nstale\n{config_table.END}\n\nafter\n")
    assert config_table.check_file(doc) is not None
    assert config_table.main(["--check", str(doc)]) == 1
    assert config_table.main(["--write", str(doc)]) == 0
    assert config_table.main(["--check", str(doc)]) == 0
    assert doc.read_text() == f"# t\n\n{config_table.START}\n{table}\n{config_table.END}\n\nafter\n"
    assert config_table.write_file(doc) is False  # already current: the file is left alone
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# nothing here\n")
    assert "exactly one" in config_table.check_file(no_markers)
    assert config_table.main(["--write", str(no_markers)]) == 1
    assert config_table.main(["--check", str(tmp_path / "missing.md")]) == 1


def test_config_table_escapes_cells(config_table: ModuleType) -> None:
    table = config_table.render_table({"x": {"description": "a | b\n  c", "type": "string", "default": "",
                                             "example": None, "sensitive": True}})
    row = table.splitlines()[2]
    assert row.startswith("| `x` (sensitive) | `AIRFLOW__ASYNCQ__X` | `string` | (empty) | a \\| b c")


# ------------------------------------------------------------------ docs that restate code
def test_priority_table_matches_priority_step() -> None:
    """docs/CONFIGURATION.md's weight -> step table is celery_app.priority_step, row by row."""
    text = CONFIGURATION.read_text()
    assert len(PRIORITY_STEPS) == len(_WEIGHT_THRESHOLDS) + 1 == 10
    rows = [f"| {_WEIGHT_THRESHOLDS[0]} and more | 0 |"]
    for step in range(1, len(_WEIGHT_THRESHOLDS)):
        low, high = _WEIGHT_THRESHOLDS[step], _WEIGHT_THRESHOLDS[step - 1] - 1
        assert priority_step(low) == priority_step(high) == step
        rows.append(f"| {low} – {high} | {step} |" if low != high else f"| {low} | {step} |")
    last = len(_WEIGHT_THRESHOLDS)
    assert priority_step(_WEIGHT_THRESHOLDS[-1] - 1) == priority_step(-5) == last
    rows.append(f"| {_WEIGHT_THRESHOLDS[-1] - 1} and less (also negative) | {last} |")
    assert priority_step(10**9) == 0
    for row in rows:
        assert row in text, f"docs/CONFIGURATION.md lacks the priority row {row!r}"


def test_operations_doc_lists_every_exit_code() -> None:
    from airflow_asyncq_provider import exitcodes
    from airflow_asyncq_provider.worker import command, forkserver

    text = OPERATIONS.read_text()
    codes = {v for k, v in vars(exitcodes).items() if k.isupper() and isinstance(v, int)}
    assert codes == {0, 1, 2, 3, 4, 5, 6}
    assert re.search(rf"^\| {exitcodes.UNHEALTHY} \| ", text, re.MULTILINE), "the probe's exit code is not documented"
    worker_codes = codes - {exitcodes.UNHEALTHY}  # only `airflow asyncq probe` exits UNHEALTHY
    for code in sorted(worker_codes):
        assert f"  {code}  " in (command.__doc__ or ""), f"worker/command.py's docstring lacks exit code {code}"
    for code in sorted(worker_codes):
        assert re.search(rf"^\| {code} \| ", text, re.MULTILINE), f"worker exit code {code} is not documented"
    for code in (forkserver.EXIT_DUPLICATE, forkserver.EXIT_CRASHED):
        assert re.search(rf"^\| {code} \| ", text, re.MULTILINE), f"workload exit code {code} is not documented"
    assert f"64 + n ({forkserver.EXIT_SIGNAL_BASE + 1}–127)" in text


def test_operations_doc_names_every_redis_key() -> None:
    """Every key ``state/keys.py`` builds is a row of the table, and every row is a key it builds."""
    import inspect

    from airflow_asyncq_provider.state.keys import Keys

    keys = Keys("asyncq")
    names = set()
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            value = getattr(keys, name)
        elif callable(member):
            value = getattr(keys, name)("<node>" if name in ("worker", "maintenance") else "<id>")
        else:
            continue
        if not value.endswith(":"):  # a prefix (native_result_prefix) is not a key of its own
            names.add(value)
    text = OPERATIONS.read_text()
    table = text[text.index("## What the fleet keeps in Redis"):]
    rows = set(re.findall(r"^\| `(asyncq:[^`]+)` \|", table, re.MULTILINE))
    assert rows == names, f"docs/OPERATIONS.md's key table differs from state/keys.py: {rows ^ names}"


def test_python_floor_is_the_same_everywhere() -> None:
    """requires-python, the classifiers and the README promise the same floor (3.11: asyncio.timeout)."""
    import sys
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floor = re.match(r">=3\.(\d+)", project["requires-python"])
    assert floor, project["requires-python"]
    minor = int(floor.group(1))
    versions = {int(c.rsplit(".", 1)[1]) for c in project["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert min(versions) == minor
    assert f"Python 3.{minor}+" in README.read_text()
    assert sys.version_info >= (3, minor)


def test_compose_worker_has_a_memory_limit(services: dict[str, Any]) -> None:
    """A replica's memory budget is a fraction of its cgroup limit; without one, every replica would
    budget 80 % of the whole host (memory/admission.py: machine_memory)."""
    limit = services["asyncq-worker"].get("mem_limit") or (
        services["asyncq-worker"].get("deploy", {}).get("resources", {}).get("limits", {}).get("memory"))
    assert limit, "give asyncq-worker a mem_limit"


def test_compose_sentinel_profile_monitors_the_redis_service(services: dict[str, Any]) -> None:
    """Three sentinels (a quorum of 2) and a replica, all behind a profile, so a plain `up` is unchanged."""
    sentinels = [name for name in services if name.startswith("sentinel-")]
    assert len(sentinels) == 3
    for name in [*sentinels, "redis-replica"]:
        assert services[name].get("profiles") == ["sentinel"], name
    for name in sentinels:
        script = " ".join(services[name]["command"])
        assert "sentinel monitor asyncq redis 6379 2" in script and "--sentinel" in script, name
    env = _env(services["asyncq-worker"])
    assert env["AIRFLOW__ASYNCQ__BROKER_URL"] == "${ASYNCQ_BROKER_URL:-redis://redis:6379/0}"
    assert env["AIRFLOW__ASYNCQ__SENTINEL_MASTER"] == "${ASYNCQ_SENTINEL_MASTER:-}"
