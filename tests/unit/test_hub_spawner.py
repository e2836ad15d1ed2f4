"""OffloadSpawner without a hub: what the spawn form offers and accepts, and how the hub's environment is split
into plain values, secrets and reach targets. The hub itself runs in tests/integration/test_hub.py."""

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("jupyterhub")

import offload
from jupyterhub_offload import OffloadSpawner
from jupyterhub_offload.spawner import SINGLEUSER

PROFILES = [
    {"display_name": "1 GPU <b>", "slug": "gpu1", "gpus": 1, "images": ["default-img", "mine"]},
    {"display_name": "CPU", "slug": "cpu", "gpus": 0, "default": True},
]


@pytest.fixture
def local(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    (tmp_path / "sites.toml").write_text("")
    monkeypatch.setenv("OFFLOAD__LOCAL__WORKDIR", str(tmp_path / "work"))


def spawner(**kwargs) -> OffloadSpawner:
    user = SimpleNamespace(name="alice", escaped_name="alice", url="/user/alice/")
    hub = SimpleNamespace(api_url="http://10.0.0.5:8081/hub/api", base_url="/hub/", public_host="")
    kwargs.setdefault("profiles", PROFILES) if "config" not in kwargs else None
    s = OffloadSpawner(user=user, hub=hub, **kwargs)
    s.api_token = "secret-token-value"
    return s


def test_the_form_offers_the_profiles_escaped_and_accepts_only_them(local):
    s = spawner()
    form = s._render_form(s)
    assert 'value="gpu1"' in form and "1 GPU &lt;b&gt;" in form and "<b>" not in form
    assert 'value="cpu" checked' in form
    s.user_options = s.options_from_form({"profile": ["gpu1"], "image-gpu1": ["mine"]})
    assert s._profile()["gpus"] == 1 and s._profile()["image"] == "mine"
    s.user_options = {"profile": "gpu1", "image": "something-else"}
    with pytest.raises(ValueError, match="not one of profile 'gpu1'"):
        s._profile()
    s.user_options = {"profile": "huge"}
    with pytest.raises(ValueError, match="no profile 'huge'"):
        s._profile()
    s.user_options = {}
    assert s._profile()["slug"] == "cpu"  # the default one


def test_the_token_is_a_secret_and_the_hub_api_a_reach_target(local):
    s = spawner()
    s.user_options = {"profile": "cpu"}
    s._site_key = ("local", None, None)
    spec = s._spec(s._site(), "/work", s._profile())
    assert spec.secrets["JUPYTERHUB_API_TOKEN"] == "secret-token-value"
    assert "JUPYTERHUB_API_TOKEN" not in spec.env and "secret-token-value" not in repr(spec.env)
    assert spec.reach["JUPYTERHUB_API_URL"] == "http://10.0.0.5:8081/hub/api"
    assert spec.reach["JUPYTERHUB_ACTIVITY_URL"] == "http://10.0.0.5:8081/hub/api/users/alice/activity"
    assert "JUPYTERHUB_SERVICE_URL" not in spec.env  # the job picks its port
    assert spec.env["JUPYTERHUB_USER"] == "alice" and "PATH" not in spec.env  # nothing of the hub's own env
    assert spec.name == "jupyterhub-alice-default" and spec.relay
    assert spec.command[-2] == SINGLEUSER  # the hub's single-user command, as offload's launcher's server
    assert spec.prologue == ("(umask 077 && mkdir -p /work/hub/alice/notebooks)",)
    assert "secret-token-value" not in offload.load_site("local").job_script(spec)


def test_site_accounts_come_from_the_callables(local):
    s = spawner(site_user=lambda sp: f"hpc-{sp.user.name}", ssh_identity="/keys/{x}")
    assert s._resolve(s.site_user) == "hpc-alice" and s._resolve(s.ssh_identity) == "/keys/{x}"


def test_state_round_trip_without_a_job(local):
    s = spawner()
    assert s.get_state() == {}
    s.load_state({})
    assert s.job is None


def test_the_example_config_configures_the_spawner(local):
    from pathlib import Path

    from traitlets.config.loader import PyFileConfigLoader

    example = Path(__file__).parents[2] / "examples" / "jupyterhub_config.py"
    config = PyFileConfigLoader(example.name, str(example.parent)).load_config()
    assert config.JupyterHub.spawner_class == "offload"
    s = spawner(config=config)
    assert s.site == "testsite" and s._slugs() == ["gpu1", "gpu2", "cpu"]
    s.user_options = {"profile": "cpu", "image": "my-lab-image"}
    assert s._profile()["image"] == "my-lab-image" and s._profile()["cpus"] == 4


def test_the_entry_point_names_the_spawner():
    from importlib.metadata import entry_points

    (found,) = [e for e in entry_points(group="jupyterhub.spawners") if e.name == "offload"]
    assert found.load() is OffloadSpawner


async def test_a_job_left_from_a_spawn_the_hub_lost_is_cancelled_before_the_next_is_submitted(local):
    """The hub restarted while the session queued: it never saved the job id (JupyterHub saves state after
    start() returns), so a respawn finds the job by its server's name and cancels it, rather than make a second."""
    s = spawner()
    s.user_options = {"profile": "cpu"}
    s._site_key = ("local", None, None)
    site = s._site()
    name = s._spec(site, await site.aworkdir(), s._profile()).name
    lost = await site.asubmit(offload.JobSpec(["sleep", "120"], name=name))
    other = await site.asubmit(offload.JobSpec(["sleep", "120"], name="jupyterhub-bob-default"))
    try:
        await s._cancel_lost_jobs(site, name)
        assert (await lost.finished(timeout=30)).state is offload.JobState.CANCELLED
        assert (await other.astatus()).state is offload.JobState.RUNNING  # another user's session stays
        assert any(f"Cancelled job {lost.id}" in news for news in s._news)
    finally:
        await site.acancel([lost, other])


async def test_start_tells_the_jobs_states_and_returns_once_the_server_reported_its_port(local, tmp_path):
    import sys

    config = hub_config(tmp_path, f"""
c.Spawner.cmd = [{sys.executable!r}, "-c", "import time; time.sleep(60)"]
""")  # fmt: skip
    s = spawner(config=config)
    s.user_options = {}
    try:
        host, port = await asyncio.wait_for(s.start(), 60)
        assert host == "127.0.0.1" and port == s.local_port and s.remote_port
        states = [news for news in s._news if news.startswith(f"Job {s.job.id}: ")]
        assert states[-1].startswith(f"Job {s.job.id}: RUNNING") and len(set(states)) == len(states)
        assert s._news[-1].startswith("Server starting on")
    finally:
        await s.stop()


# -- the hub's own settings ---------------------------------------------------------------------------------------


def hub_config(tmp_path, text: str):
    """The hub's config as JupyterHub loads it: a jupyterhub_config.py read by traitlets' PyFileConfigLoader (what
    ``Application.load_config_file`` uses); the spawner then gets it as ``config=``, as ``User._new_spawner``
    passes it."""
    from traitlets.config.loader import PyFileConfigLoader

    (tmp_path / "jupyterhub_config.py").write_text(text)
    return PyFileConfigLoader("jupyterhub_config.py", str(tmp_path)).load_config()


# The "single-user server" of these tests: prints the argv and environment it was started with, as JSON.
PRINT_ARGV = "import json, os, sys; print('ARGV ' + json.dumps([sys.argv[1:], dict(os.environ)]), flush=True)"


ALLOW_ROOT = ["--allow-root"] if os.getuid() == 0 else []


def launcher_options(port: int, root: str) -> list[str]:
    """What offload's Jupyter launcher appends to a server's command (offload.jupyter_spec)."""
    return ["--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=None", *ALLOW_ROOT]  # fmt: skip


async def run_session(s: OffloadSpawner) -> tuple[offload.JobSpec, list[str], dict[str, str], dict]:
    """The spawner's job on the local site, run to its end: its spec, the argv and environment the stand-in server
    (PRINT_ARGV) printed, and the launcher's jupyter.json."""
    s._site_key = ("local", None, None)
    site = s._site()
    spec = s._spec(site, await site.aworkdir(), s._profile())
    job = await site.asubmit(spec)
    try:
        status = await job.finished(timeout=60)
        out = await job.atail(200)
        info = json.loads(await job.aget("jupyter.json"))
    finally:
        await site.acancel([job])
    assert status.state is offload.JobState.COMPLETED, out
    (line,) = [line for line in out.splitlines() if line.startswith("ARGV ")]
    argv, env = json.loads(line[5:])
    return spec, argv, env, info


async def test_the_hubs_cmd_args_notebook_dir_and_default_url_reach_the_server_quoted(local, tmp_path):
    """c.Spawner.cmd runs with Spawner.get_args() after it (as batchspawner and KubeSpawner run cmd + get_args()),
    each argument arriving as the admin wrote it through the batch script's shell; notebook_dir is the server's
    root (after offload's own --ServerApp.root_dir) and default_url reaches it as JupyterHub passes it."""
    config = hub_config(tmp_path, f"""
c.Spawner.cmd = [{sys.executable!r}, "-c", {PRINT_ARGV!r}]
c.Spawner.args = ["--x=$(touch {tmp_path}/pwned)", "two words", "it's \\"q\\" `id`", "a;b|c&d", "*"]
c.Spawner.notebook_dir = {str(tmp_path / "nb-{username}")!r}
c.Spawner.default_url = "/lab/tree/{{username}}"
""")  # fmt: skip
    s = spawner(config=config)
    _, argv, env, _ = await run_session(s)
    assert argv[-len(s.get_args()) :] == s.get_args()  # Spawner.get_args(): what the hub passes after cmd
    assert not (tmp_path / "pwned").exists()
    roots = [a.split("=", 1)[1] for a in argv if a.startswith("--ServerApp.root_dir=")]
    assert roots[-1] == str(tmp_path / "nb-alice") and (tmp_path / "nb-alice").is_dir()
    assert env["JUPYTERHUB_DEFAULT_URL"] == "/lab/tree/alice"


async def test_the_hub_command_line_is_cmd_then_the_launchers_options_then_args(local, tmp_path):
    """The server runs ``cmd``, offload's launcher's options, then ``get_args()`` (so the hub's args win), every
    element of cmd and args one argument as the admin wrote it, through the batch script's shell; its URL is
    the launcher's port with the hub's prefix."""
    config = hub_config(tmp_path, f"""
c.Spawner.cmd = [{sys.executable!r}, "-c", {PRINT_ARGV!r}, "$(touch {tmp_path}/pwned-cmd)", "it's a 'cmd'", ";|&"]
c.Spawner.args = ["--port=1", "--x=`touch {tmp_path}/pwned-args`", "two words", '"q"', "*", ""]
c.Spawner.environment = {{"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"}}
""")  # fmt: skip
    s = spawner(config=config)
    spec, argv, env, info = await run_session(s)
    root = spec.command[3]
    cmd_args = [f"$(touch {tmp_path}/pwned-cmd)", "it's a 'cmd'", ";|&"]  # what cmd gives its -c program
    assert argv == [*cmd_args, *launcher_options(info["port"], root), *s.get_args()]
    assert env["JUPYTERHUB_SERVICE_URL"] == f"http://127.0.0.1:{info['port']}/user/alice/"
    assert not list(tmp_path.glob("pwned*"))


def test_the_singleuser_program_sets_the_service_url_from_the_launchers_port(tmp_path):
    """Run as the launcher runs it (``python -c SINGLEUSER '[cmd, args]' OPTIONS``), on this machine: a hub's URL
    for the server is replaced by the launcher's port and the hub's prefix; without a cmd of the hub's, it runs
    ``python -m jupyterhub.singleuser`` (here a stand-in package first on PYTHONPATH)."""
    fake = tmp_path / "fake" / "jupyterhub" / "singleuser"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").touch()
    (fake / "__init__.py").touch()
    (fake / "__main__.py").write_text(PRINT_ARGV + "\n")
    options = launcher_options(43210, "/home/alice/nb")
    env = {**os.environ, "OFFLOAD_JUPYTER_PORT": "43210", "JUPYTERHUB_SERVICE_URL": "http://10.0.0.9:8888/wrong/",
           "PYTHONPATH": str(tmp_path / "fake")}  # fmt: skip
    args = ["--SingleUserNotebookApp.default_url=/lab", "a b"]
    cases = [
        ([sys.executable, "-c", PRINT_ARGV, "$(x)"], "/user/alice/x%20y/", ["$(x)", *options, *args]),
        (None, None, [*options, *args]),  # no prefix from the hub: "/"
    ]
    for cmd, prefix, expected in cases:
        env.pop("JUPYTERHUB_SERVICE_PREFIX", None)
        if prefix:
            env["JUPYTERHUB_SERVICE_PREFIX"] = prefix
        done = subprocess.run([sys.executable, "-c", SINGLEUSER, json.dumps([cmd, args]), *options], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        argv, server_env = json.loads(done.stdout.removeprefix("ARGV "))
        assert argv == expected
        assert server_env["JUPYTERHUB_SERVICE_URL"] == f"http://127.0.0.1:43210{prefix or '/'}"


async def test_a_notebook_dir_under_tilde_is_the_home_seen_in_the_job(local, tmp_path, monkeypatch):
    """Spawner.notebook_dir (JUPYTERHUB_ROOT_DIR) is the server's root, ``~`` expanded in the job with the home it
    sees there, as jupyterhub-singleuser expands it; the notebooks folder is still made and bound."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # the local site's jobs inherit it: the home "in the container"
    config = hub_config(tmp_path, f"""
c.Spawner.cmd = [{sys.executable!r}, "-c", {PRINT_ARGV!r}]
c.Spawner.notebook_dir = "~/nb-{{username}}"
""")  # fmt: skip
    s = spawner(config=config)
    spec, argv, env, info = await run_session(s)
    assert spec.command[3] == "~/nb-alice" and spec.env["JUPYTERHUB_ROOT_DIR"] == "~/nb-alice"
    assert spec.prologue == (f"(umask 077 && mkdir -p {tmp_path}/work/hub/alice/notebooks)",)
    assert argv == launcher_options(info["port"], str(home / "nb-alice"))
    assert env["OFFLOAD_JUPYTER_ROOT"] == str(home / "nb-alice") and (home / "nb-alice").is_dir()


def test_the_default_command_is_jupyterhub_singleuser(local):
    """Spawner.cmd's default, jupyterhub-singleuser, runs as the container's ``python3 -m jupyterhub.singleuser``
    (the same program, found even when the image's bin directory is not on PATH)."""
    s = spawner()
    assert s.cmd == ["jupyterhub-singleuser"] and s.get_args() == []
    s._site_key = ("local", None, None)
    spec = s._spec(s._site(), "/work", s._profile())
    assert spec.command[-1] == "[null, []]"  # no command of the hub's own: the program's jupyterhub.singleuser


def test_mem_and_cpu_limits_are_the_jobs_unless_the_profile_sets_them_and_profiles_set_account_and_qos(local, tmp_path):
    """The base Spawner's mem_limit and cpu_limit (as KubeSpawner maps them to the pod's limits) become the job's
    memory and cores, cores rounded up (SLURM gives whole cores); a profile's own memory/cpus win."""
    config = hub_config(tmp_path, """
c.Spawner.mem_limit = "3G"
c.Spawner.cpu_limit = 2.5
c.OffloadSpawner.profiles = [
    {"display_name": "Small", "slug": "small", "default": True},
    {"display_name": "Big", "slug": "big", "memory": "64G", "cpus": 16, "account": "proj1", "qos": "long"},
]
""")  # fmt: skip
    s = spawner(config=config)
    s._site_key = ("local", None, None)
    s.user_options = {}
    small = s._spec(s._site(), "/work", s._profile()).resources
    assert (small.memory_mb, small.cpus, small.account, small.qos) == (3072, 3, None, None)
    s.user_options = {"profile": "big"}
    big = s._spec(s._site(), "/work", s._profile())
    assert (big.resources.memory_mb, big.resources.cpus) == (64 * 1024, 16)
    assert (big.resources.account, big.resources.qos) == ("proj1", "long")
    # what jupyter-resource-usage shows is the job's, not the hub-wide limit
    assert big.env["MEM_LIMIT"] == str(64 * 1024**3) and big.env["CPU_LIMIT"] == "16"


async def test_profiles_may_be_a_callable_per_spawner_sync_or_async(local):
    """As KubeSpawner's profile_list: a callable taking the spawner, which may be a coroutine function; the spawn
    page (JupyterHub's Spawner.get_options_form) and the spawn both ask it."""

    async def per_user(spawner):
        return [{"display_name": f"{spawner.user.name}'s GPU", "slug": "mine", "gpus": 2, "account": "team-a"}]

    for profiles in (per_user, lambda spawner: [{"display_name": "GPU", "slug": "mine", "gpus": 2}]):
        s = spawner(profiles=profiles)
        form = await s.get_options_form()
        assert 'value="mine"' in form
        s.user_options = s.options_from_form({"profile": ["mine"]})
        assert (await s._chosen_profile())["gpus"] == 2
    s = spawner(profiles=lambda spawner: [{"display_name": "GPU", "gpu": 2}])
    s.user_options = {}
    with pytest.raises(ValueError, match="'gpu'.*gpus"):
        await s._chosen_profile()


async def test_stop_now_returns_without_waiting_for_the_job_to_end(local):
    """Spawner.stop(now=True) must not wait for the server to go: the cancel is sent and the call returns (as
    batchspawner's does), while stop() waits for the job's end. A stand-in job whose cancel takes 30 s (a slow
    scancel and a job slow to end) shows which one waited."""

    class SlowJob:
        id = "42"
        started = finished = False

        async def acancel(self):
            SlowJob.started = True
            await asyncio.sleep(30)
            SlowJob.finished = True

    s = spawner()
    s.job = SlowJob()
    await asyncio.wait_for(s.stop(now=True), 2)
    await asyncio.sleep(0.1)
    assert SlowJob.started and not SlowJob.finished
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(s.stop(), 0.5)
    for task in list(s._cancels):  # the test's end: the stand-in's 30 s cancel is not waited for
        task.cancel()


def test_a_profile_with_an_unknown_key_is_refused_when_the_config_loads(local, tmp_path):
    """Not at every visit of the spawn page (an HTTP 500 for every user): when the spawner is made from the hub's
    config, naming the profile, the key and the keys offload knows."""
    from traitlets import TraitError

    config = hub_config(tmp_path, """
c.OffloadSpawner.profiles = [{"display_name": "GPU", "slug": "gpu", "gpu": 1}]
""")  # fmt: skip
    with pytest.raises(TraitError, match=r"profiles\[0\] \('gpu'\).*'gpu'.*known keys.*'gpus'"):
        spawner(config=config)


def test_a_kubespawner_profile_is_mapped_where_the_meaning_is_the_same(local, tmp_path):
    """One profile list for a hub that also runs KubeSpawner: kubespawner_override's cpu_limit, mem_limit, image
    and extra_resource_limits {"nvidia.com/gpu": N} become cpus, memory, image and gpus."""
    from traitlets import TraitError

    config = hub_config(tmp_path, """
c.OffloadSpawner.profiles = [
    {
        "display_name": "2 GPUs",
        "slug": "gpu2",
        "description": "training",
        "kubespawner_override": {
            "cpu_limit": 7.5,
            "mem_limit": "32G",
            "image": "ghcr.io/me/lab:1",
            "extra_resource_limits": {"nvidia.com/gpu": "2"},
        },
    },
]
""")  # fmt: skip
    s = spawner(config=config)
    assert s.profiles == [{"display_name": "2 GPUs", "slug": "gpu2", "description": "training", "cpus": 8,
                           "memory": "32768M", "image": "ghcr.io/me/lab:1", "gpus": 2}]  # fmt: skip
    s._site_key = ("local", None, None)
    s.user_options = {}
    res = s._spec(s._site(), "/work", s._profile()).resources
    assert (res.gpus, res.cpus, res.memory_mb) == (2, 8, 32 * 1024)

    refused = {
        "node_selector": r"kubespawner_override key 'node_selector'.*cpu_limit -> cpus.*partition",
        "mem_guarantee": r"kubespawner_override key 'mem_guarantee'.*mem_limit -> memory",
        "extra_resource_limits": r"extra_resource_limits key 'example.com/fpga'.*nvidia.com/gpu",
    }
    for key, message in refused.items():
        value = {"example.com/fpga": 1} if key == "extra_resource_limits" else "x"
        with pytest.raises(TraitError, match=message):
            spawner(profiles=[{"display_name": "K", "kubespawner_override": {key: value}}])
    with pytest.raises(TraitError, match=r"'profile_options'.*'images'"):
        spawner(profiles=[{"display_name": "K", "profile_options": {}}])
    with pytest.raises(TraitError, match=r"'gpus' twice"):
        spawner(profiles=[{"display_name": "K", "gpus": 1, "kubespawner_override": {
            "extra_resource_limits": {"nvidia.com/gpu": 2}}}])  # fmt: skip


async def test_a_profile_naming_several_sites_places_the_session_on_the_one_where_it_starts_first(
    tmp_path, monkeypatch
):
    """Two real local sites in a group; the choice is offload's ranking (both could start it now: the order
    given), asked with this user's account, and kept in the hub's state."""
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    (tmp_path / "sites.toml").write_text("".join(
        f'[sites.{name}]\ntransport = "local"\nscheduler = "local"\nruntime = "none"\nworkdir = "{tmp_path / name}"\n'
        for name in ("east", "west")) + '[groups]\npair = ["west", "east"]\n')  # fmt: skip
    s = spawner(profiles=[{"display_name": "Anywhere", "slug": "any", "site": "@pair"}])
    s.user_options = {"profile": "any"}
    assert await s._place(s._site_names(s._profile()), s._profile(), None, None) == "west"
    assert any("Placed on west" in news for news in s._news), s._news
    assert await s._place(["east"], {"site": "east"}, None, None) == "east"  # one site: no ranking
    with pytest.raises(offload.ConfigError, match="unknown group '@none'"):
        s._site_names({"site": "@none"})


async def test_a_session_raced_over_two_sites_runs_on_one_and_the_other_attempt_is_released(tmp_path, monkeypatch):
    """``policy="race"``: an attempt on each of two real local sites, each made for its site (its work
    directory's notebooks folder); the first to start is claimed and runs the server, the other is released and
    never runs it. A bad policy is refused when the hub reads its config, or a profile, before any spawn."""
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    monkeypatch.setenv("OFFLOAD_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "sites.toml").write_text("".join(
        f'[sites.{name}]\ntransport = "local"\nscheduler = "local"\nruntime = "none"\nworkdir = "{tmp_path / name}"\n'
        "poll_interval = 0.5\n" for name in ("east", "west")) + '[groups]\npair = ["west", "east"]\n')  # fmt: skip
    config = hub_config(tmp_path, f"c.Spawner.cmd = [{sys.executable!r}, '-c', {PRINT_ARGV!r}]")
    s = spawner(config=config, profiles=[{"display_name": "Anywhere", "slug": "any", "site": "@pair",
                                          "policy": "race"}])  # fmt: skip
    s.user_options = {"profile": "any"}
    profile = s._profile()
    job = await s._race(s._site_names(profile), None, None, profile, time.monotonic() + 60)
    status = await job.finished(timeout=60)
    assert status.state is offload.JobState.COMPLETED, await job.atail(50)
    assert "ARGV " in await job.atail(200)
    assert any("started first: claimed" in news for news in s._news), s._news
    assert any("released and cancelled" in news for news in s._news), s._news
    ran = [path for path in tmp_path.glob("*/jobs/*/output") if "ARGV " in path.read_text()]
    assert ran == [Path(job.ref.jobdir, "output")], ran
    assert (tmp_path / job.site.name / "hub" / "alice" / "notebooks").is_dir()  # the winner's own folder
    with pytest.raises(Exception, match="use one of first-fit, race"):
        spawner(policy="fastest")
    with pytest.raises(Exception, match="policy 'fastest'"):
        spawner(profiles=[{"display_name": "x", "slug": "x", "policy": "fastest"}])
