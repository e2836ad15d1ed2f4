"""OffloadCluster takes dask-jobqueue's SLURMCluster keywords with their meaning: the numbers, the directives,
the config fallback, and the keywords it refuses (no site needed: job_script only renders)."""

from __future__ import annotations

import dask
import pytest

import offload
from dask_offload import OffloadCluster
from dask_offload.options import resolve, worker_args


@pytest.fixture(autouse=True)
def hpc_profile(tmp_path, monkeypatch):
    (tmp_path / "sites.toml").write_text(
        "[sites.hpc]\nhost = 'login.invalid'\nscheduler = 'slurm'\nruntime = 'apptainer'\nimage = '/img.sif'\n"
        "partition = 'cpu'\ngpu_partition = 'gpu'\ngpus_per_node = 4\nworkdir = '/w'\n"
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))


def options(**given):
    keys = ("site", "gpus", "n_workers", "cores", "memory", "processes", "job_cpu", "job_mem", "walltime", "image",
            "scheduler", "tls", "name", "env", "secrets", "reach", "partition", "queue", "account", "qos",
            "job_extra_directives", "job_directives_skip", "job_script_prologue", "worker_extra_args",
            "death_timeout", "local_directory", "log_directory", "interface", "nanny", "scheduler_options",
            "shebang", "python")  # fmt: skip
    unknown = {k: v for k, v in given.items() if k not in keys}
    return resolve({k: given.get(k) for k in keys}, unknown, 4)


def test_cores_and_memory_are_the_jobs_split_between_its_processes():
    o = options(cores=2, processes=2, memory="800MB")
    assert (o.job_cpus, o.job_memory_mb) == (2, 763)  # 800 MB, as SLURM's --mem in MiB
    assert (o.threads, o.worker_memory, o.per_job) == (1, 400_000_000, 2)
    o = options(cores=8, processes=2, memory="32GB", job_cpu=10, job_mem="40G")
    assert (o.job_cpus, o.job_memory_mb, o.threads, o.worker_memory) == (10, 40960, 4, 16_000_000_000)


def script(**keywords) -> str:
    with OffloadCluster(site="hpc", scheduler="local", tls=False, **keywords) as cluster:
        return cluster.job_script()


def test_a_jobqueue_style_cluster_renders_the_same_directives():
    text = script(cores=8, processes=2, memory="32GB", queue="gpuq", account="proj", walltime="02:00:00",
                  job_extra_directives=["--gpus=1", "#SBATCH -C a100"], job_script_prologue=["module load x"],
                  shebang="#!/bin/bash -l")  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash -l"
    for directive in ("--cpus-per-task=8", "--mem=30518M", "--partition=gpuq", "--account=proj", "--time=02:00:00",
                      "--gpus=1", "-C a100"):  # fmt: skip
        assert f"#SBATCH {directive}" in lines, directive
    assert lines.index("module load x") < next(i for i, line in enumerate(lines) if "apptainer exec" in line)
    assert '"nthreads": 4' in text and '"memory_limit": 16000000000' in text  # each of the 2 workers


def test_directives_can_be_skipped_but_not_offloads_own():
    text = script(cores=2, memory="2GB", job_directives_skip=["--mem", "--job-name", "--output"])
    assert "--mem=" not in text and "--cpus-per-task=2" in text
    assert "#SBATCH --job-name=" in text and "#SBATCH --output=" in text  # how offload finds and follows jobs


def test_log_directory_and_worker_options_reach_the_job():
    text = script(log_directory="/scratch/logs", local_directory="/tmp/dw", interface="ib0", death_timeout="2m",
                  worker_extra_args=["--lifetime", "55m", "--lifetime-stagger=4m", "--lifetime-restart",
                                     "--resources", "FOO=2"], nanny=True)  # fmt: skip
    assert 'ln -sf "$OFFLOAD_JOB_DIR/output" /scratch/logs/' in text
    expected = ('"local_directory": "/tmp/dw"', '"interface": "ib0"', '"death_timeout": 120.0', '"nanny": true',
                '"lifetime": "55m"', '"lifetime_stagger": "4m"', '"lifetime_restart": true', '"FOO": 2.0')  # fmt: skip
    for part in expected:
        assert part in text, part


def test_keywords_that_cannot_mean_the_same_here_are_refused_with_the_reason():
    with pytest.raises(offload.ConfigError, match="starts the workers itself"):
        options(worker_command="distributed.cli.dask_worker")
    with pytest.raises(offload.ConfigError, match="means nothing to offload's workers"):
        worker_args(["--no-nanny-please"])
    with pytest.raises(offload.ConfigError, match="processes= does not apply"):
        options(gpus=4, processes=2)
    with pytest.raises(offload.ConfigError, match="leaves a worker without a thread"):
        options(cores=1, processes=2)
    with pytest.raises(offload.ConfigError, match="name one thing"):
        options(queue="a", partition="b")
    with pytest.raises(TypeError, match="unexpected"):
        options(coers=2)


def test_old_jobqueue_names_are_taken_as_the_new_ones():
    o = options(job_extra=["--exclusive"], env_extra=["module load y"], header_skip=["--mem"])
    assert o.extra == ("--exclusive",) and o.prologue == ("module load y",) and o.skip == ("--mem",)


def test_jobqueue_config_carries_over_and_offload_config_and_keywords_win():
    with dask.config.set({"jobqueue.slurm.cores": 6, "jobqueue.slurm.memory": "12GB", "jobqueue.slurm.queue": "jq",
                          "jobqueue.slurm.processes": 3}):  # fmt: skip
        o = options()
        assert (o.job_cpus, o.per_job, o["partition"], o.worker_memory) == (6, 3, "jq", 4_000_000_000)
        with dask.config.set({"offload.cores": 9}):
            assert options().job_cpus == 9  # offload's own section wins over jobqueue's
            assert options(cores=12).job_cpus == 12  # and a keyword over both


def test_gpu_clusters_keep_one_worker_per_gpu():
    o = options(gpus=8, cores=16, memory="64GB")
    assert (o.gpu, o.per_job, o.threads, o.worker_memory) == (True, 4, 4, 16_000_000_000)
    assert o.worker["resources"] == {"GPU": 1}


def test_a_gpu_cluster_on_a_grid_engine_site_asks_no_cpus_it_cannot_reserve(tmp_path, monkeypatch):
    """Grid Engine gives a job one slot per node and refuses cpus above 1: OffloadCluster(gpus=2) there (two
    workers a job) used to fail with that refusal for a CPU count the user never gave. Now the job asks for its
    GPUs only, as dask-jobqueue's SGECluster asks no CPUs; a job_cpu the user gives is still asked for."""
    (tmp_path / "sites.toml").write_text(
        "[sites.ge]\nhost = 'login.invalid'\nscheduler = 'gridengine'\nruntime = 'apptainer'\nimage = '/img.sif'\n"
        "partition = 'all.q'\ngpus_per_node = 2\nparallel_environment = 'offload'\nworkdir = '/w'\n"
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    with OffloadCluster(site="ge", gpus=2, n_workers=0, scheduler="local", tls=False) as cluster:
        lines = cluster.job_script().splitlines()
    assert "#$ -l gpu=2" in lines and "#$ -pe offload 1" in lines
    assert '"nthreads": 1' in "\n".join(lines)  # each of the two workers of the job
    with pytest.raises(offload.ConfigError, match="one slot per node"):
        OffloadCluster(site="ge", gpus=2, job_cpu=2, n_workers=0, scheduler="local", tls=False)
