"""One Airflow deployment per executor under test, built on ``devtools.stack.Stack``.

``Stack`` always runs the ``airflow`` next to the current interpreter and only knows how to start
``airflow asyncq worker``. The CeleryExecutor comparison needs a second venv (provider 3.26 cannot
import with celery 5.7), so ``BenchStack`` chooses the ``airflow`` binary and starts any worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from pathlib import Path

import psutil

from devtools.stack import ASYNCQ_EXECUTOR, TERMINAL_RUN_STATES, Stack, free_port

REPO = Path(__file__).resolve().parents[1]
BENCH_DAGS = REPO / "bench" / "dags"
MAIN_AIRFLOW = REPO / ".venv" / "bin" / "airflow"
CELERY_AIRFLOW = REPO / ".venv-celery" / "bin" / "airflow"
PG_DSN = "postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"
REDIS_URL = "redis://127.0.0.1:6379/{db}"
WORKER = "worker"  # the worker's component name (its log is worker.log); with K > 1, worker1 .. workerK
READY = re.compile(rb"@\S+ ready\.")


@dataclasses.dataclass(frozen=True)
class ExecutorSpec:
    name: str  # short name: database suffix, JSON key
    label: str  # what the table prints
    executor: str  # [core] executor
    airflow: Path
    redis_db: int

    @property
    def database(self) -> str:
        return f"asyncq_bench_{self.name}"

    @property
    def sql_conn(self) -> str:
        return PG_DSN.format(db=self.database)

    @property
    def broker_url(self) -> str:
        return REDIS_URL.format(db=self.redis_db)

    def worker_args(self, concurrency: int, node: str = "bench") -> list[str] | None:
        """The worker command for this executor (Celery node ``node@host``), or None when the scheduler
        runs the tasks itself."""
        if self.name == "asyncq":
            return ["asyncq", "worker", "-q", "default", "-c", str(concurrency), "--hostname", f"{node}@%h"]
        if self.name == "celery":
            # Airflow's defaults otherwise (prefork pool, mingle and gossip on), as users run it.
            return ["celery", "worker", "-q", "default", "-c", str(concurrency), "-H", f"{node}@%h"]
        return None


EXECUTORS = {
    spec.name: spec
    for spec in (
        ExecutorSpec("asyncq", "AsyncQ", ASYNCQ_EXECUTOR, MAIN_AIRFLOW, 10),
        ExecutorSpec("celery", "Celery", "CeleryExecutor", CELERY_AIRFLOW, 11),
        ExecutorSpec("local", "Local", "LocalExecutor", MAIN_AIRFLOW, 12),
    )
}


class BenchStack(Stack):
    """A ``Stack`` that runs a chosen venv's ``airflow`` and can start any executor's workers."""

    def __init__(
        self, spec: ExecutorSpec, home: Path, *, n: int, parallelism: int, concurrency: int, workers: int = 1
    ) -> None:
        bundles = [
            {
                "name": "dags-folder",
                "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                "kwargs": {"path": str(BENCH_DAGS)},
            }
        ]
        super().__init__(
            home,
            sql_conn=spec.sql_conn,
            broker_url=spec.broker_url,
            executor=spec.executor,
            key_prefix="asyncq_bench",
            dags_folder=BENCH_DAGS,
            extra_env={
                "ASYNCQ_BENCH_N": str(n),
                "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                # Airflow's per-DAG cap (16 by default) would otherwise hold a parallelism above 16 at
                # 16 TIs in flight; at 16 and below it changes nothing.
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(max(16, parallelism)),
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
                "AIRFLOW__ASYNCQ__WORKER_CONCURRENCY": str(concurrency),
                # Only the benchmark DAG: Stack's example bundle imports our provider, which the
                # Celery venv does not have, and parsing it would load every deployment a little.
                "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
            },
        )
        self.spec = spec
        self.concurrency = concurrency
        self.workers = workers
        venv_bin = spec.airflow.parent
        self.env["PATH"] = f"{venv_bin}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["VIRTUAL_ENV"] = str(venv_bin.parent)

    # Stack.run/spawn hard-code the airflow next to sys.executable; these differ only in the binary.
    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.spec.airflow), *args],
            env=self.env,
            cwd=self.home,
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
        )

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [str(self.spec.airflow), *args],
                env={**self.env, **(env or {})},
                cwd=self.home,  # not the repo: `python -m` children put their cwd first on sys.path
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    @property
    def worker_nodes(self) -> dict[str, str]:
        """Component name -> Celery node name of each worker; none for LocalExecutor. One worker is
        "worker"/"bench" as it always was; K > 1 are "worker1"/"bench-w1" .. "workerK"/"bench-wK"."""
        if self.spec.worker_args(self.concurrency) is None:
            return {}
        if self.workers == 1:
            return {WORKER: "bench"}
        return {f"{WORKER}{i}": f"bench-w{i}" for i in range(1, self.workers + 1)}

    def start_bench_workers(self) -> None:
        for name, node in self.worker_nodes.items():
            args = self.spec.worker_args(self.concurrency, node)
            assert args is not None  # worker_nodes is empty when the scheduler runs the tasks
            env = {"ASYNCQ_WORKER_NAME": node}
            if self.workers > 1:  # each its own log server: a second one cannot bind the stack's port
                env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(free_port())
            self.spawn(name, *args, env=env)

    # ------------------------------------------------------------ readiness
    def task_trees(self) -> list[str]:
        """The components whose process trees run the tasks: the workers (the scheduler for Local)."""
        return list(self.worker_nodes) or ["scheduler"]

    def memory_roots(self) -> list[int]:
        return [self.procs[name].pid for name in self.task_trees()]

    def memory_root(self) -> int:
        """The pid whose process tree is this executor's one "worker" (the scheduler for LocalExecutor)."""
        (root,) = self.memory_roots()
        return root

    def wait_ready(self, timeout: float = 240) -> None:
        """API up, DAG parsed, scheduler/triggerer/dag-processor healthy, every worker consuming."""
        deadline = time.monotonic() + timeout
        self.wait_api(timeout)
        self.wait_dag("asyncq_bench", max(1.0, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            self.check_alive()
            health = self.api("GET", "/api/v2/monitor/health", auth=False)
            components = ("metadatabase", "scheduler", "triggerer", "dag_processor")
            if (
                all((health.get(c) or {}).get("status") == "healthy" for c in components)
                and self._worker_ready()
            ):
                return
            time.sleep(1)
        raise TimeoutError(f"{self.spec.label} stack was not ready within {timeout} s; logs in {self.logs}")

    def _worker_ready(self) -> bool:
        if self.worker_nodes:  # every worker consuming, each under its own node name
            return all(READY.search((self.logs / f"{name}.log").read_bytes()) for name in self.worker_nodes)
        # LocalExecutor forks its `parallelism` worker processes when the scheduler starts its executor.
        scheduler = psutil.Process(self.procs["scheduler"].pid)
        return len(scheduler.children()) >= 1

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        """Like Stack.wait_run, but one slow answer (a busy api-server on a loaded machine) is not fatal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                state = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            except (OSError, RuntimeError):  # socket timeout, refused connection, HTTP 5xx
                time.sleep(1)
                continue
            if state in TERMINAL_RUN_STATES:
                return state
            time.sleep(1)
        raise TimeoutError(f"run {dag_id}/{run_id} did not finish within {timeout} s")

    # ------------------------------------------------------------ cleanup
    def strays(self) -> list[psutil.Process]:
        """Processes still running with this stack's AIRFLOW_HOME (e.g. ones that left our process groups)."""
        home = str(self.home)
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.pid != os.getpid() and proc.environ().get("AIRFLOW_HOME") == home:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found
