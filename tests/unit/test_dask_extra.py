"""dask-jobqueue is a peer that benchmarks and tests compare with, not a dependency of offload[dask]."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    """A remote SLURM site (only rendered against, never reached) and the local site, in their own dirs."""
    (tmp_path / "sites.toml").write_text(
        "[sites.hpc]\nhost = 'login.invalid'\nscheduler = 'slurm'\nruntime = 'apptainer'\nimage = '/img.sif'\n"
        "partition = 'cpu'\nworkdir = '/w'\nshebang = '#!/bin/bash -l'\n"
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    monkeypatch.setenv("OFFLOAD__LOCAL__WORKDIR", str(tmp_path / "work"))


def test_the_dask_extra_does_not_install_dask_jobqueue():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [r for r in extras["dask"] if r.startswith("dask-jobqueue")]
    code = ("import sys; sys.modules['dask_jobqueue'] = None\n"
            "from dask_offload import OffloadCluster\n"
            "with OffloadCluster(site='hpc', scheduler='local', cores=2) as c: print(c.job_script()[:2])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
