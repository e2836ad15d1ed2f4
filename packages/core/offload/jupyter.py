"""JupyterLab as a job: ``offload jupyter``; and the job of any Jupyter server, :func:`jupyter_spec` (exported as
``offload.jupyter_spec``: the hub spawner's single-user servers are built on it).

The server runs inside the container on a compute node; you reach it through a 127.0.0.1 port forward on the
site's SSH connection. What today's tools get wrong, and this does not:

* the token is made here and travels as a secret, never in a script, a log or a command line;
* the port is picked free on the node, not a fixed 8888 that collides on shared GPU nodes, and the job
  reports it in its directory, so nothing guesses; the server listens on the node's loopback only, reached
  through the job's relay, so other users of a shared node cannot even reach its login page;
* notebooks live in ``<workdir>/notebooks`` on the site (0700), bound into every session: they persist;
* the forward opens once the server answers, not after a fixed sleep;
* Jupyter gets a job-private runtime dir (an inherited ``XDG_RUNTIME_DIR`` breaks it inside containers);
* ending the session cancels the job; ``--detach`` returns at once and leaves it running; ``--attach JOB``
  reconnects with the same token, and ending an attached session leaves the server running.
"""

from __future__ import annotations

import json
import secrets
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from offload.errors import JobFailedError, OffloadError
from offload.jobs import Job, JobState, JobStatus
from offload.placement import SiteGroup
from offload.records import default_path, write_private
from offload.site import Forward, Site
from offload.spec import JobSpec, Mount, Resources

# The program that starts a Jupyter server in the job: ``python -c LAUNCHER ROOT [SERVER...]``. It prepares what
# any Jupyter server needs there, then execs SERVER (default JupyterLab) with the common options appended. It knows
# no particular server: a hub's single-user server is a SERVER its spawner gives (see jupyter_spec).
LAUNCHER = r"""
import json, os, socket, sys
d = os.environ["OFFLOAD_JOB_DIR"]
root = os.path.expanduser(sys.argv[1])  # ~ is the container's own home, before the fallback below
server = sys.argv[2:] or [sys.executable, "-m", "jupyterlab", "--no-browser"]
for var, sub in (("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTER_DATA_DIR", "data"), ("IPYTHONDIR", "ipython"),
                 ("JUPYTER_CONFIG_DIR", "config"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                 ("JUPYTERLAB_SETTINGS_DIR", "settings")):
    path = os.path.join(d, "jupyter", sub)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ[var] = path
os.environ.pop("XDG_RUNTIME_DIR", None)  # the login session's: wrong here, and fatal inside containers
if not os.access(os.environ.get("HOME", "/nonexistent"), os.W_OK):
    os.environ["HOME"] = d  # a container without the home directory: kernels still need a writable one
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
port = probe.getsockname()[1]
probe.close()
host = socket.gethostname()
with open(os.path.join(d, "jupyter.json.tmp"), "w") as f:
    json.dump({"host": host, "port": port}, f)
os.rename(os.path.join(d, "jupyter.json.tmp"), os.path.join(d, "jupyter.json"))
os.makedirs(root, exist_ok=True)
os.environ["OFFLOAD_JUPYTER_PORT"] = str(port)  # for a server wrapper that needs them
os.environ["OFFLOAD_JUPYTER_ROOT"] = root
print(f"Jupyter server on {host}, 127.0.0.1:{port}, serving {root}", flush=True)
# The node's loopback only: other users of a shared node cannot even knock; offload reaches it through the
# job's relay.
argv = [*server, "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None"]
if os.getuid() == 0:
    argv.append("--allow-root")  # a laptop's local site run as root (containers run as the user)
os.execvp(argv[0], argv)
"""

NAME = "jupyter"


@dataclass
class Session:
    job: Job
    token: str
    forward: Forward
    url: str

    def close(self, cancel: bool) -> None:
        self.forward.close()
        self._page().unlink(missing_ok=True)
        if cancel:
            self.job.cancel()

    def open_browser(self) -> None:
        """Open the session in the user's browser without the token on its command line (``ps`` shows that to
        every user of the machine): the browser gets a 0600 page of this user's that redirects, as Jupyter's
        own ``jpserver-*-open.html`` does. The page goes when the session closes."""
        import html
        import webbrowser

        page = self._page()
        target = html.escape(self.url, quote=True)
        write_private(page, f'<!DOCTYPE html><meta http-equiv="refresh" content="0;url={target}">'
                            f'<title>JupyterLab</title><a href="{target}">JupyterLab</a>\n')  # fmt: skip
        webbrowser.open(page.as_uri())

    def _page(self) -> Path:
        return _token_file(self.job.site, self.job.id).with_suffix(".open.html")


def _token_file(site: Site, job_id: str) -> Path:
    return default_path().parent / "jupyter" / f"{site.name}-{job_id}.token"


def jupyter_spec(site: Site, *, server: Sequence[str] | None = None, root: str | None = None,
                 notebooks: str | None = "notebooks", workdir: str | None = None, resources: Resources | None = None,
                 image: str | None = None, env: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
                 reach: dict[str, str] | None = None, name: str = NAME) -> JobSpec:  # fmt: skip
    """The job of a Jupyter server on ``site``: submit it, then read the server's ``host`` and ``port`` from the
    job's ``jupyter.json`` (written once, before the server starts) and reach it with ``Site.forward_job``.

    In the job, offload's launcher gives the server job-private Jupyter directories (runtime, data, config,
    IPython; no inherited ``XDG_RUNTIME_DIR``), a writable ``HOME`` (the job directory when the container has
    none), a free port on the node's loopback, and the root directory (made if missing). Then it runs ``server``,
    an argv (default: JupyterLab, ``python -m jupyterlab --no-browser`` with the Python that runs the launcher),
    with these options appended: ``--ip=127.0.0.1 --port=PORT --ServerApp.port_retries=0
    --ServerApp.root_dir=ROOT --LabApp.news_url=None`` (and ``--allow-root`` when run as root). The server's
    environment also has ``OFFLOAD_JUPYTER_PORT`` and ``OFFLOAD_JUPYTER_ROOT``, for a wrapper that must know
    them (a hub's single-user server gets its URL from the port). Every element of ``server`` stays one
    argument: the batch script quotes it for the shell.

    ``notebooks`` is a folder under the site's work directory (``workdir``, default ``site.workdir()``), made
    0700 by the job itself before the container starts and bound into it, so notebooks saved in one session are
    there in the next; ``None`` binds nothing. ``root`` is the directory the server serves, as seen inside the
    container, a leading ``~`` being the container's home (default: the notebooks folder)."""
    mounts: tuple[Mount, ...] = ()
    prologue: tuple[str, ...] = ()
    if notebooks is not None:
        folder = f"{workdir or site.workdir()}/{notebooks}"
        prologue = (f"(umask 077 && mkdir -p {shlex.quote(folder)})",)  # every new parent 0700 too
        target = site.bind_target(folder)
        if target != folder or site.runtime.runs_containers:
            mounts = (Mount(folder, target),)
        root = root or target
    if not root:
        raise ValueError("a Jupyter server needs a root directory or a notebooks folder")
    return JobSpec(
        [site.python, "-c", LAUNCHER, root, *(server or ())], image=image, mounts=mounts, prologue=prologue,
        resources=resources or Resources(), env=dict(env or {}), secrets=dict(secrets or {}),
        reach=dict(reach or {}), relay=True, name=name,
    )  # fmt: skip


def start(site: Site | SiteGroup, *, gpus: int = 0, image: str | None = None, walltime: str | None = None,
          cpus: int | None = None, memory: str | None = None, root: str | None = None,
          reach: dict[str, str] | None = None, policy: str = "first-fit", width: int = 2,
          say: Callable[[str], None] | None = None) -> tuple[Job, str]:  # fmt: skip
    """Submit JupyterLab as a job; returns the job and its token (also kept, 0600, for ``--attach``). Over
    several sites (a :class:`SiteGroup`), ``policy`` places it (:meth:`SiteGroup.submit`): with ``"race"`` the
    server starts on whichever of the ``width`` best sites starts it first, and only there; each site's job is
    made for that site (its Python, its notebooks folder)."""
    token = secrets.token_urlsafe(32)
    # asked here: the spec is made on offload's I/O loop, where a sync call (Site.workdir) cannot run
    workdirs = {one.name: one.workdir() for one in (site.sites if isinstance(site, SiteGroup) else [site])}

    def spec_for(one: Site) -> JobSpec:
        return jupyter_spec(one, root=root, notebooks=None if root else "notebooks", image=image, reach=reach,
                            resources=Resources(gpus=gpus, cpus=cpus, memory=memory, walltime=walltime),
                            secrets={"JUPYTER_TOKEN": token}, workdir=workdirs[one.name])  # fmt: skip

    if isinstance(site, SiteGroup):
        job = site.submit(spec_for, policy=policy, width=width, say=say)
    else:
        spec = spec_for(site)
        site.validate(spec)
        job = site.submit(spec)
    write_private(_token_file(job.site, job.id), token)
    return job, token


def saved_token(site: Site, job_id: str) -> str:
    path = _token_file(site, job_id)
    if not path.exists():
        raise OffloadError(f"no saved token for job {job_id} on {site.name}: was it started with 'offload jupyter' "
                           "from this machine?")  # fmt: skip
    return path.read_text().strip()


def connect(job: Job, token: str, progress: Callable[[str], None] = lambda text: None,
            timeout: float = 3600) -> Session:  # fmt: skip
    """Wait for the job to report its port, forward it, and wait until the server answers."""
    deadline = time.monotonic() + timeout

    def show(status: JobStatus) -> None:
        progress(f"job {job.id} {status.describe()}" + (f" on {status.node}" if status.node else ""))

    async def too_late() -> bool:
        return time.monotonic() > deadline

    try:
        job.wait_for_state(JobState.RUNNING, timeout=timeout, on_change=show)
    except TimeoutError as exc:
        raise OffloadError(f"the Jupyter job did not start: {exc}") from None
    # the launcher writes its port once (a rename) when the server starts
    raw = next(job.follow("jupyter.json", until=too_late, interval=min(1.0, job.site.config.poll_interval)), b"")
    if not raw:
        status = job.status(refresh=False)
        if not status.state.is_terminal:
            raise OffloadError(f"the Jupyter job {job.id} did not start within {timeout:.0f} s: it is "
                               f"{status.describe()}")  # fmt: skip
        tail = job.tail()
        raise JobFailedError(f"the Jupyter job {job.id} ended {status.describe()}:\n{tail}", job_id=job.id,
                             state=status.state.value, exit_code=status.exit_code, log_tail=tail)  # fmt: skip
    info = json.loads(raw)
    progress(f"JupyterLab starting on {info['host']}")
    forward = job.site.forward_job(job, int(info["port"]))
    base = f"http://127.0.0.1:{forward.local_port}"
    # The probe goes straight to the forward (never through the user's http_proxy) with the token in a header,
    # so it is in no URL any proxy or log could keep.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    probe = urllib.request.Request(f"{base}/api/status", headers={"Authorization": f"token {token}"})
    while True:
        try:
            with direct.open(probe, timeout=5) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        status = job.status(refresh=False)
        if status.state.is_terminal or time.monotonic() > deadline:
            forward.close()
            raise OffloadError(f"JupyterLab in job {job.id} never answered ({status.describe()}):\n{job.tail()}")
        time.sleep(0.3)
    return Session(job, token, forward, f"{base}/lab?token={token}")
