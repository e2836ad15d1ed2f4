"""OffloadCluster on the built-in local site: real local processes, scheduler in this process, TLS on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import Client

import offload
from dask_offload import OffloadCluster


@pytest.fixture(autouse=True)
def local_site(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    monkeypatch.setenv("OFFLOAD__LOCAL__WORKDIR", str(tmp_path / "work"))
    (tmp_path / "sites.toml").write_text("")


def test_cpu_workers_on_the_local_site():
    with OffloadCluster(site="local", n_workers=2, processes=2, memory="1GiB") as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        assert client.submit(lambda x: x + 1, 41).result() == 42
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert len(cluster.jobs) == 1  # two workers, one job
        names = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
        assert names == [f"{cluster.name}-0-0", f"{cluster.name}-0-1"]


def test_gpu_workers_without_gpu_scheduling_are_not_pinned_but_advertise_gpus():
    with OffloadCluster(site="local", gpus=2, memory="1GiB") as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        resources = [w["resources"] for w in client.scheduler_info()["workers"].values()]
        assert resources == [{"GPU": 1}, {"GPU": 1}]


def test_bad_arguments_are_refused_before_anything_starts():
    with pytest.raises(offload.ConfigError, match="negative"):
        OffloadCluster(site="local", gpus=-1)
    with pytest.raises(offload.ConfigError, match="scheduler must be"):
        OffloadCluster(site="local", scheduler="cloud")
    with pytest.raises(offload.ConfigError, match="walltime"):
        OffloadCluster(site="local", walltime="forever")
    with pytest.raises(TypeError, match="unexpected"):
        OffloadCluster(site="local", coers=2)


async def test_dask_config_section_gives_defaults_and_keywords_win():
    import dask

    with dask.config.set({"offload.processes": 3, "offload.memory": "1GiB", "offload.name": "from-config"}):
        async with OffloadCluster(site="local", processes=2, asynchronous=True) as cluster:
            assert cluster.workers_per_job == 2  # the keyword won
            assert cluster.name == "from-config"  # the config gave the rest


def test_missing_extra_says_what_to_install(tmp_path):
    code = "import sys; sys.modules['distributed'] = None; import dask_offload"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'offload[dask]'" in result.stderr


def test_dask_example_runs_locally(tmp_path):
    example = Path(__file__).parents[2] / "examples" / "dask_gpu.py"
    env = {**os.environ, "OFFLOAD_STATE_DIR": str(tmp_path / "state")}
    result = subprocess.run([sys.executable, str(example), "--gpus", "2"], capture_output=True, text=True,
                            env=env, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "40 chunks analysed" in result.stdout


def test_missing_airflow_extra_says_what_to_install():
    code = "import sys; sys.modules['airflow'] = None; import airflow_offload"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'offload[airflow]'" in result.stderr


def test_the_jobqueue_example_runs_locally(tmp_path):
    example = Path(__file__).parents[2] / "examples" / "dask_from_jobqueue.py"
    env = {**os.environ, "OFFLOAD_STATE_DIR": str(tmp_path / "state")}
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "4 workers with [1, 1, 1, 1] threads; sum: 5050" in result.stdout
