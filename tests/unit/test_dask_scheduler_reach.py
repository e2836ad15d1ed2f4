"""A scheduler in the client's process (scheduler="local") on a site whose nodes cannot reach the client: refused
before any worker is submitted, saying scheduler="site" is the way; on the local site it still runs."""

from __future__ import annotations

import pytest
from distributed import Client

import offload
from dask_offload import OffloadCluster


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    """A remote SLURM site (only rendered against, never reached) and the local site, in their own dirs."""
    (tmp_path / "sites.toml").write_text(
        "[sites.hpc]\nhost = 'login.invalid'\nscheduler = 'slurm'\nruntime = 'apptainer'\nimage = '/img.sif'\n"
        "partition = 'cpu'\nworkdir = '/w'\nshebang = '#!/bin/bash -l'\n"
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    monkeypatch.setenv("OFFLOAD__LOCAL__WORKDIR", str(tmp_path / "work"))


def test_a_local_scheduler_on_a_remote_site_is_refused_before_any_worker_is_submitted():
    """Mirrors JobQueueCluster.__init__, whose scheduler always runs in the client's process (its login-node
    setting), with workers asked for as dask-jobqueue asks: n_workers=, scale(), adapt()."""
    with pytest.raises(offload.ConfigError, match="scheduler='site'"):
        OffloadCluster(site="hpc", scheduler="local", n_workers=1)
    with OffloadCluster(site="hpc", scheduler="local") as cluster:  # no worker: job_script() still renders
        with pytest.raises(offload.ConfigError, match="cannot reach"):
            cluster.scale(2)
        with pytest.raises(offload.ConfigError, match="cannot reach"):
            cluster.adapt(minimum=0, maximum=4)
        assert cluster.jobs == []


def test_a_local_scheduler_on_the_local_site_still_runs_workers():
    with OffloadCluster(site="local", scheduler="local", n_workers=1, memory="1GiB") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
