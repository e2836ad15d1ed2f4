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

The hub's own settings hold as they do for batchspawner and KubeSpawner: ``cmd`` followed by ``get_args()``,
``notebook_dir``, ``default_url``, ``mem_limit`` and ``cpu_limit``; ``profiles`` takes KubeSpawner-shaped entries
where their meaning is the same on a SLURM site (see :func:`check_profiles`).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import inspect
import json
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from jupyterhub.spawner import Spawner
from jupyterhub.traitlets import ByteSpecification
from jupyterhub.utils import maybe_future
from traitlets import Callable, Dict, Integer, List, TraitError, Unicode, Union, default, validate

import offload
from jupyterhub_offload import singleuser

# What the hub gives a single-user server that must not travel as plain environment: secrets instead
# (read from a 0600 file by the job and removed before the server starts).
SECRET_ENV = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")
# The hub's addresses the server calls: reached back through the job's relay, never directly.
REACH_ENV = ("JUPYTERHUB_API_URL", "JUPYTERHUB_ACTIVITY_URL")
# Set by the job itself (the port is picked free on the node).
DROPPED_ENV = ("JUPYTERHUB_SERVICE_URL",)
PROFILE_KEYS = {"display_name", "slug", "description", "default", "gpus", "cpus", "memory", "walltime",
                "partition", "account", "qos", "image", "images", "site", "policy"}  # fmt: skip
POLICIES = ("first-fit", "race")  # a session's placement over several sites (offload.SiteGroup.submit)
# KubeSpawner's profile_list entries share display_name, slug, description and default with offload's profiles.
# Of the keys of their kubespawner_override, these mean the same on a SLURM site (whose allocation is at once the
# job's request and its limit); the rest (node selectors, volumes, guarantees, ...) have no meaning here.
KUBESPAWNER_KEYS = {"cpu_limit": "cpus", "mem_limit": "memory", "image": "image", "extra_resource_limits": "gpus"}
GPU_RESOURCE = "nvidia.com/gpu"
KUBESPAWNER_MAPPING = (f"offload maps cpu_limit -> cpus (rounded up to whole cores), mem_limit -> memory, "
                       f"image -> image, extra_resource_limits {{{GPU_RESOURCE!r}: N}} -> gpus")  # fmt: skip
# What the hub may not know it can say instead, for the keys of KubeSpawner's profiles that offload refuses.
KUBESPAWNER_HINTS = {
    "profile_options": "offload's one choice within a profile is 'images', a list of images the user may pick",
    "cpu_guarantee": "a SLURM job gets what it asks for: give cpu_limit (or offload's cpus)",
    "mem_guarantee": "a SLURM job gets what it asks for: give mem_limit (or offload's memory)",
    "node_selector": "where a session runs is offload's partition, account and qos keys",
    "node_affinity_required": "where a session runs is offload's partition, account and qos keys",
    "tolerations": "where a session runs is offload's partition, account and qos keys",
}

# The hub's single-user command, run in the job as the server command of offload's Jupyter launcher
# (offload.jupyter_spec: job-private Jupyter directories, a free port on the node's loopback reported in
# jupyter.json, the root directory, and the common server options it appends). The program, stdlib only, sets
# JUPYTERHUB_SERVICE_URL from the launcher's port and execs the hub's ``cmd``, those options, then ``get_args()``.
SINGLEUSER = inspect.getsource(singleuser)
DEFAULT_CMD = ["jupyterhub-singleuser"]

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


def site_for(name: str | None, user: str | None, identity: str | None) -> offload.Site:
    """One :class:`offload.Site` (one SSH connection, one poller) per site and account, for every hub user
    mapped to that account: offload's shared site for the profile with the account's user and key."""
    config = offload.load_profiles().get(name)
    changes: dict[str, Any] = {}
    if user:
        changes["user"] = user
    if identity:
        changes["identity_files"] = (identity,)
    return offload.shared_site(config.with_overrides(**changes) if changes else config)


class OffloadSpawner(Spawner):
    """Single-user servers as jobs on an HPC site, reached through the site's SSH connection."""

    site = Unicode(None, allow_none=True, help="The offload site profile (default: offload's default site); "
                   "several ('a,b', '@group'): the one where the session starts first.").tag(config=True)  # fmt: skip
    policy = Unicode("first-fit", help="With several sites: 'first-fit' submits the session's job once, where it "
                     "starts first; 'race' submits it to the `width` best sites, the first to start serves the "
                     "session and the others are cancelled before their server could start (a profile may change "
                     "it).").tag(config=True)  # fmt: skip
    width = Integer(2, help="With policy 'race': how many sites get an attempt at once.").tag(config=True)
    image = Unicode(None, allow_none=True, help="Container image with jupyterhub and jupyterlab in it.").tag(
        config=True
    )
    gpus = Integer(0, help="GPUs for a session (a profile may change it).").tag(config=True)
    cpus = Integer(None, allow_none=True, help="CPU cores for a session (default: Spawner.cpu_limit rounded up).").tag(
        config=True
    )
    memory = Unicode(None, allow_none=True, help="Memory for a session, e.g. 16G (default: Spawner.mem_limit).").tag(
        config=True
    )
    walltime = Unicode("08:00:00", help="Walltime of a session: the server ends when it ends.").tag(config=True)
    partition = Unicode(None, allow_none=True, help="Partition (default: the site's; its GPU one with GPUs).").tag(
        config=True
    )
    account = Unicode(None, allow_none=True, help="Account charged for a session (default: the site's).").tag(
        config=True
    )
    qos = Unicode(None, allow_none=True, help="Quality of service of a session (default: the site's).").tag(config=True)
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
    profiles = Union(
        [List(Dict()), Callable()], default_value=[],
        help="Choices on the spawn page: a list, or a callable taking the spawner (it may be async) that returns "
             "one, as KubeSpawner's profile_list. Each is a dict with display_name, slug, description, default, "
             "and overrides of gpus, cpus, memory, walltime, partition, account, qos, image, site; 'images' (a "
             "list) lets the user pick one of those images. KubeSpawner's kubespawner_override is taken where "
             "its meaning is the same: cpu_limit, mem_limit, image, extra_resource_limits {'nvidia.com/gpu': N}.",
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

    @validate("policy")
    def _check_policy(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] not in POLICIES:
            raise TraitError(f"OffloadSpawner.policy {proposal['value']!r}: use one of {', '.join(POLICIES)}")
        return proposal["value"]

    @validate("profiles")
    def _check_profiles(self, proposal: dict[str, Any]) -> Any:
        """A profile offload cannot honour is refused when the hub makes the spawner from its config (at its
        start for the users it knows), not on the spawn page, where it would fail every user's visit."""
        value = proposal["value"]
        if callable(value):
            return value  # checked when called, for the spawner it is called with
        try:
            return check_profiles(value, f"{type(self).__name__}.profiles")
        except ValueError as exc:
            raise TraitError(str(exc)) from None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job: offload.Job | None = None
        self.remote_port: int | None = None
        self.local_port: int | None = None
        self._forward: offload.Forward | None = None
        self._site_key: tuple[str | None, str | None, str | None] = (None, None, None)
        self._news: list[str] = []
        self._cancels: set[asyncio.Future[None]] = set()

    # -- who and where ------------------------------------------------------------------------------------

    def _resolve(self, value: Any) -> Any:
        return value(self) if callable(value) else value

    def _site(self) -> offload.Site:
        site_name, user, identity = self._site_key
        return site_for(site_name, user, identity)

    # -- the options form ---------------------------------------------------------------------------------

    @default("options_form")
    def _options_form(self) -> Any:
        if callable(self.profiles):
            return self._render_form_of_callable  # JupyterHub awaits it for each spawn page
        return self._render_form if self.profiles else ""

    async def _render_form_of_callable(self, spawner: Spawner) -> str:
        return self._render_form(spawner, await self._profile_list())

    def _render_form(self, spawner: Spawner, profiles: list[dict[str, Any]] | None = None) -> str:
        profiles = self.profiles if profiles is None else profiles
        rows = []
        for i, (slug, profile) in enumerate(zip(self._slugs(profiles), profiles, strict=True)):
            checked = " checked" if profile.get("default") or (i == 0 and not any(p.get("default") for p in
                                                                                  profiles)) else ""  # fmt: skip
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

    def _slugs(self, profiles: list[dict[str, Any]] | None = None) -> list[str]:
        profiles = self.profiles if profiles is None else profiles
        return [profile.get("slug") or _slug(profile.get("display_name", f"profile-{i}"))
                for i, profile in enumerate(profiles)]  # fmt: skip

    async def _profile_list(self) -> list[dict[str, Any]]:
        """The profiles offered to this spawner: the configured list, or what the callable returns for it (checked
        as a configured list is, each time, since it may differ per user)."""
        if not callable(self.profiles):
            return self.profiles
        return check_profiles(await maybe_future(self.profiles(self)), f"{type(self).__name__}.profiles(spawner)")

    async def _chosen_profile(self) -> dict[str, Any]:
        return self._profile(await self._profile_list())

    def _profile(self, profiles: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The chosen profile (checked against the admin's list: a user cannot ask for what is not offered)."""
        profiles = self.profiles if profiles is None else profiles
        if not profiles:
            return {}
        wanted = self.user_options.get("profile")
        slugs = self._slugs(profiles)
        if wanted is None:  # the form was not used (the REST API without options): the default profile
            defaults = [slug for slug, p in zip(slugs, profiles, strict=True) if p.get("default")]
            wanted = (defaults or slugs)[0]
        for slug, profile in zip(slugs, profiles, strict=True):
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

    def _resources(self, profile: dict[str, Any]) -> offload.Resources:
        """What the session asks SLURM for: the profile's value, else this spawner's, else (for cores and memory)
        the hub's Spawner.cpu_limit and mem_limit, which KubeSpawner makes the pod's limits: a SLURM allocation is
        that limit. Checked here, so a bad value is a clear error on the spawn page."""
        cpus = profile.get("cpus", self.cpus)
        if cpus is None and self.cpu_limit:
            cpus = math.ceil(self.cpu_limit)  # SLURM allocates whole cores
        memory = profile.get("memory", self.memory)
        if memory is None and self.mem_limit:
            memory = _megabytes(self.mem_limit)
        return offload.Resources(
            gpus=int(profile.get("gpus", self.gpus)), cpus=cpus, memory=memory,
            walltime=profile.get("walltime", self.walltime), partition=profile.get("partition", self.partition),
            account=profile.get("account", self.account), qos=profile.get("qos", self.qos),
        )  # fmt: skip

    def _spec(self, site: offload.Site, workdir: str, profile: dict[str, Any]) -> offload.JobSpec:
        resources = self._resources(profile)
        env = self.get_env()
        # What the server (and jupyter-resource-usage) is told it has: the job's allocation, not the hub-wide limit
        env.pop("MEM_LIMIT", None)
        env.pop("CPU_LIMIT", None)
        if resources.memory_mb:
            env["MEM_LIMIT"] = str(resources.memory_mb * 2**20)
        if resources.cpus:
            env["CPU_LIMIT"] = str(resources.cpus)
        secrets = {name: env.pop(name) for name in SECRET_ENV if env.get(name)}
        secrets.update(self.secrets)
        reach = {name: env.pop(name) for name in REACH_ENV if env.get(name)}
        for name in DROPPED_ENV:
            env.pop(name, None)
        server = self.name or "default"
        # Spawner.notebook_dir, as the hub passes it: the server's root (~ expanded in the container, as
        # jupyterhub-singleuser does); the notebooks folder is bound in all the same.
        root = env.get("JUPYTERHUB_ROOT_DIR")
        return offload.jupyter_spec(
            site, server=self._command(site.python), root=str(root) if root else None, workdir=workdir,
            notebooks=self.notebooks.format(username=self.user.name, servername=server), resources=resources,
            image=profile.get("image", self.image), env={k: str(v) for k, v in env.items() if v is not None},
            secrets=secrets, reach=reach, name=_slug(f"jupyterhub-{self.user.name}-{server}"),
        )  # fmt: skip

    def _command(self, python: str) -> list[str]:
        """The single-user server's command, given to offload's Jupyter launcher: :data:`SINGLEUSER` run by the
        image's ``python``, with the hub's ``cmd`` and ``get_args()`` (as batchspawner and KubeSpawner run
        ``cmd + get_args()``) as one JSON argument; the launcher appends its options, and the program puts
        ``get_args()`` after them. Every part reaches the server as one argv element, which the batch script
        quotes for the shell: the hub's arguments arrive as written, ``$(...)`` and all. The default command,
        jupyterhub-singleuser, is left to the program (``null``), which runs ``python -m jupyterhub.singleuser``:
        the same program, found without the image's PATH."""
        cmd = None if list(self.cmd) in ([], DEFAULT_CMD) else list(self.cmd)
        return [python, "-c", SINGLEUSER, json.dumps([cmd, list(self.get_args())])]

    async def start(self) -> tuple[str, int]:
        profile = await self._chosen_profile()
        user, identity = self._resolve(self.site_user), self._resolve(self.ssh_identity)
        deadline = time.monotonic() + max(10, self.start_timeout - 10)
        names = self._site_names(profile)
        if len(names) > 1 and self._policy(profile) == "race":
            self.job = await self._race(names, user, identity, profile, deadline)
            self._site_key = (self.job.site.name, user, identity)
            site = self.job.site
        else:
            self._site_key = (await self._place(names, profile, user, identity), user, identity)
            site = self._site()
            spec = self._spec(site, await site.aworkdir(), profile)
            site.validate(spec)  # before anything reaches the site: a clear error on the spawn page
            await self._cancel_lost_jobs(site, spec.name)
            self.job = await site.asubmit(spec)
            self._say(f"Submitted job {self.job.id} to {site.name}")
        self.log.info("%s: job %s on %s", self._log_name, self.job.id, site.name)
        try:
            status = await self.job.await_state(offload.JobState.RUNNING, timeout=deadline - time.monotonic(),
                                                on_change=self._say_state)  # fmt: skip
            self.remote_port = await self._server_port(deadline)
            self._forward = await site.aforward_job(self.job, self.remote_port, self.local_port or 0)
        except BaseException:
            await self._cancel()
            raise
        self.local_port = self._forward.local_port
        self._say(f"Server starting on {status.node or 'the node'}; connected through the site's SSH connection")
        return ("127.0.0.1", self.local_port)

    def _site_names(self, profile: dict[str, Any]) -> list[str]:
        """The sites a profile (else this spawner) names: none (offload's default site), one, or several."""
        named = profile.get("site", self.site)
        return [] if named is None else offload.load_profiles().names(named)

    def _policy(self, profile: dict[str, Any]) -> str:
        return profile.get("policy", self.policy)

    async def _race(self, names: list[str], user: str | None, identity: str | None, profile: dict[str, Any],
                    deadline: float) -> offload.Job:  # fmt: skip
        """The session's job raced over ``names`` with this user's account on each: an attempt (made for its
        site) on the ``width`` best; the first to start is claimed, the others released and cancelled before
        their server could start. Attempts a hub lost track of (it restarted mid-race) are cancelled first; a
        race that does not start within the spawn's timeout is given up, every attempt with it."""
        sites = [site_for(name, user, identity) for name in names]
        workdirs = {site.name: await site.aworkdir() for site in sites}

        def spec_for(site: offload.Site) -> offload.JobSpec:
            return self._spec(site, workdirs[site.name], profile)

        for site in sites:
            await self._cancel_lost_jobs(site, spec_for(site).name or "")

        def say(line: str) -> None:  # on the spawn page, and in the hub's log
            self._say(line)
            self.log.info("%s: %s", self._log_name, line)

        placement = await offload.SiteGroup(sites).astart(spec_for, policy="race", width=self.width, patience=None,
                                                          claim_wait=max(60, int(self.start_timeout)),
                                                          say=say)  # fmt: skip
        try:
            return await asyncio.wait_for(placement.arun(), timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            await placement.acancel("the session did not start in time, or its spawn was stopped")
            raise

    async def _place(self, names: list[str], profile: dict[str, Any], user: str | None,
                     identity: str | None) -> str | None:  # fmt: skip
        """The site this session goes to: the one named; of several (``"a,b"``, ``"@group"``), the one where the
        session's job starts first, asked with this user's account on each (the choice is kept in the hub's
        state, so a restarted hub finds the session there)."""
        if len(names) <= 1:
            return names[0] if names else None
        group = offload.SiteGroup([site_for(name, user, identity) for name in names])
        probe = offload.JobSpec(["jupyter"], image=profile.get("image", self.image), resources=self._resources(profile))
        site = await group.achoose(probe)
        self._say(f"Placed on {site.name}, where the session starts first (of {', '.join(names)})")
        return site.name

    def _say_state(self, status: offload.JobStatus) -> None:
        assert self.job is not None
        text = status.describe() + (f" on {status.node}" if status.node else "")
        if status.state is offload.JobState.PENDING and status.reason in PENDING_WORDS:
            text += f": {PENDING_WORDS[status.reason]}"
        self._say(f"Job {self.job.id}: {text}")

    async def _server_port(self, deadline: float) -> int:
        """The port the server's launcher reports in jupyter.json (written once, when the server starts)."""
        assert self.job is not None

        async def too_late() -> bool:
            return time.monotonic() > deadline

        interval = min(2.0, self.job.site.config.poll_interval)
        async with contextlib.aclosing(self.job.afollow("jupyter.json", until=too_late, interval=interval)) as written:
            raw = await anext(written, b"")
        if raw:
            return int(json.loads(raw)["port"])
        status = await self.job.astatus(refresh=False)
        if status.state.is_terminal:
            tail = await self.job.atail()
            raise RuntimeError(f"job {self.job.id} ended {status.describe()} before the server started:\n{tail}")
        raise TimeoutError(f"job {self.job.id} did not start its server within {self.start_timeout} s: it is "
                           f"{status.describe()}")  # fmt: skip

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
        """Cancel the session's job and return once it ended; with ``now`` (JupyterHub's "terminate
        immediately"), return at once and let the cancel run on: the job's end is SLURM's to see, and a job
        the cancel missed is found by name and cancelled at this server's next spawn."""
        if not now:
            await self._cancel()
            return
        task = asyncio.ensure_future(self._cancel())
        self._cancels.add(task)  # a reference, or the task may be collected before it ran
        task.add_done_callback(self._cancel_done)

    def _cancel_done(self, task: asyncio.Future[None]) -> None:
        self._cancels.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("%s: cancelling its job failed: %s; it runs until its walltime, or 'offload cancel' "
                           "it", self._log_name, task.exception())  # fmt: skip

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


def check_profiles(profiles: Any, where: str) -> list[dict[str, Any]]:
    """``profiles`` as offload's profiles, or a ValueError naming the profile, the key, and what to write instead.

    A KubeSpawner-shaped profile (its ``kubespawner_override``) is mapped to offload's keys where the meaning is
    the same (:data:`KUBESPAWNER_KEYS`), so a hub that also runs KubeSpawner can keep one list; anything else
    is refused rather than silently dropped: a session without the GPUs its profile promised is worse."""
    if not isinstance(profiles, list):
        raise ValueError(f"{where} must be a list of dicts, got {type(profiles).__name__}")
    return [_check_profile(profile, f"{where}[{i}]") for i, profile in enumerate(profiles)]


def _check_profile(profile: Any, where: str) -> dict[str, Any]:
    if not isinstance(profile, dict):
        raise ValueError(f"{where} must be a dict (display_name, slug, gpus, ...), got {type(profile).__name__}")
    label = f"{where} ({profile.get('slug') or profile.get('display_name')!r})"
    known = ", ".join(repr(key) for key in sorted(PROFILE_KEYS | {"kubespawner_override"}))
    checked = {}
    for key, value in profile.items():
        if key == "kubespawner_override":
            continue
        if key not in PROFILE_KEYS:
            hint = f" ({KUBESPAWNER_HINTS[key]})" if key in KUBESPAWNER_HINTS else ""
            raise ValueError(f"{label} has the key {key!r}, which offload does not know{hint}; its known keys are "
                             f"{known}")  # fmt: skip
        if key == "policy" and value not in POLICIES:
            raise ValueError(f"{label}: policy {value!r}: a session is placed with one of {', '.join(POLICIES)}")
        checked[key] = value
    override = profile.get("kubespawner_override") or {}
    if not isinstance(override, dict):
        raise ValueError(f"{label}: kubespawner_override must be a dict, got {type(override).__name__}")
    for key, value in override.items():
        name, mapped = _from_kubespawner(key, value, label)
        if name in checked:
            raise ValueError(f"{label} sets {name!r} twice: as {name} and through kubespawner_override's {key}; "
                             "keep one")  # fmt: skip
        checked[name] = mapped
    return checked


def _from_kubespawner(key: str, value: Any, label: str) -> tuple[str, Any]:
    """One key of a ``kubespawner_override`` as offload's profile key and value."""
    where = f"{label}: kubespawner_override key {key!r}"
    if key not in KUBESPAWNER_KEYS:
        hint = f" ({KUBESPAWNER_HINTS[key]})" if key in KUBESPAWNER_HINTS else ""
        raise ValueError(f"{where} has no meaning on an offload site{hint}; {KUBESPAWNER_MAPPING}, and where a "
                         "session runs is offload's partition, account and qos keys")  # fmt: skip
    if callable(value):
        raise ValueError(f"{where} is a callable: give its value, or make the profiles a callable of the spawner")
    if key == "extra_resource_limits":
        others = sorted(set(value) - {GPU_RESOURCE}) if isinstance(value, dict) else []
        if others:
            raise ValueError(f"{label}: extra_resource_limits key {others[0]!r} has no meaning on an offload site; "
                             f"{KUBESPAWNER_MAPPING}")  # fmt: skip
    try:
        if key == "cpu_limit":
            return "cpus", math.ceil(float(value))
        if key == "mem_limit":
            return "memory", _megabytes(ByteSpecification().validate(None, value))
        if key == "image":
            return "image", str(value)
        return "gpus", int(value.get(GPU_RESOURCE, 0))
    except (AttributeError, TypeError, ValueError, TraitError) as exc:
        raise ValueError(f"{where}: {value!r} is not a value it takes ({exc})") from None


def _megabytes(size: int) -> str:
    """A byte count (JupyterHub's ByteSpecification: mem_limit) as offload's memory, in whole megabytes."""
    return f"{math.ceil(size / 2**20)}M"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "session"
