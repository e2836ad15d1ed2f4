"""Airflow: what OffloadOperator adds around the job, sync vs deferrable, in a real Airflow 3.3.

* task start -> job submitted: from the task instance's start to offload's record of the submission;
* job end -> task success: from the job's exit code file (written as the payload ends) to the task's end.

Each run executes a DAG of a warm-up task, then one sync and one deferrable task, with ``dag.test()`` in a
fresh Airflow process, alternating their order.

Worker slots held while 10 jobs wait are counted by bench/airflow_slots.py in a real ``airflow standalone``.

Needs Airflow: run it in the ``bench-airflow`` tox env (``tox -e bench,bench-airflow``).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from datetime import datetime
from pathlib import Path

from common import TESTSITE, Comparison

DAG = """
from airflow.sdk import dag
from airflow_offload import OffloadOperator

@dag(dag_id="bench_overhead", schedule=None, catchup=False)
def bench_overhead():
    first, second = {order}
    # The first offload task of a process also pays for imports and the SSH handshake: keep it out of the rows.
    warm = OffloadOperator(task_id="warm_up", site="testsite", command=["true"], job_name="warm-bench")
    a = OffloadOperator(task_id=first, site="testsite", command=["true"], deferrable=first == "deferrable",
                        job_name=first + "-bench")
    b = OffloadOperator(task_id=second, site="testsite", command=["true"], deferrable=second == "deferrable",
                        job_name=second + "-bench")
    warm >> a >> b

bench_dag = bench_overhead()
"""

RUN = """
import datetime, importlib.util, sys
spec = importlib.util.spec_from_file_location("bench_dag", sys.argv[1])
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
run = module.bench_dag.test()
print("RUN_ID", run.run_id, run.state)
"""


def one_run(home: Path, order: tuple[str, str]) -> dict[str, tuple[float, float]]:
    dags = home / "dags"
    dags.mkdir(exist_ok=True)
    (dags / "bench_dag.py").write_text(textwrap.dedent(DAG.format(order=order)))
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "OFFLOAD_STATE_DIR": str(home / "state"),
           "OFFLOAD_CONFIG": f"{TESTSITE}/offload.toml"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", RUN, str(dags / "bench_dag.py")], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    line = next((x for x in out.stdout.splitlines() if x.startswith("RUN_ID")), None)
    assert line and line.endswith("success"), out.stdout[-3000:] + out.stderr[-3000:]
    run_id = line.split()[1]
    airflow_db = sqlite3.connect(home / "airflow.db")
    records = sqlite3.connect(home / "state" / "jobs.sqlite")
    result = {}
    for task in order:
        start, end = airflow_db.execute(
            "SELECT start_date, end_date FROM task_instance WHERE run_id = ? AND task_id = ?", (run_id, task)
        ).fetchone()
        submitted, jobdir = records.execute(
            "SELECT submitted_at, jobdir FROM jobs WHERE name = ? ORDER BY submitted_at DESC LIMIT 1",
            (f"{task}-bench",),
        ).fetchone()
        ended = (Path(jobdir) / "exitcode").stat().st_mtime
        result[task] = (submitted - _epoch(start), _epoch(end) - ended)
    return result


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace(" ", "T")).timestamp() if "+" in text else (
        datetime.fromisoformat(text + "+00:00").timestamp())  # fmt: skip


def measure(runs: int = 3) -> list[Comparison]:
    home = Path(tempfile.mkdtemp(prefix="bench-airflow-"))
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    start_sync, start_def, end_sync, end_def = [], [], [], []
    for i in range(runs):
        order = ("sync", "deferrable") if i % 2 == 0 else ("deferrable", "sync")
        r = one_run(home, order)
        start_sync.append(r["sync"][0])
        end_sync.append(r["sync"][1])
        start_def.append(r["deferrable"][0])
        end_def.append(r["deferrable"][1])
    return [
        Comparison("Airflow: task start -> job submitted (deferrable vs sync)", "sync OffloadOperator",
                   start_def, start_sync, target="about 1"),
        Comparison("Airflow: job end -> task success (deferrable vs sync)", "sync OffloadOperator",
                   end_def, end_sync, target="small, both"),
    ]  # fmt: skip


if __name__ == "__main__":
    import argparse

    from common import machine, table

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import airflow_slots

    rows = measure(args.runs) + airflow_slots.measure()
    report = "\n".join([
        "## Airflow", "",
        f"On {machine()}: overheads over {args.runs} dag.test() runs; worker slots counted in a real",
        "`airflow standalone` (LocalExecutor, triggerer) while the gpu partition is down and 10 jobs wait.",
        "Rerun: `tox -e bench-airflow` (as root, with the test site up).", "",
        table(rows), "",
        "Under `dag.test()` the trigger runs in the process that deferred, so the deferred task resumes at once. Under",
        "a scheduler, a job ending within 10 s of its deferral resumes its task 10 s after the deferral",
        "(`airflow_offload.triggers.offload.RESUME_SETTLE`): Airflow 3.3.2 fails a task whose deferring worker's",
        "exit reaches the scheduler after the task was queued again (apache/airflow#67287).", "",
    ])  # fmt: skip
    print(report)
    if args.out:
        Path(args.out).write_text(report)
