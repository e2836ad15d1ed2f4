"""OffloadSpawner without a hub: what the spawn form offers and accepts, and how the hub's environment is split
into plain values, secrets and reach targets. The hub itself runs in tests/integration/test_hub.py."""

from types import SimpleNamespace

import pytest

pytest.importorskip("jupyterhub")

import offload
from jupyterhub_offload import OffloadSpawner

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
    spec = s._spec("/work", s._profile())
    assert spec.secrets["JUPYTERHUB_API_TOKEN"] == "secret-token-value"
    assert "JUPYTERHUB_API_TOKEN" not in spec.env and "secret-token-value" not in repr(spec.env)
    assert spec.reach["JUPYTERHUB_API_URL"] == "http://10.0.0.5:8081/hub/api"
    assert spec.reach["JUPYTERHUB_ACTIVITY_URL"] == "http://10.0.0.5:8081/hub/api/users/alice/activity"
    assert "JUPYTERHUB_SERVICE_URL" not in spec.env  # the job picks its port
    assert spec.env["JUPYTERHUB_USER"] == "alice" and "PATH" not in spec.env  # nothing of the hub's own env
    assert spec.name == "jupyterhub-alice-default" and spec.relay
    assert spec.command[-1] == "hub"
    assert spec.prologue == ("mkdir -p -m 700 /work/hub/alice/notebooks",)
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
    name = s._spec(await site.aworkdir(), s._profile()).name
    lost = await site.asubmit(offload.JobSpec(["sleep", "120"], name=name))
    other = await site.asubmit(offload.JobSpec(["sleep", "120"], name="jupyterhub-bob-default"))
    try:
        await s._cancel_lost_jobs(site, name)
        assert (await lost.finished(timeout=30)).state is offload.JobState.CANCELLED
        assert (await other.astatus()).state is offload.JobState.RUNNING  # another user's session stays
        assert any(f"Cancelled job {lost.id}" in news for news in s._news)
    finally:
        await site.acancel([lost, other])
