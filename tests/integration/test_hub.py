"""A real JupyterHub (PyPI jupyterhub, configurable-http-proxy from npm, the dummy authenticator) with
``OffloadSpawner`` on the test site: single-user servers as jobs on compute nodes that cannot reach the hub,
reached through offload's SSH connection both ways.

The user's session in JupyterLab through the hub runs on both of the site's schedulers (SLURM and Grid Engine):
it is what shows the spawner works on a scheduler. The other tests stay on SLURM: they test the hub's side (one
poller for every session, counted with the site's squeue call log; a hub restart finding its sessions from its
own state; the idle culler), which the scheduler under the site does not change."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

import offload
from tests import leftovers
from tests.conftest import both_sites

from .browser import CHROMIUM, visit
from .conftest import STATE, queued_jobs, wait_for_state
from .test_jupyter import run_cell

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
CHP = os.environ.get("OFFLOAD_TEST_CHP") or str(Path(sys.prefix) / "node" / "node_modules" / ".bin" /
                                                "configurable-http-proxy")  # fmt: skip
LOGIN_ADDR = "10.231.77.1"  # the login node's address on the cluster network (scripts/testsite)
TOKEN = "offload-hub-test-" + os.urandom(8).hex()
PASSWORD = "not-a-real-password"

pytestmark = pytest.mark.skipif(not Path(CHP).exists(), reason="configurable-http-proxy is not installed (tox "
                                "-e integration installs it with npm)")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hub:
    """A JupyterHub process with OffloadSpawner, restartable on the same ports, database and secrets."""

    def __init__(self, folder: Path, site: str = "testsite", culler: bool = False, policy: str = "first-fit") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.public, self.hub_port, self.proxy_api = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.public}"
        services = [{"name": "tester", "api_token": TOKEN}]
        scopes = ["admin:users", "admin:servers", "tokens", "read:users:activity", "access:servers", "read:servers"]
        roles = [{"name": "tester", "services": ["tester"], "scopes": scopes}]
        if culler:
            services.append({"name": "idle-culler", "command": [
                sys.executable, "-m", "jupyterhub_idle_culler", "--timeout=20", "--cull-every=5"]})  # fmt: skip
            roles.append({"name": "idle-culler", "services": ["idle-culler"], "scopes": [
                "list:users", "read:users:activity", "read:servers", "delete:servers"]})  # fmt: skip
        (folder / "jupyterhub_config.py").write_text(
            textwrap.dedent(f"""
            c = get_config()  # noqa
            c.JupyterHub.ip = "127.0.0.1"
            c.JupyterHub.port = {self.public}
            # The hub's API listens on the cluster network too, so the test can show nodes cannot reach it.
            c.JupyterHub.hub_bind_url = "http://0.0.0.0:{self.hub_port}"
            c.JupyterHub.hub_connect_url = "http://{LOGIN_ADDR}:{self.hub_port}"
            c.JupyterHub.db_url = "sqlite:///{folder}/jupyterhub.sqlite"
            c.JupyterHub.cookie_secret_file = "{folder}/cookie_secret"
            c.JupyterHub.cleanup_servers = False  # a restarted hub finds its sessions
            c.JupyterHub.allow_named_servers = True
            c.JupyterHub.last_activity_interval = 3600  # activity comes from the servers' own reports only
            c.JupyterHub.authenticator_class = "dummy"
            c.DummyAuthenticator.password = {PASSWORD!r}
            c.Authenticator.allow_all = True
            c.ConfigurableHTTPProxy.command = [{CHP!r}]
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api}"
            c.ConfigurableHTTPProxy.auth_token = {TOKEN!r}
            c.JupyterHub.services = {services!r}
            c.JupyterHub.load_roles = {roles!r}
            c.JupyterHub.spawner_class = "offload"
            c.OffloadSpawner.site = {site!r}
            c.OffloadSpawner.policy = {policy!r}
            c.OffloadSpawner.walltime = "00:30:00"
            c.OffloadSpawner.poll_interval = 1
            c.OffloadSpawner.environment = {{"JUPYTERHUB_ACTIVITY_INTERVAL": "5"}}
            c.OffloadSpawner.profiles = [
                {{"display_name": "1 GPU", "slug": "gpu1", "gpus": 1, "description": "a GPU node"}},
                {{"display_name": "CPU", "slug": "cpu", "gpus": 0, "default": True}},
            ]
        """)
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.folder / "hub.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", "jupyterhub_config.py"],
                                     cwd=self.folder, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 90
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/hub/health", timeout=2).status_code == 200:
                    return
            assert self.proc.poll() is None, f"the hub exited:\n{self.log()[-4000:]}"
            assert time.time() < deadline, f"the hub did not come up:\n{self.log()[-4000:]}"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)

    def log(self) -> str:
        return (self.folder / "hub.log").read_text(errors="replace")

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, f"{self.url}/hub/api{path}", headers={"Authorization": f"token {TOKEN}"},
                                timeout=60, **kwargs)  # fmt: skip

    def spawn(self, user: str, name: str = "", **options) -> None:
        """Create ``user`` if need be and start their server ``name`` with ``options`` (a profile, say)."""
        self.api("POST", f"/users/{user}")  # 201, or 409 if the user exists
        path = f"/users/{user}/server" + (f"s/{name}" if name else "")
        response = self.api("POST", path, json=options)
        assert response.status_code in (201, 202), response.text

    def server(self, user: str, name: str = "") -> dict | None:
        return self.api("GET", f"/users/{user}").json().get("servers", {}).get(name)

    def wait_ready(self, user: str, name: str = "", timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while True:
            server = self.server(user, name)
            if server and server.get("ready"):
                return server
            assert time.time() < deadline, f"{user}'s server is not ready: {server}\n{self.log()[-3000:]}"
            time.sleep(1)

    def user_token(self, user: str) -> str:
        response = self.api("POST", f"/users/{user}/tokens", json={"note": "test", "expires_in": 3600})
        assert response.status_code in (200, 201), response.text
        return response.json()["token"]


@pytest.fixture
def hub(tmp_path, site_name, site_user):
    """Start a hub whose spawner uses the test's site (``site_name``); at the end its sessions are stopped."""
    made: list[Hub] = []

    def make(**kwargs) -> Hub:
        hub = Hub(tmp_path / f"hub{len(made)}", **{"site": site_name, **kwargs})
        made.append(hub)
        hub.start()
        return hub

    yield make
    for hub in made:
        with contextlib.suppress(Exception):
            for user in hub.api("GET", "/users").json():
                for name in user.get("servers", {}):
                    path = f"/users/{user['name']}/server" + (f"s/{name}" if name else "")
                    hub.api("DELETE", path)
        time.sleep(2)
        hub.stop()
    leftovers.cancel(site_user, queued_jobs(site_user, "hub-blocker"))  # a failed test's blockers


def login(hub: Hub, user: str) -> requests.Session:
    session = requests.Session()
    session.get(f"{hub.url}/hub/login", timeout=30)
    xsrf = session.cookies.get("_xsrf")
    response = session.post(f"{hub.url}/hub/login", data={"username": user, "password": PASSWORD, "_xsrf": xsrf},
                            timeout=30)  # fmt: skip
    assert response.status_code == 200 and "jupyterhub-session-id" in session.cookies, response.text[:1000]
    return session


def progress_events(hub: Hub, user: str):
    with hub.api("GET", f"/users/{user}/server/progress", stream=True) as response:
        for raw in response.iter_lines(decode_unicode=True):
            if raw and raw.startswith("data:"):
                yield json.loads(raw[5:])


def job_of(site_user: str, user: str, server: str = "default") -> list[str]:
    return queued_jobs(site_user, f"jupyterhub-{user}-{server}")


# What each scheduler says of a job that waits for GPUs (SLURM's reason, in the spawner's words; Grid Engine's qstat
# gives none), and what a job's one GPU is (Grid Engine counts GPUs but binds none: no CUDA_VISIBLE_DEVICES).
WAITING = {"testsite": "PENDING (Resources): waiting for resources", "gridengine": "PENDING (waiting)"}
ONE_GPU = {"testsite": "0", "gridengine": "none"}


@both_sites
def test_a_user_picks_a_gpu_profile_and_works_in_jupyterlab_through_the_hub(hub, site, site_name, site_user,
                                                                            tmp_path):  # fmt: skip
    hub = hub()
    # Every GPU busy first, so the session has to wait, and the spawn page says why (the scheduler's reason).
    blockers = site.submit_many([offload.JobSpec(["sleep", "600"], name="hub-blocker",
                                                 resources=offload.Resources(gpus=2))] * 2, arrays=False)  # fmt: skip
    for job in blockers:
        wait_for_state(job, offload.JobState.RUNNING)
    session = login(hub, "alice")
    form = session.get(f"{hub.url}/hub/spawn", timeout=30).text
    assert "1 GPU" in form and 'value="gpu1"' in form
    spawned = session.post(f"{hub.url}/hub/spawn", data={"profile": "gpu1", "_xsrf": session.cookies.get("_xsrf")},
                           timeout=60, allow_redirects=False)  # fmt: skip
    assert spawned.status_code in (302, 303), spawned.text[:500]
    messages = []
    for event in progress_events(hub, "alice"):
        messages.append(event.get("message", ""))
        if WAITING[site_name] in messages[-1] and blockers:
            for job in blockers:  # the reason was shown: let the session start
                job.cancel()
            blockers = []
        if event.get("ready") or event.get("failed"):
            break
    assert not blockers, messages
    assert any(WAITING[site_name] in m for m in messages), messages
    assert hub.wait_ready("alice")
    jobs = job_of(site_user, "alice")
    assert len(jobs) == 1

    # The browser's way in: the hub's login, then OAuth to the single-user server (whose token check goes to
    # the hub API through the relay), then JupyterLab, in a real headless Chromium.
    lab = session.get(f"{hub.url}/user/alice/lab", timeout=60)
    assert lab.status_code == 200 and "jupyter-config-data" in lab.text, lab.url
    assert "jupyterhub-user-alice" in session.cookies
    if CHROMIUM:
        ARTIFACTS.mkdir(exist_ok=True)
        cookies = [{"name": c.name, "value": c.value, "path": c.path} for c in session.cookies]
        visit(f"{hub.url}/user/alice/lab", cookies, ".jp-LabShell", ARTIFACTS / "jupyterhub-lab.png",
              tmp_path / "chromium")  # fmt: skip
    token = hub.user_token("alice")
    before = hub.server("alice")["last_activity"]
    printed = run_cell(f"{hub.url}/user/alice", token,
                       "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'none'))")  # fmt: skip
    assert printed.strip() == ONE_GPU[site_name]
    # activity reports reach the hub (through the relay: the hub reads no activity from its proxy here)
    deadline = time.time() + 60
    while hub.server("alice")["last_activity"] == before:
        assert time.time() < deadline, "no activity report reached the hub"
        time.sleep(1)

    # The node cannot open a connection to the hub's address itself (the hub's connect URL: the login node on
    # SLURM's cluster network, which neither scheduler's nodes may reach but on their scheduler's ports).
    probe = site.submit(offload.JobSpec(["python3", "-c", textwrap.dedent(f"""
        import socket
        try:
            socket.create_connection(("{LOGIN_ADDR}", {hub.hub_port}), timeout=5)
            print("reached")
        except OSError as exc:
            print("refused", exc)
    """)]))  # fmt: skip
    probe.wait(timeout=120)
    assert probe.output().decode().startswith("refused")
    assert requests.get(f"http://{LOGIN_ADDR}:{hub.hub_port}/hub/api", timeout=10).status_code == 200  # it listens

    # Stopping the server from the hub cancels the job.
    assert hub.api("DELETE", "/users/alice/server").status_code in (202, 204)
    deadline = time.time() + 90
    while job_of(site_user, "alice"):
        assert time.time() < deadline, "the job outlived its server"
        time.sleep(1)


def test_two_users_share_one_poller_and_a_restarted_hub_finds_their_sessions(hub, site_user):
    hub = hub()
    for user in ("alice", "bob"):
        hub.spawn(user, profile="cpu")
    for user in ("alice", "bob"):
        hub.wait_ready(user)
    jobs = {user: job_of(site_user, user) for user in ("alice", "bob")}
    assert all(len(j) == 1 for j in jobs.values()) and jobs["alice"] != jobs["bob"]
    # The hub polls each spawner every second; both sessions are answered by one squeue per poll interval.
    calls = STATE / "calls" / "squeue.log"
    start = time.time()
    time.sleep(12)
    window = [float(t) for t in calls.read_text().split() if float(t) >= start]
    assert len(window) <= 12 * 1.5 + 2, f"{len(window)} squeue calls in 12 s for two sessions"

    token = hub.user_token("alice")
    url = f"{hub.url}/user/alice/api/status"
    assert requests.get(url, headers={"Authorization": f"token {token}"}, timeout=30).status_code == 200
    hub.stop()
    assert job_of(site_user, "alice") == jobs["alice"]  # the sessions outlive the hub
    hub.start()
    deadline = time.time() + 120
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, headers={"Authorization": f"token {token}"}, timeout=10).status_code == 200:
                break
        assert time.time() < deadline, f"the session is not reachable after the restart:\n{hub.log()[-3000:]}"
        time.sleep(1)
    assert job_of(site_user, "alice") == jobs["alice"] and job_of(site_user, "bob") == jobs["bob"]  # no duplicate


def test_named_servers_and_the_idle_culler(hub, site_user):
    pytest.importorskip("jupyterhub_idle_culler")
    hub = hub(culler=True)
    hub.spawn("carol", "scratch", profile="cpu")
    hub.wait_ready("carol", "scratch")
    assert len(job_of(site_user, "carol", "scratch")) == 1
    deadline = time.time() + 180
    while hub.server("carol", "scratch") is not None:
        assert time.time() < deadline, "the idle culler did not stop the idle session"
        time.sleep(2)
    deadline = time.time() + 60
    while job_of(site_user, "carol", "scratch"):
        assert time.time() < deadline, "the culled session's job is still queued"
        time.sleep(1)


def test_a_session_raced_over_two_clusters_starts_where_a_gpu_is_free(hub, testsite_config, site_user):
    """``policy = "race"`` over the test site's two SLURM clusters, every GPU of the test site held: the spawn
    submits an attempt to each (each made for its cluster), the second cluster's starts and is claimed, the test
    site's is released and cancelled, and the user's kernel runs on the second cluster's node. Stopping the
    server from the hub leaves no job on either cluster."""
    hog = offload.load_site("testsite")
    blockers = hog.submit_many([offload.JobSpec(["sleep", "600"], name="hub-blocker",
                                                resources=offload.Resources(gpus=2))] * 2, arrays=False)  # fmt: skip
    for job in blockers:
        wait_for_state(job, offload.JobState.RUNNING)
    hub = hub(site="@slurms", policy="race")
    try:
        hub.spawn("dora", profile="gpu1")
        hub.wait_ready("dora")
    finally:
        hog.cancel(blockers)
    said = hub.log()  # the race's steps, as the spawn page showed them
    assert "second: attempt" in said and "started first: claimed" in said, said[-3000:]
    assert "testsite: attempt" in said and "released and cancelled" in said, said[-3000:]
    token = hub.user_token("dora")
    printed = run_cell(f"{hub.url}/user/dora", token, "import socket; print(socket.gethostname())")
    assert printed.strip().startswith("second"), printed
    assert hub.api("DELETE", "/users/dora/server").status_code in (202, 204)
    deadline = time.time() + 90
    while any(job.name.startswith("jupyterhub-dora") for job in leftovers.site_jobs(site_user).values()):
        assert time.time() < deadline, leftovers.site_jobs(site_user)
        time.sleep(1)
