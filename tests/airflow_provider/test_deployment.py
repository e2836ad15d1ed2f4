"""The provider in a real Airflow 3.3 deployment (api-server, scheduler with LocalExecutor, dag-processor,
triggerer), on the test site: deferrable tasks submit in one process, wait in the triggerer, finish in a third.

A triggerer killed while it watches a job runs on both of the site's schedulers (SLURM and Grid Engine): the
trigger a new triggerer picks up polls the job on its scheduler. The rest stays on SLURM (and the deployment's
default site): logs, secrets, templating, skips, timeouts and connections are the provider's and Airflow's, the same
whatever schedules the job (the example DAG runs on both in test_dags.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import both_sites

from .conftest import REPO, STATE, accounted_jobs, site_jobs
from .deployment import Deployment

pytestmark = pytest.mark.integration
SECRET = f"s3cr3t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def deployment(testsite_env, tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-deployment")
    dags = home / "dags"
    dags.mkdir()
    shutil.copy(REPO / "examples" / "airflow" / "offload_example.py", dags)
    shutil.copy(REPO / "examples" / "airflow" / "offload_race.py", dags)
    shutil.copy(REPO / "tests" / "airflow_provider" / "deployed_dags" / "offload_deployed.py", dags)
    host_key = " ".join((STATE / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    connection = {"conn_type": "ssh", "host": "127.0.0.1", "port": 2222, "login": "hpcuser",
                  "extra": {"private_key": (STATE / "id_ed25519").read_text(), "host_key": host_key}}  # fmt: skip
    env = {**testsite_env, "OFFLOAD_TEST_SECRET": SECRET, "AIRFLOW_CONN_HPC_SSH": json.dumps(connection),
           "OFFLOAD_STATE_DIR": str(home / "offload-state"), "OFFLOAD_SITES": "@slurms"}  # fmt: skip
    deployed = Deployment(home, dags, env)
    deployed.start()
    yield deployed
    deployed.stop()


def test_the_example_dag_across_worker_triggerer_and_resume(deployment):
    run_id = deployment.trigger("offload_example")
    assert deployment.wait_run("offload_example", run_id) == "success", deployment.task_states("offload_example",
                                                                                                run_id)  # fmt: skip
    x = deployment.xcoms("offload_example", run_id)
    assert str(x["prepare[-1]"]["return_value"]) == "10"
    assert x["train[-1]"]["return_value"] == "training on GPUs 0,1" and x["train[-1]"]["exit_code"] == 0
    assert sorted(x[f"square[{i}]"]["return_value"] for i in range(10)) == sorted(i * i for i in range(10))
    assert x["total[-1]"]["return_value"] == 285
    log = deployment.task_log("offload_example", run_id, "train")
    submitted = int(re.search(r"submitted from pid (\d+)", log).group(1))
    watched = int(re.search(r"from the triggerer \(pid (\d+)\)", log).group(1))
    resumed = int(re.search(r"Resumed in pid (\d+)", log).group(1))
    assert watched not in (submitted, resumed) and submitted != resumed  # three processes
    assert watched in deployment.pids_of("triggerer")
    assert "training on GPUs 0,1" in log
    for task, index in (("train", -1), ("total", -1), *(("square", i) for i in range(10))):
        assert "XCom not found" not in deployment.task_log("offload_example", run_id, task, index), task
    assert site_jobs("train-") == [] and site_jobs("square-") == []


def test_the_log_of_a_deferred_task_grows_while_its_job_runs(deployment):
    run_id = deployment.trigger("offload_live_logs")
    deadline = time.time() + 180
    while "tick 5" not in deployment.task_log("offload_live_logs", run_id, "ticks"):
        assert time.time() < deadline, deployment.task_log("offload_live_logs", run_id, "ticks")
        time.sleep(1)
    assert deployment.task_state("offload_live_logs", run_id, "ticks") == "deferred"
    assert site_jobs("ticks-", running=True)  # the job still runs: the lines came while it did
    state = deployment.wait_run("offload_live_logs", run_id)
    assert state == "success", deployment.failures("offload_live_logs", run_id)
    log = deployment.task_log("offload_live_logs", run_id, "ticks")
    for i in range(1, 31):
        assert len(re.findall(rf"^tick {i}$", log, re.MULTILINE)) == 1, f"tick {i} shown {log.count(f'tick {i}')}x"
    assert log.count("all done") == 1  # the resumed task logs only what the trigger had not
    assert "[conn=" not in log and "asyncssh" not in log  # asyncssh's own INFO chatter stays out


def test_a_secret_shows_as_stars_in_the_task_log(deployment):
    run_id = deployment.trigger("offload_secret")
    assert deployment.wait_run("offload_secret", run_id) == "success", deployment.failures("offload_secret", run_id)
    for task in ("prints_sync", "prints_deferred"):
        log = deployment.task_log("offload_secret", run_id, task)
        assert "the key is ***" in log, log[-2000:]
        assert SECRET not in log


def test_resources_are_templated(deployment):
    run_id = deployment.trigger("offload_templated", conf={"gpus": 1})
    state = deployment.wait_run("offload_templated", run_id)
    assert state == "success", deployment.failures("offload_templated", run_id)
    assert deployment.xcoms("offload_templated", run_id)["gpus[-1]"]["return_value"] == "GPUs 0"


def test_an_exit_code_can_skip_the_task(deployment):
    run_id = deployment.trigger("offload_skip")
    deployment.wait_run("offload_skip", run_id)
    assert deployment.task_state("offload_skip", run_id, "nothing_to_do") == "skipped"


def test_a_deferral_that_times_out_cancels_its_job(deployment):
    run_id = deployment.trigger("offload_timeout")
    assert deployment.wait_run("offload_timeout", run_id) == "failed"
    log = deployment.task_log("offload_timeout", run_id, "too_long")
    assert "cancelling it (cancel_on_failure=True)" in log, log[-3000:]
    deadline = time.time() + 60
    while site_jobs("too_long-"):
        assert time.time() < deadline, "the job outlived its timed-out task"
        time.sleep(1)


def test_an_airflow_ssh_connection_reaches_the_site(deployment):
    run_id = deployment.trigger("offload_ssh_connection")
    assert deployment.wait_run("offload_ssh_connection", run_id) == "success", deployment.task_log(
        "offload_ssh_connection", run_id, "via_ssh")[-3000:]  # fmt: skip
    value = deployment.xcoms("offload_ssh_connection", run_id)["via_ssh[-1]"]["return_value"]
    assert value == "reached through an ssh connection as hpcuser"


@both_sites
def test_killing_the_triggerer_while_its_job_runs(deployment, site_name):
    dag_id, task = f"offload_survives_triggerer_{site_name}", f"long_{site_name}"  # deployed_dags/offload_deployed.py
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    run_id = deployment.trigger(dag_id)
    deadline = time.time() + 180
    while deployment.task_state(dag_id, run_id, task) != "deferred" or not site_jobs(f"{task}-", running=True):
        assert time.time() < deadline
        time.sleep(1)
    deployment.kill_component("triggerer")  # SIGKILL: nothing is cleaned up
    time.sleep(5)
    deployment.start_component("triggerer")  # the trigger is picked up again by the new triggerer
    assert deployment.wait_run(dag_id, run_id) == "success", deployment.log_of("triggerer")[-3000:]
    assert deployment.xcoms(dag_id, run_id)[f"{task}[-1]"]["return_value"] == "done once"
    deadline = time.time() + 30  # an ended job reaches accounting within a few seconds
    while not (accounted := accounted_jobs(f"{task}-", since)):
        assert time.time() < deadline, "no accounting record of the job"
        time.sleep(1)
    assert len(accounted) == 1, accounted  # one job: the trigger watched, never submitted


def hold_gpus(env: dict[str, str], site: str, name: str) -> None:
    """Scripted load: another job takes every GPU of ``site`` (both GPU nodes) until cancelled; back once it runs."""
    offload = [sys.executable, "-m", "offload.cli"]
    held = subprocess.run(
        [
            *offload,
            "run",
            "--site",
            site,
            "--detach",
            "--nodes",
            "2",
            "--gpus-per-node",
            "2",
            "--name",
            name,
            "--",
            "sleep",
            "600",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert held.returncode == 0, held.stderr
    deadline = time.time() + 90
    while "RUNNING" not in subprocess.run([*offload, "status", "--site", site, held.stdout.strip()], env=env,
                                          capture_output=True, text=True, timeout=60).stdout:  # fmt: skip
        assert time.time() < deadline, f"the load on {site} never ran"
        time.sleep(1)


def test_a_race_is_claimed_in_the_triggerer_once_even_when_the_triggerer_dies_mid_race(deployment):
    """The race example (examples/airflow/offload_race.py): ``policy="race"`` over the two SLURM clusters, both
    busy (every GPU held by another job). The worker submits an attempt to each and defers; the triggerer is
    SIGKILLed while both wait; a new one picks the trigger up. The second cluster's load then ends: its attempt
    starts, the new triggerer claims it and releases the test site's, and the payload runs once, there; no
    attempt is left on either cluster."""
    dag_id, hog = "offload_race", f"hog-{uuid.uuid4().hex[:6]}"
    env = deployment.env
    cancel = [sys.executable, "-m", "offload.cli", "cancel", "--name", hog, "--site"]
    try:
        for site in ("testsite", "second"):
            hold_gpus(env, site, hog)
        run_id = deployment.trigger(dag_id)
        deadline = time.time() + 180
        while deployment.task_state(dag_id, run_id, "raced") != "deferred" or len(site_jobs("raced-")) < 2:
            assert time.time() < deadline, (deployment.task_state(dag_id, run_id, "raced"), site_jobs("raced-"))
            time.sleep(1)
        assert site_jobs("raced-", running=True) == []  # both attempts wait behind the load
        deployment.kill_component("triggerer")  # SIGKILL while the trigger watches the race
        time.sleep(5)
        deployment.start_component("triggerer")
        subprocess.run([*cancel, "second"], env=env, capture_output=True, timeout=120, check=True)
        assert deployment.wait_run(dag_id, run_id) == "success", deployment.log_of("triggerer")[-3000:]
    finally:
        for site in ("testsite", "second"):
            subprocess.run([*cancel, site], env=env, capture_output=True, timeout=120)
    value = deployment.xcoms(dag_id, run_id)["raced[-1]"]["return_value"]
    assert value.startswith(f"ran {run_id} on second"), value  # the second cluster's nodes: second1, second2
    outputs = [path for path in Path("/home/hpcuser").glob("offload*/jobs/raced-*/output")
               if f"ran {run_id} " in path.read_text(errors="replace")]  # fmt: skip
    assert len(outputs) == 1 and "offload-second" in str(outputs[0]), outputs  # one run, on the second cluster
    log = deployment.task_log(dag_id, run_id, "raced")
    assert "started first: claimed" in log and "released and cancelled" in log, log
    deadline = time.time() + 60
    while site_jobs("raced-"):
        assert time.time() < deadline, site_jobs("raced-")
        time.sleep(1)
