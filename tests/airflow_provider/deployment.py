"""A real Airflow 3.3 deployment for the tests: api-server, scheduler (LocalExecutor), dag-processor and
triggerer, each its own process, on SQLite in a temporary AIRFLOW_HOME. Tasks run in processes the executor
forks, triggers in the triggerer, and a resumed task in yet another process, as in production."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests import leftovers

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    def __init__(self, home: Path, dags: Path, env: dict[str, str]) -> None:
        self.home = home
        self.dags = dags
        port = free_port()
        self.env = {
            **env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "16",
            "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "15",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            # the deployment's processes are its fixture's, also those a test restarts (tests/leftovers.py)
            leftovers.FIXTURE_MARK: "airflow-deployment",
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.db = home / "airflow.db"

    # -- lifetime ---------------------------------------------------------------------------------------

    def airflow(self, *args: str, check: bool = True) -> str:
        result = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result.stdout

    def start(self) -> None:
        self.airflow("db", "migrate")
        for component in COMPONENTS:
            self.start_component(component)

    def start_component(self, component: str) -> None:
        log = (self.home / f"{component}.log").open("a")
        self.processes[component] = subprocess.Popen(
            [sys.executable, "-m", "airflow", component], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def kill_component(self, component: str, sig: int = signal.SIGKILL) -> None:
        proc = self.processes.pop(component)
        os.killpg(proc.pid, sig)
        proc.wait(60)

    def stop(self) -> None:
        for component in list(self.processes):
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                self.kill_component(component, signal.SIGTERM)

    def pids_of(self, component: str) -> set[int]:
        """The component's process and its children (the triggerer runs triggers in a child process)."""
        root = self.processes[component].pid
        out = subprocess.run(["ps", "-o", "pid=", "--sid", str(root)], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def log_of(self, component: str) -> str:
        return (self.home / f"{component}.log").read_text(errors="replace")

    # -- DAG runs ---------------------------------------------------------------------------------------

    def query(self, sql: str, *args: object) -> list[tuple]:
        with sqlite3.connect(self.db, timeout=30) as conn:
            return conn.execute(sql, args).fetchall()

    def wait_for_dag(self, dag_id: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not self.query("SELECT dag_id FROM dag WHERE dag_id = ?", dag_id):
            assert time.time() < deadline, f"{dag_id} was not parsed:\n{self.log_of('dag-processor')[-3000:]}"
            time.sleep(1)
        self.airflow("dags", "unpause", dag_id)

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        self.wait_for_dag(dag_id)
        run_id = f"test-{uuid.uuid4().hex[:10]}"
        args = ["dags", "trigger", dag_id, "--run-id", run_id]
        if conf:
            args += ["--conf", json.dumps(conf)]
        self.airflow(*args)
        return run_id

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        rows = self.query("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return rows[0][0] if rows else None

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while (state := self.run_state(dag_id, run_id)) not in ("success", "failed"):
            assert time.time() < deadline, f"{dag_id} {run_id} still {state}:\n{self.log_of('scheduler')[-4000:]}"
            time.sleep(1)
        return state

    def failures(self, dag_id: str, run_id: str) -> str:
        """What a test prints when a run did not succeed: each task's state, the ends of the failed tasks' logs."""
        states = self.task_states(dag_id, run_id)
        text = [f"task states: {states}"]
        for key, state in states.items():
            if state not in ("success", "skipped"):
                task, index = key[:-1].split("[")
                text.append(f"--- {key} ({state}):\n{self.task_log(dag_id, run_id, task, int(index))[-3000:]}")
        return "\n".join(text)

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        rows = self.query("SELECT task_id, map_index, state FROM task_instance WHERE dag_id = ? AND run_id = ?",
                          dag_id, run_id)  # fmt: skip
        return {f"{task}[{index}]": state for task, index, state in rows}

    def task_state(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str | None:
        return self.task_states(dag_id, run_id).get(f"{task_id}[{map_index}]")

    def xcoms(self, dag_id: str, run_id: str) -> dict[str, dict[str, object]]:
        rows = self.query("SELECT task_id, map_index, key, value FROM xcom WHERE dag_id = ? AND run_id = ?", dag_id,
                          run_id)  # fmt: skip
        found: dict[str, dict[str, object]] = {}
        for task, index, key, value in rows:
            found.setdefault(f"{task}[{index}]", {})[key] = json.loads(value) if isinstance(value, str) else value
        return found

    def task_log(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, attempt: int = 1) -> str:
        """The task's log as Airflow's UI shows it: the task's own file and its triggers', merged in time."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            folder = folder / f"map_index={map_index}"
        records: list[tuple[str, str]] = []
        for path in sorted(folder.glob(f"attempt={attempt}.log*")):
            for raw in path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(raw)
                    records.append((str(record.get("timestamp", "")), str(record.get("event", raw))))
                except ValueError:
                    records.append(("", raw))
        return "\n".join(event for _, event in sorted(records, key=lambda r: r[0]))
