"""offload's Jupyter launcher knows no particular server: it prepares the job (Jupyter's directories, a free port
reported in jupyter.json, the root) and execs the server command it is given, JupyterLab by default, with the
common options appended. These tests run the launcher on this machine, as the job would run it, with stand-in
servers that print the argv and environment they were started with."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import offload
from offload import jupyter as jl
from offload.jupyter import LAUNCHER

# A stand-in server: its arguments and environment, as JSON, on one line.
PRINT = "import json, os, sys; print('SERVER ' + json.dumps([sys.argv[1:], dict(os.environ)]), flush=True)"
ALLOW_ROOT = ["--allow-root"] if os.getuid() == 0 else []


@pytest.fixture
def local(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    (tmp_path / "sites.toml").write_text("")
    monkeypatch.setenv("OFFLOAD__LOCAL__WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("OFFLOAD_STATE_DIR", str(tmp_path / "state"))
    return offload.load_site("local")


def fake_module(folder: Path, module: str) -> dict[str, str]:
    """A package named ``module`` whose ``python -m`` prints like PRINT, first on PYTHONPATH (ahead of an installed
    one): the environment to run it with."""
    package = folder.joinpath(*module.split("."))
    package.mkdir(parents=True)
    for parent in [package, *package.relative_to(folder).parents][:-1]:
        (folder / parent / "__init__.py").touch()
    (package / "__main__.py").write_text(PRINT + "\n")
    return {"PYTHONPATH": str(folder)}


def run(command: list[str], jobdir: Path, env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Run ``command`` (a job's payload) as the job would: in its directory, with OFFLOAD_JOB_DIR and the login
    session's XDG_RUNTIME_DIR; the stand-in server's argv and environment."""
    jobdir.mkdir(parents=True, exist_ok=True)
    environ = {**os.environ, "OFFLOAD_JOB_DIR": str(jobdir), "XDG_RUNTIME_DIR": "/run/user/4242", **(env or {})}
    done = subprocess.run(command, cwd=jobdir, env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("SERVER ")]
    argv, server_env = json.loads(line[len("SERVER ") :])
    return argv, server_env


def options(port: int, root: str) -> list[str]:
    return ["--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=None", *ALLOW_ROOT]  # fmt: skip


def test_offload_jupyter_runs_jupyterlab_on_a_port_it_reports_with_the_common_options(local, tmp_path, monkeypatch):
    """``offload jupyter``'s job: the launcher with no server command runs ``python -m jupyterlab --no-browser``
    and the common options; the port it picked is in jupyter.json and in the server's environment."""
    submitted = []

    def submit(site, spec):  # the seam: what start() would submit
        submitted.append(spec)
        return site.job("42", jobdir="/nowhere")

    monkeypatch.setattr(offload.Site, "submit", submit)
    job, token = jl.start(local, gpus=1, walltime="01:00:00")
    assert job.id == "42"
    (spec,) = submitted
    root = f"{tmp_path}/work/notebooks"
    assert list(spec.command) == [sys.executable, "-c", LAUNCHER, root]  # the local site's Python, no server: Lab
    assert spec.secrets == {"JUPYTER_TOKEN": token} and token not in repr(spec.command)
    assert spec.prologue == (f"(umask 077 && mkdir -p {root})",) and spec.relay and spec.name == "jupyter"
    assert (spec.resources.gpus, spec.resources.walltime) == (1, "01:00:00")

    jobdir = tmp_path / "job"
    argv, env = run(list(spec.command), jobdir, fake_module(tmp_path / "fake", "jupyterlab"))
    info = json.loads((jobdir / "jupyter.json").read_text())
    assert info["host"] == socket.gethostname()
    assert argv == ["--no-browser", *options(info["port"], root)]
    assert env["OFFLOAD_JUPYTER_PORT"] == str(info["port"]) and env["OFFLOAD_JUPYTER_ROOT"] == root
    assert Path(root).is_dir()
    # Jupyter's own directories are the job's, private; the login session's runtime dir is gone
    assert env["JUPYTER_RUNTIME_DIR"] == str(jobdir / "jupyter" / "runtime")
    assert stat.S_IMODE((jobdir / "jupyter" / "runtime").stat().st_mode) == 0o700
    assert "XDG_RUNTIME_DIR" not in env


def test_a_given_server_command_gets_the_options_after_it_each_argument_as_written(local, tmp_path):
    server = [sys.executable, "-c", PRINT, "two words", "$(touch pwned)", "--port=1", "it's"]
    spec = offload.jupyter_spec(local, server=server, root=str(tmp_path / "served"), notebooks=None)
    assert list(spec.command) == [sys.executable, "-c", LAUNCHER, str(tmp_path / "served"), *server]
    assert spec.mounts == () and spec.prologue == ()  # a root of its own: no notebooks folder
    argv, env = run(list(spec.command), tmp_path / "job")
    port = int(env["OFFLOAD_JUPYTER_PORT"])
    assert argv == ["two words", "$(touch pwned)", "--port=1", "it's", *options(port, str(tmp_path / "served"))]
    assert not (tmp_path / "job" / "pwned").exists()


def test_a_root_under_tilde_is_the_home_seen_in_the_job(local, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    spec = offload.jupyter_spec(local, server=[sys.executable, "-c", PRINT], root="~/nb", workdir=str(tmp_path / "w"))
    assert spec.command[3] == "~/nb"  # expanded in the job, not here
    assert spec.prologue == (f"(umask 077 && mkdir -p {tmp_path}/w/notebooks)",)  # the notebooks folder all the same
    argv, env = run(list(spec.command), tmp_path / "job", {"HOME": str(home)})
    assert argv == options(int(env["OFFLOAD_JUPYTER_PORT"]), f"{home}/nb")
    assert env["OFFLOAD_JUPYTER_ROOT"] == str(home / "nb") and (home / "nb").is_dir()


def test_a_server_needs_a_root_or_a_notebooks_folder(local):
    with pytest.raises(ValueError, match="root directory or a notebooks folder"):
        offload.jupyter_spec(local, notebooks=None)
