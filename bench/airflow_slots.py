"""Airflow worker slots held while 10 jobs wait in the queue: sync vs deferrable OffloadOperator.

A real Airflow 3.3 (``airflow standalone``: api-server, scheduler with LocalExecutor, dag-processor,
triggerer) runs 10 mapped OffloadOperator tasks in each mode while the test site's ``gpu`` partition is down,
so all 10 jobs wait in SLURM's queue (reason PartitionDown). Then it counts the task instances holding a
worker slot (RUNNING) and those waiting in the triggerer (DEFERRED), reopens the partition and lets both
runs finish. Needs root (it sets the partition state) and Airflow: ``tox -e bench-airflow``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import TESTSITE, Comparison

DAG = """
from airflow.sdk import dag
from airflow_offload import OffloadOperator

for mode in ("sync", "deferrable"):
    @dag(dag_id=f"bench_slots_{mode}", schedule=None, catchup=False, max_active_tasks=10)
    def slots():
        OffloadOperator.partial(task_id="wait", site="testsite", gpus=1, walltime="00:10:00",
                                deferrable=mode == "deferrable").expand(
            command=[["sh", "-c", f"echo {i}"] for i in range(10)])
    globals()[f"dag_{mode}"] = slots()
"""


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(1)


def measure() -> list[Comparison]:
    home = Path(tempfile.mkdtemp(prefix="bench-slots-"))
    (home / "dags").mkdir()
    (home / "dags" / "bench_slots.py").write_text(DAG)
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
           "AIRFLOW__CORE__PARALLELISM": "12", "OFFLOAD_CONFIG": f"{TESTSITE}/offload.toml",
           "OFFLOAD_STATE_DIR": str(home / "state"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip

    def airflow(*args: str) -> str:
        return subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, check=True).stdout

    airflow("db", "migrate")
    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8080)) == 0:
            raise RuntimeError("port 8080 is taken: airflow standalone's api-server needs it (a stale Airflow?)")
    log = (home / "standalone.log").open("w")
    standalone = subprocess.Popen(["airflow", "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    db = home / "airflow.db"
    held: dict[str, list[float]] = {}
    try:
        _wait(lambda: "bench_slots_deferrable" in airflow("dags", "list"), 300, "the DAGs to be parsed")
        subprocess.run(["scontrol", "update", "PartitionName=gpu", "State=DOWN"], check=True)
        for mode in ("sync", "deferrable"):
            dag_id = f"bench_slots_{mode}"
            airflow("dags", "unpause", dag_id)
            airflow("dags", "trigger", dag_id)

            def queued() -> bool:
                out = subprocess.run(["squeue", "--noheader", "--states=PENDING", "--format=%r"],
                                     capture_output=True, text=True).stdout  # fmt: skip
                return out.split().count("PartitionDown") >= 10

            _wait(queued, 600, f"10 queued jobs of {dag_id}")
            time.sleep(5)  # let every task settle into its waiting state
            with sqlite3.connect(db) as conn:
                counts = dict(conn.execute(
                    "SELECT state, count(*) FROM task_instance WHERE dag_id = ? GROUP BY state", (dag_id,)
                ).fetchall())  # fmt: skip
            held[mode] = [float(counts.get("running", 0))]
            print(f"[bench] {dag_id} while 10 jobs wait: {counts}", file=sys.stderr)
            subprocess.run(["scontrol", "update", "PartitionName=gpu", "State=UP"], check=True)

            def finished(dag_id: str = dag_id) -> bool:
                with sqlite3.connect(db) as conn:
                    states = [r[0] for r in conn.execute("SELECT state FROM dag_run WHERE dag_id = ?", (dag_id,))]
                return bool(states) and states[-1] in ("success", "failed")

            _wait(finished, 600, f"{dag_id} to finish")
            if mode == "sync":
                subprocess.run(["scontrol", "update", "PartitionName=gpu", "State=DOWN"], check=True)
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=gpu", "State=UP"], check=False)
        os.killpg(standalone.pid, signal.SIGTERM)
        standalone.wait(60)
        log.close()
    return [Comparison("Airflow: worker slots held while 10 jobs wait (deferrable vs sync)", "sync OffloadOperator",
                       held["deferrable"], held["sync"], unit="slots", target="0 vs 10")]  # fmt: skip


if __name__ == "__main__":
    import argparse

    from common import machine, table

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = "\n".join(["## Airflow worker slots", "", f"On {machine()}.", "", table(measure()), ""])
    print(report)
    if args.out:
        Path(args.out).write_text(report)
