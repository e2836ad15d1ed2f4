"""``OffloadSpawner``: a JupyterHub spawner that starts single-user servers as offload jobs on HPC sites.

The hub runs anywhere (a cloud VM, a laptop); the site is reached over SSH only. Nothing connects from a
compute node to the hub:

* **hub -> server**: the single-user server listens on its node's loopback; the hub (and its proxy) reach it
  through ``Site.forward_job``, a 127.0.0.1 port on the hub's machine carried by the job's relay over the
  site's SSH connection;
* **server -> hub API** (OAuth token checks, activity reports for culling): ``JUPYTERHUB_API_URL`` and
  ``JUPYTERHUB_ACTIVITY_URL`` are ``reach`` targets, so the server sees them on its node's loopback and offload
  carries each connection back over the same relay, made from the hub's machine.

One SSH connection per site account, shared by every hub user mapped to it; one poller per connection (one
``squeue`` per interval for all of their sessions). The job id and the forward's local port are the spawner's
state, so a restarted hub finds its running sessions and forwards them again on the same ports.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from jupyterhub.spawner import Spawner
from traitlets import Callable, Dict, Integer, List, Unicode, Union, default

import offload
from offload import jupyter as jupyter_mod
from offload.config import load_profiles

# What the hub gives a single-user server that must not travel as plain environment: secrets instead
# (read from a 0600 file by the job and removed before the server starts).
SECRET_ENV = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")
# The hub's addresses the server calls: reached back through the job's relay, never directly.
REACH_ENV = ("JUPYTERHUB_API_URL", "JUPYTERHUB_ACTIVITY_URL")
# Set by the job itself (the port is picked free on the node).
DROPPED_ENV = ("JUPYTERHUB_SERVICE_URL",)
PROFILE_KEYS = {"display_name", "slug", "description", "default", "gpus", "cpus", "memory", "walltime",
                "partition", "image", "images", "site"}  # fmt: skip

# SLURM's pending reasons, in words for the spawn page (the reason itself is shown too).
PENDING_WORDS = {
    "Resources": "waiting for resources (the nodes or GPUs asked for are in use)",
    "Priority": "other jobs are ahead in the queue",
    "Dependency": "waiting for another job",
    "QOSMaxJobsPerUserLimit": "your QOS allows no more running jobs now",
    "AssocMaxJobsLimit": "your account allows no more running jobs now",
    "ReqNodeNotAvail": "the nodes asked for are not available (down, drained or reserved)",
    "PartitionTimeLimit": "the walltime asked for is longer than the partition allows",
    "BeginTime": "waiting for its start time",
}

_sites: dict[tuple[str, str | None, str | None], offload.Site] = {}


def site_for(name: str | None, user: str | None, identity: str | None) -> offload.Site:
    """One :class:`offload.Site` (one SSH connection, one poller) per site and account, for every hub user
    mapped to that account."""
    key = (name or "", user, identity)
    site = _sites.get(key)
    if site is None:
        config = load_profiles().get(name)
        changes: dict[str, Any] = {}
        if user:
            changes["user"] = user
        if identity:
            changes["identity_files"] = (identity,)
        site = _sites[key] = offload.Site(config.with_overrides(**changes) if changes else config)
    return site


class OffloadSpawner(Spawner):
    """Single-user servers as jobs on an HPC site, reached through the site's SSH connection."""

    site = Unicode(None, allow_none=True, help="The offload site profile (default: offload's default site).").tag(
        config=True
    )
    image = Unicode(None, allow_none=True, help="Container image with jupyterhub and jupyterlab in it.").tag(
        config=True
    )
    gpus = Integer(0, help="GPUs for a session (a profile may change it).").tag(config=True)
    cpus = Integer(None, allow_none=True, help="CPU cores for a session.").tag(config=True)
    memory = Unicode(None, allow_none=True, help="Memory for a session, e.g. 16G.").tag(config=True)
    walltime = Unicode("08:00:00", help="Walltime of a session: the server ends when it ends.").tag(config=True)
    partition = Unicode(None, allow_none=True, help="Partition (default: the site's; its GPU one with GPUs).").tag(
        config=True
    )
    secrets = Dict(help="More secrets for the server's environment (never in scripts or logs).").tag(config=True)
    site_user = Union(
        [Unicode(), Callable()], allow_none=True, default_value=None,
        help="The site account of a hub user: a name, or a callable taking the spawner (e.g. "
             "lambda spawner: spawner.user.name). Default: the profile's user.",
    ).tag(config=True)  # fmt: skip
    ssh_identity = Union(
        [Unicode(), Callable()], allow_none=True, default_value=None,
        help="The private key file of that account: a path, or a callable taking the spawner. Default: the "
             "profile's identity_files.",
    ).tag(config=True)  # fmt: skip
    profiles = List(
        Dict(),
        help="Choices on the spawn page, as KubeSpawner's profile_list: each a dict with display_name, slug, "
             "description, default, and overrides of gpus, cpus, memory, walltime, partition, image; 'images' "
             "(a list) lets the user pick one of those images.",
    ).tag(config=True)  # fmt: skip
    notebooks = Unicode(
        "hub/{username}/notebooks", help="Where a user's notebooks live, under the site's workdir."
    ).tag(config=True)

    # HPC queues take longer than a pod: wait (and say why) for a start, and for the server to answer.
    @default("start_timeout")
    def _start_timeout(self) -> int:
        return 1800

    @default("http_timeout")
    def _http_timeout(self) -> int:
        return 300

    @default("poll_interval")
    def _poll_interval(self) -> int:
        return 30

    @default("env_keep")
    def _env_keep(self) -> list[str]:
        return []  # the hub's PATH, venv and locale mean nothing in a container on a compute node

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job: offload.Job | None = None
        self.remote_port: int | None = None
        self.local_port: int | None = None
        self._forward: offload.Forward | None = None
        self._site_key: tuple[str | None, str | None, str | None] = (None, None, None)
        self._news: list[str] = []

    # -- who and where ------------------------------------------------------------------------------------

    def _resolve(self, value: Any) -> Any:
        return value(self) if callable(value) else value

    def _site(self) -> offload.Site:
        site_name, user, identity = self._site_key
        return site_for(site_name, user, identity)

    # -- the options form ---------------------------------------------------------------------------------

    @default("options_form")
    def _options_form(self) -> Any:
        return self._render_form if self.profiles else ""

    def _render_form(self, spawner: Spawner) -> str:
        rows = []
        for i, (slug, profile) in enumerate(zip(self._slugs(), self.profiles, strict=True)):
            checked = " checked" if profile.get("default") or (i == 0 and not any(p.get("default") for p in
                                                                                  self.profiles)) else ""  # fmt: skip
            images = "".join(f'<option value="{html.escape(img)}">{html.escape(img)}</option>'
                             for img in profile.get("images", []))  # fmt: skip
            choose = f'<select name="image-{html.escape(slug)}">{images}</select>' if images else ""
            rows.append(
                f'<label><input type="radio" name="profile" value="{html.escape(slug)}"{checked}> '
                f"<strong>{html.escape(profile.get('display_name', slug))}</strong> "
                f"{html.escape(profile.get('description', ''))}</label> {choose}<br>"
            )
        return "\n".join(rows)

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if "profile" in formdata:
            options["profile"] = formdata["profile"][0]
            image = formdata.get(f"image-{options['profile']}")
            if image:
                options["image"] = image[0]
        return options

    def _slugs(self) -> list[str]:
        slugs = []
        for i, profile in enumerate(self.profiles):
            unknown = set(profile) - PROFILE_KEYS
            if unknown:
                raise ValueError(f"OffloadSpawner.profiles[{i}] has unknown keys {sorted(unknown)}")
            slugs.append(profile.get("slug") or _slug(profile.get("display_name", f"profile-{i}")))
        return slugs

    def _profile(self) -> dict[str, Any]:
        """The chosen profile (checked against the admin's list: a user cannot ask for what is not offered)."""
        if not self.profiles:
            return {}
        wanted = self.user_options.get("profile")
        slugs = self._slugs()
        if wanted is None:  # the form was not used (the REST API without options): the default profile
            defaults = [slug for slug, p in zip(slugs, self.profiles, strict=True) if p.get("default")]
            wanted = (defaults or slugs)[0]
        for slug, profile in zip(slugs, self.profiles, strict=True):
            if wanted == slug:
                chosen = dict(profile)
                image = self.user_options.get("image")
                if image is not None:
                    if image not in profile.get("images", []):
                        raise ValueError(f"image {image!r} is not one of profile {slug!r}'s images")
                    chosen["image"] = image
                return chosen
        raise ValueError(f"no profile {wanted!r}: the profiles are {slugs}")

    # -- the session's job --------------------------------------------------------------------------------

    def _spec(self, workdir: str, profile: dict[str, Any]) -> offload.JobSpec:
        env = self.get_env()
        secrets = {name: env.pop(name) for name in SECRET_ENV if env.get(name)}
        secrets.update(self.secrets)
        reach = {name: env.pop(name) for name in REACH_ENV if env.get(name)}
        for name in DROPPED_ENV:
            env.pop(name, None)
        site = self._site()
        server = self.name or "default"
        return jupyter_mod.session_spec(
            site, workdir, mode="hub", notebooks=self.notebooks.format(username=self.user.name, servername=server),
            gpus=int(profile.get("gpus", self.gpus)), cpus=profile.get("cpus", self.cpus),
            memory=profile.get("memory", self.memory), walltime=profile.get("walltime", self.walltime),
            partition=profile.get("partition", self.partition), image=profile.get("image", self.image),
            env={k: str(v) for k, v in env.items() if v is not None}, secrets=secrets, reach=reach,
            name=_slug(f"jupyterhub-{self.user.name}-{server}"),
        )  # fmt: skip

    async def start(self) -> tuple[str, int]:
        profile = self._profile()
        self._site_key = (profile.get("site", self.site), self._resolve(self.site_user),
                          self._resolve(self.ssh_identity))  # fmt: skip
        site = self._site()
        workdir = await site.aworkdir()
        spec = self._spec(workdir, profile)
        site.validate(spec)  # before anything reaches the site: a clear error on the spawn page
        await self._cancel_lost_jobs(site, spec.name)
        self.job = await site.asubmit(spec)
        self._say(f"Submitted job {self.job.id} to {site.name}")
        self.log.info("%s: job %s on %s", self._log_name, self.job.id, site.name)
        deadline = time.monotonic() + max(10, self.start_timeout - 10)
        shown = ""
        try:
            while True:
                status = await self.job.astatus()
                if status.state.is_terminal:
                    tail = await self.job.atail()
                    raise RuntimeError(f"job {self.job.id} ended {status.describe()} before the server started:\n"
                                       f"{tail}")  # fmt: skip
                text = status.describe() + (f" on {status.node}" if status.node else "")
                if status.state is offload.JobState.PENDING and status.reason in PENDING_WORDS:
                    text += f": {PENDING_WORDS[status.reason]}"
                if text != shown:
                    shown = text
                    self._say(f"Job {self.job.id}: {text}")
                if status.state is offload.JobState.RUNNING:
                    raw = await self.job.aget("jupyter.json")
                    if raw:
                        self.remote_port = int(json.loads(raw)["port"])
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.job.id} did not start within {self.start_timeout} s: it is "
                                       f"{text}")  # fmt: skip
                await asyncio.sleep(min(2.0, site.config.poll_interval))
            self._forward = await site.aforward_job(self.job, self.remote_port, self.local_port or 0)
        except BaseException:
            await self._cancel()
            raise
        self.local_port = self._forward.local_port
        self._say(f"Server starting on {status.node or 'the node'}; connected through the site's SSH connection")
        return ("127.0.0.1", self.local_port)

    async def _cancel_lost_jobs(self, site: offload.Site, name: str) -> None:
        """Find before submit: JupyterHub saves a spawner's state only once ``start()`` returns, so a hub that
        restarted while a session queued forgot its job, which still holds its place (and later its GPUs) under
        this server's name. It can never serve: the hub made a new token and route for this spawn. Cancel it,
        so a respawn never leaves two jobs."""
        lost = [job for job in await site.afind(name) if not (await job.astatus()).state.is_terminal]
        if lost:
            await site.acancel(lost)
            ids = ", ".join(job.id for job in lost)
            self._say(f"Cancelled job {ids}, left from a spawn the hub lost track of")
            self.log.warning("%s: cancelled job %s left from an earlier spawn", self._log_name, ids)

    def _say(self, message: str) -> None:
        self._news.append(message)

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        sent = 0
        step = 10
        while True:
            while sent < len(self._news):
                step = min(step + 10, 90)
                yield {"progress": step, "message": self._news[sent]}
                sent += 1
            if not self._spawn_pending:
                return
            await asyncio.sleep(0.5)

    async def poll(self) -> int | None:
        if self.job is None:
            return 0
        # The site's poller answers: one squeue per round for every session of the account, whatever the
        # number of spawners the hub polls (a fresh query per poll would be one squeue per session).
        status = await self.job.astatus(refresh=False)
        if status.state.is_terminal:
            return status.exit_code if status.exit_code is not None else 1
        if status.state is offload.JobState.RUNNING and self._forward is None and self.remote_port:
            # a restarted hub: the server runs, and the hub knows it at the same local port as before
            self._forward = await self._site().aforward_job(self.job, self.remote_port, self.local_port or 0)
            self.local_port = self._forward.local_port
            self.log.info("%s: reattached job %s at 127.0.0.1:%s", self._log_name, self.job.id, self.local_port)
        return None

    async def stop(self, now: bool = False) -> None:
        await self._cancel()

    async def _cancel(self) -> None:
        if self._forward is not None:
            await self._forward.aclose()
            self._forward = None
        if self.job is not None:
            await self.job.acancel()

    # -- a hub restart ------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.job is not None:
            site_name, user, identity = self._site_key
            state.update(job_id=self.job.id, jobdir=self.job.ref.jobdir, site=site_name, site_user=user,
                         ssh_identity=identity, remote_port=self.remote_port, local_port=self.local_port)  # fmt: skip
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if state.get("job_id"):
            self._site_key = (state.get("site"), state.get("site_user"), state.get("ssh_identity"))
            self.job = self._site().job(state["job_id"], jobdir=state.get("jobdir"))
            self.remote_port = state.get("remote_port")
            self.local_port = state.get("local_port")

    def clear_state(self) -> None:
        super().clear_state()
        self.job = None
        self.remote_port = self.local_port = None
        self._forward = None
        self._news = []


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "session"
