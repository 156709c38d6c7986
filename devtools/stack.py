"""Start a real Airflow 3 deployment as local processes: the docker-compose topology without Docker.

Used by ``make demo``, the system tests and the benchmarks, so all three run the same thing:
api-server, scheduler, dag-processor, triggerer and N ``airflow asyncq worker`` processes (or, for
benchmarks, another executor), each with its log in ``<home>/logs/<component>.log``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "airflow_asyncq_provider" / "example_dags"
ASYNCQ_EXECUTOR = "airflow_asyncq_provider.executors.AsyncQExecutor"
TERMINAL_RUN_STATES = {"success", "failed"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


class Stack:
    def __init__(self, home: Path, *, sql_conn: str, broker_url: str, executor: str = ASYNCQ_EXECUTOR,
                 key_prefix: str = "asyncq", dags_folder: Path = REPO / "dags",
                 extra_env: dict[str, str] | None = None, password: str = "admin") -> None:
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        self.password = password
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._tokens: dict[str, str] = {}
        bundles = [
            {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {}},
            {"name": "asyncq-examples", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {"path": str(EXAMPLES), "refresh_interval": 0}},
        ]
        passwords = home / "simple_auth_manager_passwords.json"
        # A viewer too, so UI tests can tell reading from acting (the fleet page's actions need admin).
        passwords.write_text(json.dumps({"admin": password, "viewer": "viewer"}))
        secrets_file = home / "secrets.json"
        if not secrets_file.exists():
            secrets_file.write_text(json.dumps({"jwt": secrets.token_urlsafe(32),
                                                "api": secrets.token_urlsafe(32)}))
        keys = json.loads(secrets_file.read_text())
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")},
            "AIRFLOW_HOME": str(home),
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__PARALLELISM": "32",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.api_port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_conn,
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.api_port}",
            "AIRFLOW__API__SECRET_KEY": keys["api"],
            "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt"],
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.logs / "tasks"),
            "AIRFLOW__ASYNCQ__BROKER_URL": broker_url,
            "AIRFLOW__ASYNCQ__KEY_PREFIX": key_prefix,
            # What every "host" reaches, as compose's shared volume: chunk parts and example files.
            "AIRFLOW__ASYNCQ__SHARED_STORAGE": str(home / "shared"),
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + sql_conn if sql_conn.startswith("postgres") else "",
            **(extra_env or {}),
        }

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # ------------------------------------------------------------ processes
    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([airflow_bin(), *args], env=self.env, check=check, timeout=timeout,
                              capture_output=True, text=True)

    def migrate(self) -> None:
        result = self.run("db", "migrate", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen([airflow_bin(), *args], env={**self.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_core(self) -> None:
        self.spawn("api-server", "api-server", "--port", str(self.api_port))
        self.spawn("dag-processor", "dag-processor")
        self.spawn("scheduler", "scheduler")
        self.spawn("triggerer", "triggerer")

    def start_worker(self, name: str, queues: str = "default", concurrency: int = 4,
                     serve_logs: bool = True, memory_budget: str | None = None,
                     env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        """``env`` is added to the stack's (e.g. a TMPDIR of its own, to stand in for another host)."""
        args = ["asyncq", "worker", "-q", queues, "-c", str(concurrency), "--hostname", f"{name}@%h"]
        if memory_budget:
            args += ["--memory-budget", memory_budget]
        if not serve_logs:
            args.append("--skip-serve-logs")
        return self.spawn(name, *args, *extra_args, env={"ASYNCQ_WORKER_NAME": name, **(env or {})})

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def stop(self) -> None:
        for name in list(self.procs):
            try:
                os.killpg(self.procs[name].pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for proc in list(self.procs.values()):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        self.procs.clear()

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode}; log tail:\n{tail}")

    # ------------------------------------------------------------ REST API
    def api(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.api_url + path, data=data, method=method, headers=headers)
        # A GET is safe to repeat: on a loaded 2-core machine one api-server answer can take longer than
        # the socket timeout, which says nothing about what the test checks. Writes are never repeated.
        attempts = 3 if method == "GET" else 1
        for attempt in range(1, attempts + 1):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    raw = response.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as exc:
                raise RuntimeError(f"{method} {path} -> {exc.code}: {exc.read()[:2000]!r}") from None
            except (TimeoutError, ConnectionError, urllib.error.URLError):
                if attempt == attempts:
                    raise
                time.sleep(2)
        raise AssertionError("unreachable")

    def token(self, user: str = "admin") -> str:
        """A bearer token of ``user``: "admin" (role admin) or "viewer" (role viewer)."""
        if user not in self._tokens:
            password = self.password if user == "admin" else user
            reply = self.api("POST", "/auth/token", {"username": user, "password": password}, auth=False)
            self._tokens[user] = reply["access_token"]
        return self._tokens[user]

    def wait_api(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(self.api_url + "/api/v2/monitor/health", timeout=5):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        raise TimeoutError(f"api-server did not answer on {self.api_url} within {timeout} s")

    def wait_dag(self, dag_id: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                self.api("GET", f"/api/v2/dags/{dag_id}")
                return
            except RuntimeError:
                time.sleep(2)
        raise TimeoutError(f"DAG {dag_id} was not parsed within {timeout} s")

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)["dag_run_id"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            state = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in TERMINAL_RUN_STATES:
                return state
            time.sleep(1)
        raise TimeoutError(f"run {dag_id}/{run_id} did not finish within {timeout} s; its task instances: "
                           f"{self._ti_summary(dag_id, run_id)}")

    def _ti_summary(self, dag_id: str, run_id: str) -> str:
        """Each task instance's state, try and host: what a timed-out test needs to say why."""
        try:
            tis = self.task_instances(dag_id, run_id)
        except (RuntimeError, OSError) as exc:
            return f"(could not read them: {exc})"
        return ", ".join(f"{ti['task_id']}[{ti['map_index']}]={ti['state']} try {ti.get('try_number')} "
                         f"on {ti.get('hostname') or '-'}" for ti in tis)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run, paging past the api-server's maximum page size (100)."""
        found: list[dict[str, Any]] = []
        while True:
            reply = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
                                    f"?limit=100&offset={len(found)}&order_by=map_index")
            found.extend(reply["task_instances"])
            if not reply["task_instances"] or len(found) >= reply["total_entries"]:
                return found

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Any:
        reply = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/"
                                f"xcomEntries/return_value?map_index={map_index}&deserialize=true")
        return reply["value"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        reply = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/"
                                f"{try_number}?map_index={map_index}&full_content=true")
        content = reply.get("content", "")
        if isinstance(content, list):
            return "\n".join(json.dumps(c) if not isinstance(c, str) else c for c in content)
        return str(content)
