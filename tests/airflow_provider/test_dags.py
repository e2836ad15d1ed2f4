"""DAGs end to end on the test site: real Airflow 3.3, real SLURM over real SSH, real containers.

The example DAG and a deferrable task killed mid-job run on both of the site's schedulers (SLURM and Grid Engine):
they show the operators, the trigger and ``@task.offload`` work on a scheduler. The rest stays on SLURM: failures
in the task log and a retry reattaching are the provider's own logic over offload's Job, whatever schedules it."""

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import both_sites

from .conftest import HERE, REPO, accounted_jobs, run_dag, site_jobs, unique_date

pytestmark = pytest.mark.integration
EXAMPLE = REPO / "examples" / "airflow" / "offload_example.py"
RACE_EXAMPLE = REPO / "examples" / "airflow" / "offload_race.py"


def test_the_race_example_runs_its_job_once_on_one_of_two_clusters(testsite_env):
    """examples/airflow/offload_race.py over the two SLURM clusters, both free: an attempt on each, one claimed
    (by the trigger ``dag.test()`` runs in its own process), the other released; the task's result is the run's."""
    results, output = run_dag({**testsite_env, "OFFLOAD_SITES": "@slurms"}, RACE_EXAMPLE)
    assert results["state"] == "success", output[-5000:]
    value = results["xcoms"]["raced[-1]"]["return_value"]
    assert value.startswith("ran ") and " on " in value, value
    assert "started first: claimed" in output and "released and cancelled" in output, output[-5000:]
    deadline = time.time() + 60
    while site_jobs("raced-"):
        assert time.time() < deadline, site_jobs("raced-")
        time.sleep(1)


# What the example's two GPUs are: SLURM binds them (CUDA_VISIBLE_DEVICES); Grid Engine counts GPUs but binds none.
TWO_GPUS = {"testsite": "0,1", "gridengine": "none"}


@both_sites
def test_example_dag_runs_end_to_end(site_env, site_name):
    results, output = run_dag(site_env, EXAMPLE)
    assert results["state"] == "success", output[-5000:]
    x = results["xcoms"]
    assert str(x["prepare[-1]"]["return_value"]) == "10"  # the last line of its output
    assert x["train[-1]"]["return_value"] == f"training on GPUs {TWO_GPUS[site_name]}"  # the deferrable one
    assert x["train[-1]"]["state"] == "COMPLETED" and x["train[-1]"]["exit_code"] == 0
    assert sorted(x[f"square[{i}]"]["return_value"] for i in range(10)) == sorted(i * i for i in range(10))
    assert x["total[-1]"]["return_value"] == 285
    assert all(x[key]["job_id"] for key in x)
    assert "prepared with Python 3.11" in output  # the job's output is in the task log
    assert f"training on GPUs {TWO_GPUS[site_name]}" in output


def test_failures_fail_their_tasks_with_the_jobs_log_tail(testsite_env):
    results, output = run_dag(testsite_env, HERE / "dags" / "offload_failures.py")
    assert results["tasks"]["exits_3[-1]"] == "failed"
    assert results["tasks"]["raises[-1]"] == "failed"
    assert results["xcoms"]["exits_3[-1]"]["exit_code"] == 3
    assert "ended FAILED (NonZeroExitCode), exit code 3. Last lines of its log:" in output
    assert "the error is here" in output
    assert "ValueError: bad input on the site" in output  # the remote traceback


@pytest.mark.parametrize(("deferrable", "site_name"), [("0", "testsite"), ("1", "testsite"), ("1", "gridengine")])
def test_killing_the_task_cancels_the_job(site_env, deferrable):
    env = {**site_env, "LONG_JOB": "sleep 300", "LONG_DEFERRABLE": deferrable,
           "AIRFLOW__CORE__DAGS_FOLDER": str(HERE / "dags")}  # fmt: skip
    when = unique_date()
    proc = subprocess.Popen([sys.executable, str(HERE / "harness.py"), str(HERE / "dags" / "offload_long.py"), when],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not site_jobs("long_job-", running=True):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-4000:] if proc.poll() else ""
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # how Airflow stops a task it kills
    proc.wait(timeout=120)
    deadline = time.time() + 60
    while site_jobs("long_job-"):
        assert time.time() < deadline, "the job outlived its killed task"
        time.sleep(0.5)


def test_a_retry_after_a_worker_crash_reattaches_instead_of_resubmitting(testsite_env):
    env = {**testsite_env, "LONG_JOB": "sleep 25; echo finished once", "AIRFLOW__CORE__DAGS_FOLDER": str(HERE / "dags")}
    when = unique_date()
    # a second on: the job the test before cancelled may have ended within this one (this DAG's starts far later)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 1))
    log = HERE.parent.parent / "test-artifacts" / "crashed-worker.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(HERE / "harness.py"), str(HERE / "dags" / "offload_long.py"),
                                 when], env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 120
        while not site_jobs("long_job-", running=True):
            assert time.time() < deadline and proc.poll() is None, log.read_text()[-4000:]
            time.sleep(0.3)
    proc.kill()  # the worker dies: no on_kill, the job keeps running on the site (for ~25 s: time to rerun)
    proc.wait()
    results, output = run_dag(env, HERE / "dags" / "offload_long.py", when)  # Airflow runs the task again
    assert results["state"] == "success", output[-4000:]
    assert "Reattaching to job" in output
    assert results["xcoms"]["long_job[-1]"]["return_value"] == "finished once"
    assert len(accounted_jobs("long_job-", since)) == 1, "the work was submitted twice"
