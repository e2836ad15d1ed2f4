"""Only what the user set in the Dask config counts: dask-jobqueue's package defaults, which its import registers
(dask.config.update_defaults), are not the user's settings; offload registers its own the same way."""

from __future__ import annotations

import copy
from pathlib import Path

import dask
import pytest
import yaml

from dask_offload import OffloadCluster, options


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    """A remote SLURM site (only rendered against, never reached) and the local site, in their own dirs."""
    (tmp_path / "sites.toml").write_text(
        "[sites.hpc]\nhost = 'login.invalid'\nscheduler = 'slurm'\nruntime = 'apptainer'\nimage = '/img.sif'\n"
        "partition = 'cpu'\nworkdir = '/w'\nshebang = '#!/bin/bash -l'\n"
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    monkeypatch.setenv("OFFLOAD__LOCAL__WORKDIR", str(tmp_path / "work"))


@pytest.fixture
def dask_jobqueue(tmp_path, monkeypatch):
    """dask-jobqueue, imported as a user's program imports it. Its import copies jobqueue.yaml into the user's
    Dask config dir (dask.config.ensure_file): here a temporary one, not the home of whoever runs the tests."""
    monkeypatch.setattr(dask.config, "PATH", str(tmp_path / "dask"))
    return pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is the peer these tests compare with")


def script(**keywords) -> str:
    with OffloadCluster(site="hpc", scheduler="local", **keywords) as cluster:
        return cluster.job_script()


def test_importing_dask_jobqueue_does_not_change_offloads_jobs(dask_jobqueue):
    """Mirrors dask_jobqueue.config.reconfigure: dask.config.update_defaults(jobqueue.yaml) on import."""
    assert dask.config.get("jobqueue.slurm.shebang") == "#!/usr/bin/env bash"  # registered, as on import
    text = script()
    assert text.splitlines()[0] == "#!/bin/bash -l"  # the site's login shell, so `module` works
    assert "#SBATCH --time=01:00:00" in text  # offload's walltime, not jobqueue's 30 minutes


def test_jobqueue_defaults_registered_again_are_still_not_the_users(dask_jobqueue):
    """The same as reconfigure() does, run again (as a second import of its config module would)."""
    path = Path(dask_jobqueue.__file__).with_name("jobqueue.yaml")
    defaults = yaml.safe_load(path.read_text())
    saved = (list(dask.config.defaults), copy.deepcopy(dask.config.config))
    try:
        dask.config.update_defaults(defaults)
        assert options.config("walltime") == "01:00:00" and options.config("shebang") is None
    finally:
        dask.config.defaults[:] = saved[0]
        dask.config.config.clear()
        dask.config.config.update(saved[1])


def test_what_the_user_sets_for_jobqueue_still_carries_over(dask_jobqueue, monkeypatch):
    """The user's settings, in dask's three ways: DASK_* variables, yaml files (collected with them), set()."""
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__WALLTIME", "02:00:00")
    # A user who writes down jobqueue's own default has still chosen it: it counts.
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__SHEBANG", "#!/usr/bin/env bash")
    dask.config.refresh()
    try:
        text = script()
        assert "#SBATCH --time=02:00:00" in text and text.splitlines()[0] == "#!/usr/bin/env bash"
        with dask.config.set({"jobqueue.slurm.walltime": "03:00:00"}):
            assert "#SBATCH --time=03:00:00" in script()
    finally:
        monkeypatch.delenv("DASK_JOBQUEUE__SLURM__WALLTIME")
        monkeypatch.delenv("DASK_JOBQUEUE__SLURM__SHEBANG")
        dask.config.refresh()


def test_offloads_defaults_are_registered_and_the_users_offload_section_wins(monkeypatch):
    """Mirrors dask_jobqueue.config.reconfigure for offload's own section: its defaults are in Dask's config."""
    assert dask.config.get("offload.walltime") == "01:00:00" and dask.config.get("offload.scheduler_cores") == 1
    assert any("offload" in registered for registered in dask.config.defaults)
    # The user's offload value wins over the user's jobqueue value, even when it equals offload's default.
    monkeypatch.setenv("DASK_OFFLOAD__WALLTIME", "01:00:00")
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__WALLTIME", "02:00:00")
    dask.config.refresh()
    try:
        assert options.config("walltime") == "01:00:00"
    finally:
        monkeypatch.delenv("DASK_OFFLOAD__WALLTIME")
        monkeypatch.delenv("DASK_JOBQUEUE__SLURM__WALLTIME")
        dask.config.refresh()
    assert options.config("walltime") == "01:00:00"  # nothing set: offload's default
