"""Apptainer, Singularity and Podman have no Debian package here: their contract is checked by the exact command
lines and preludes they produce. Charliecloud's is also run for real in tests/integration."""

import shlex
import subprocess

import pytest

from offload import ConfigError, Mount
from offload.plugins import plugins
from offload.runtimes.base import ContainerContext


def runtime(name, options=()):
    return plugins().runtime(name).factory(tuple(options))


CTX = ContainerContext(
    image="docker://ghcr.io/me/img:1",
    mounts=(Mount("/scratch/data set", "/data", True), Mount("/home/u")),
    env_names=("TOKEN", "MODE"),
    workdir="/work",
    gpus=2,
)


def test_apptainer_command_line():
    rt = runtime("apptainer")
    assert rt.command(["python3", "-c", "print(1)"], CTX) == [
        "apptainer", "exec", "--cleanenv", "--nv",
        "--bind", "/scratch/data set:/data:ro", "--bind", "/home/u:/home/u",
        "--pwd", "/work", "docker://ghcr.io/me/img:1", "python3", "-c", "print(1)",
    ]  # fmt: skip


def test_apptainer_passes_values_by_environment_not_argv():
    prelude = runtime("apptainer").prelude(CTX)
    assert 'export APPTAINERENV_TOKEN="${TOKEN}"' in prelude
    assert (
        '[ -n "${CUDA_VISIBLE_DEVICES+x}" ] && export APPTAINERENV_CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES}"'
        in (prelude)
    )


VALUE = "a 'b' $c `d` \\ e"


def test_apptainer_prelude_really_exports_into_the_prefixed_names():
    lines = runtime("apptainer").prelude(ContainerContext(image="x.sif", env_names=("TOKEN",)))
    script = "\n".join([f"export TOKEN={shlex.quote(VALUE)}", "unset ROCR_VISIBLE_DEVICES", *lines, "env"])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "1,3"})
    env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert env["APPTAINERENV_TOKEN"] == VALUE
    assert env["APPTAINERENV_CUDA_VISIBLE_DEVICES"] == "1,3"
    assert "APPTAINERENV_ROCR_VISIBLE_DEVICES" not in env


def test_singularity_uses_its_own_binary_and_prefix():
    rt = runtime("singularity", ["--rocm"])
    cmd = rt.command(["true"], CTX)
    assert cmd[:3] == ["singularity", "exec", "--cleanenv"]
    assert "--nv" not in cmd and "--rocm" in cmd  # the site's GPU flag wins
    assert rt.prelude(CTX)[0] == 'export SINGULARITYENV_TOKEN="${TOKEN}"'


def test_no_nv_without_gpus():
    ctx = ContainerContext(image="img.sif")
    assert runtime("apptainer").command(["true"], ctx) == ["apptainer", "exec", "--cleanenv", "img.sif", "true"]


def test_podman_command_line():
    cmd = runtime("podman").command(["python3"], CTX)
    assert cmd[:5] == ["podman", "run", "--rm", "--network=host", "--userns=keep-id"]
    assert cmd[5:7] == ["--device", "nvidia.com/gpu=all"]
    assert "-v" in cmd and "/scratch/data set:/data:ro" in cmd
    assert cmd[cmd.index("TOKEN") - 1 : cmd.index("TOKEN") + 1] == ["-e", "TOKEN"]
    # the argv replaces the image's ENTRYPOINT, as apptainer exec and ch-run run it (no entrypoint in front)
    assert cmd[-2:] == ['--entrypoint=["python3"]', "docker://ghcr.io/me/img:1"]
    spaced = runtime("podman").command(["/opt/my tool", "-x", "y z"], CTX)
    assert spaced[-4:] == ['--entrypoint=["/opt/my tool"]', "docker://ghcr.io/me/img:1", "-x", "y z"]


def test_charliecloud_command_line():
    ctx = ContainerContext(image="/images/debian", mounts=(Mount("/data", "/in"),), workdir="/in", gpus=1)
    assert runtime("charliecloud").command(["python3", "x.py"], ctx) == [
        "ch-run", "-b", "/data:/in", "-c", "/in", "/images/debian", "--", "python3", "x.py",
    ]  # fmt: skip


def test_charliecloud_makes_the_mount_points_an_image_lacks_or_says_why_it_cannot(tmp_path):
    """ch-run binds only onto directories the image has, and fails with "can't mkdir: Read-only file system"
    otherwise: the prelude makes them where it may, and where it may not stops with what to do."""
    image = tmp_path / "image"
    (image / "tmp").mkdir(parents=True)
    (image / "mnt").write_text("a file where a directory would go: mkdir fails, as in a read-only image")
    mounts = (Mount("/site/a", "/tmp"), Mount("/site/b", "/scratch/deep"), Mount("/site/c", "/mnt/x"))
    lines = runtime("charliecloud").prelude(ContainerContext(image=str(image), mounts=mounts[:2]))
    done = subprocess.run(["bash", "-c", "\n".join([*lines, "echo payload"])], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "payload\n", done.stderr
    assert (image / "scratch" / "deep").is_dir()
    lines = runtime("charliecloud").prelude(ContainerContext(image=str(image), mounts=mounts))
    done = subprocess.run(["bash", "-c", "\n".join([*lines, "echo payload"])], capture_output=True, text=True)
    assert done.returncode == 1 and "payload" not in done.stdout
    assert f"the image {image} has no directory /mnt/x to mount /site/c on" in done.stderr
    assert "under /mnt or /tmp" in done.stderr
    quoted = runtime("charliecloud").prelude(ContainerContext(image="/img/it's", mounts=(Mount("/a", "/b c"),)))
    assert shlex.split(quoted[0])[:5] == ["if", "[", "-d", "/img/it's", "]"]


@pytest.mark.parametrize("name", ["apptainer", "singularity", "podman", "charliecloud"])
def test_every_container_runtime_needs_an_image(name):
    with pytest.raises(ConfigError, match="no container image.*--image"):
        runtime(name).validate(ContainerContext(image=None))


@pytest.mark.parametrize("name", ["apptainer", "charliecloud"])
def test_bind_paths_with_separators_are_refused_before_submission(name):
    ctx = ContainerContext(image="/img", mounts=(Mount("/data:weird", "/d"),))
    with pytest.raises(ConfigError, match="cannot bind"):
        runtime(name).validate(ctx)


def test_charliecloud_refuses_registry_references_and_read_only_binds():
    with pytest.raises(ConfigError, match='pull = "login"'):
        runtime("charliecloud").validate(ContainerContext(image="docker://debian"))
    with pytest.raises(ConfigError, match="read-only"):
        runtime("charliecloud").validate(ContainerContext(image="/img", mounts=(Mount("/a", "/b", True),)))


def test_no_runtime_runs_the_command_as_is():
    rt = runtime("none")
    assert rt.command(["echo", "a b"], ContainerContext(image=None, workdir="/tmp")) == ["echo", "a b"]
    assert rt.prelude(ContainerContext(image=None, workdir="/tmp/x y")) == ["cd '/tmp/x y'"]


def test_the_job_directory_is_bound_where_offload_job_dir_says():
    ctx = ContainerContext(image="/img", jobdir="/home/u/offload/jobs/j1")
    assert runtime("apptainer").command(["x"], ctx)[3:5] == ["--bind", "/home/u/offload/jobs/j1"]
    assert runtime("podman").command(["x"], ctx)[5:7] == ["-v", "/home/u/offload/jobs/j1:/home/u/offload/jobs/j1"]
    assert runtime("charliecloud").command(["x"], ctx)[:4] == [
        "ch-run", "-b", "/home/u/offload/jobs/j1:/mnt/9", "--set-env=OFFLOAD_JOB_DIR=/mnt/9",
    ]  # fmt: skip


@pytest.mark.parametrize("scheduler,own,other", [("slurm", "SLURM_JOB_ID", "SGE_TASK_ID"),
                                                 ("gridengine", "SGE_TASK_ID", "SLURM_JOB_ID")])  # fmt: skip
def test_a_clean_environment_container_gets_what_its_scheduler_tells_the_job(tmp_path, monkeypatch, scheduler, own,
                                                                             other):  # fmt: skip
    """Apptainer runs with --cleanenv: the scheduler plugin names what the job is told (SLURM_* or Grid Engine's
    JOB_ID, SGE_TASK_ID...), the runtime passes those in; the runtime knows no scheduler's words itself."""
    import offload

    (tmp_path / "sites.toml").write_text(
        f"[sites.s]\nhost = 'login.invalid'\nscheduler = '{scheduler}'\nruntime = 'apptainer'\nimage = '/i.sif'\n"
        "workdir = '/w'\n" + ("parallel_environment = 'pe'\n" if scheduler == "gridengine" else "")
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    script = offload.load_site("s").job_script(offload.JobSpec(["true"]))
    assert f"APPTAINERENV_{own}=" in script and f"APPTAINERENV_{other}=" not in script
    assert "APPTAINERENV_CUDA_VISIBLE_DEVICES=" in script  # the node's own, whatever the scheduler
