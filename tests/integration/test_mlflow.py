"""User story 1: training tracked in a real MLflow server (SQLite backend, artifacts served by the server),
run on the test site with 2 GPUs through offload, then read back with MLflow's own client.

The server runs on the user's side (this machine's loopback), which the test site's compute nodes cannot reach
(asserted below), exactly as on a real site: the jobs reach it through offload's relay (``reach``).

``offload run`` reaching the tracking server and Dask workers logging to it run on both of the site's schedulers
(SLURM and Grid Engine): they show the relay carries MLflow's traffic from either scheduler's nodes. The other tests
stay on SLURM: the example's submit.py, a failed run and the local site test MLflow's side and the example, which
no scheduler changes, and the server's address (this machine's loopback) is out of any node's reach alike."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import offload
from tests.conftest import both_sites

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

EXAMPLE = Path(__file__).parents[2] / "examples" / "mlflow_training"


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--serve-artifacts",
         "--artifacts-destination", str(home / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, (home / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(30)
    log.close()


def check_run(uri: str, run_id: str, gpus: str) -> None:
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "12" and run.data.params["gpus"] == gpus
    history = client.get_metric_history(run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(12))  # one point per epoch
    assert history[-1].value > 0.8
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/weights.npz", "model/model.json"} <= artifacts
    local = client.download_artifacts(run_id, "model/model.json")
    assert '"logistic-regression"' in Path(local).read_text()


def test_the_server_is_out_of_the_nodes_reach(site, tracking_uri):
    probe = ("import sys, urllib.request\n"
             "try:\n    urllib.request.urlopen(sys.argv[1] + '/health', timeout=5)\nexcept OSError as e:\n"
             "    print('unreachable', e)\nelse:\n    print('reachable')\n")  # fmt: skip
    job = site.submit(offload.JobSpec(["python3", "-c", probe, tracking_uri]))
    job.wait(timeout=120)
    assert "unreachable" in job.tail()


def test_submit_example_on_two_gpus_of_the_test_site(testsite_config, tracking_uri):
    result = subprocess.run([sys.executable, str(EXAMPLE / "submit.py"), "--site", "testsite", "--gpus", "2",
                             "--tracking-uri", tracking_uri, "--epochs", "12"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    run_id = result.stderr.split("run ")[1].split(":")[0]
    check_run(tracking_uri, run_id, gpus="0,1")
    assert f"runs/{run_id}" in result.stdout  # the UI link
    script = subprocess.run([sys.executable, "-m", "offload.cli", "status", "--name", "mlflow-train", "--limit", "1"],
                            capture_output=True, text=True).stdout  # fmt: skip
    assert "COMPLETED" in script


# What a job's two GPUs are: SLURM binds them (CUDA_VISIBLE_DEVICES); Grid Engine counts GPUs but binds none.
TWO_GPUS = {"testsite": "0,1", "gridengine": "none"}


@both_sites
def test_offload_run_reaching_the_tracking_server(testsite_config, tracking_uri, site_name):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("cli") or client.get_experiment(client.create_experiment("cli"))
    run = client.create_run(experiment.experiment_id)
    result = subprocess.run(
        [sys.executable, "-m", "offload.cli", "run", "--site", site_name, "--gpus", "2",
         "--file", str(EXAMPLE / "train.py"), "--reach", f"MLFLOW_TRACKING_URI={tracking_uri}",
         "--env", f"MLFLOW_RUN_ID={run.info.run_id}", "--name", "mlflow-cli", "--",
         "python3", "train.py", "--epochs", "12"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert "epoch  11" in result.stdout
    check_run(tracking_uri, run.info.run_id, gpus=TWO_GPUS[site_name])
    assert client.get_run(run.info.run_id).data.params["job_id"].isdigit()  # the scheduler's job id, not "local"
    ours = [line for line in result.stderr.splitlines() if line.startswith("offload:")]
    assert ours and not any(tracking_uri in line for line in ours)  # offload never echoes what reach relays


def test_a_failed_job_leaves_its_run_failed(testsite_config, tracking_uri):
    result = subprocess.run([sys.executable, str(EXAMPLE / "submit.py"), "--site", "testsite", "--tracking-uri",
                             tracking_uri, "--epochs", "0"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0  # zero epochs: train.py fails at its end
    run_id = result.stderr.split("run ")[1].split(":")[0]
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FAILED"


def test_submit_example_on_the_local_site(tracking_uri, tmp_path):
    env = {**os.environ, "OFFLOAD_CONFIG": str(tmp_path / "none.toml"), "OFFLOAD_SITE": "local"}
    (tmp_path / "none.toml").write_text("")
    result = subprocess.run([sys.executable, str(EXAMPLE / "submit.py"), "--tracking-uri", tracking_uri,
                             "--epochs", "12"], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    check_run(tracking_uri, result.stderr.split("run ")[1].split(":")[0], gpus="none")


@both_sites
def test_dask_workers_log_to_mlflow_through_reach(testsite_config, tracking_uri, site_name):
    from distributed import Client

    from dask_offload import OffloadCluster

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("dask") or client.get_experiment(client.create_experiment("dask"))
    run = client.create_run(experiment.experiment_id)

    def score(shard: int, run_id: str) -> int:
        import mlflow  # the image's mlflow-skinny; the URI (the node's relay) is in the worker's environment

        mlflow.tracking.MlflowClient().log_metric(run_id, "shard_score", shard * 0.5, step=shard)
        return shard

    with OffloadCluster(site=site_name, gpus=2, reach={"MLFLOW_TRACKING_URI": tracking_uri}) as cluster:
        assert tracking_uri not in cluster.job_script()
        with Client(cluster) as dask_client:
            futures = dask_client.map(score, range(4), run_id=run.info.run_id, resources={"GPU": 1})
            assert sorted(dask_client.gather(futures)) == [0, 1, 2, 3]
    history = client.get_metric_history(run.info.run_id, "shard_score")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
