"""interLink's plugin API, served by offload: the Virtual Kubelet's pods become jobs on one site.

interLink's API server calls a plugin over plain HTTP: ``POST /create`` with one ``RetrievedPodData``, ``GET
/status`` with an array of pods (an empty array is its ping, answered with the site's free capacity), ``GET
/getLogs`` and ``POST /delete``. This server answers them from offload's own parts, so the site sees what any
other offload client costs it: one SSH connection, one scheduler poll per interval for every live pod together
(``/status`` reads the poller's cache), and records that map a pod's UID to its job, so ``/create`` is idempotent
and a restarted plugin answers for the pods created before.

interLink gives each reply 120 s (its client's ``ResponseHeaderTimeout``) and fails a pod for good on any reply
but 200, so ``/create`` records the pod and answers at once: pulling its images and submitting its job happen
in the background, ``/status`` says ``ContainerCreating`` meanwhile and, if that fails, the pod's failure with the
reason. A site that hiccups (a command timing out, a dropped connection) is asked again within the request
before the reply says so.

The handlers run on this server's loop and hand each site call to offload's own loop, where the connection and
the poller live (the ``a*`` methods do that).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

import offload
from interlink_offload.pods import (
    STATE_FILE,
    container_statuses,
    job_name,
    log_file,
    parse_state,
    plan_pod,
)

log = logging.getLogger("interlink_offload")

T = TypeVar("T")

# How long "offload has no job for this pod" is believed before the records and the scheduler are asked again.
MISSING_FOR = 60.0
# How long after /delete a pod's answers stay in memory (a long-lived plugin serves many pods).
FORGET_AFTER = 600.0
# A site that does not answer (a command timing out, a dropped connection) is asked again within one request for
# this long, up to 5 times with pauses from 0.5 s to 4 s, before the reply says so: interLink waits 120 s for a
# reply, and fails the pod for good on any reply but 200.
RETRY_WITHIN = 10.0
RETRY = offload.RetryPolicy(first=0.5, factor=2.0, cap=4.0, attempts=5, within=RETRY_WITHIN)
# Where a pod's image stands when /create checks the pod before its images are pulled: the cache's path later;
# and its ENTRYPOINT, for a container with no command: the image's config is known only once it is pulled.
_STAND_IN_IMAGE = "/offload-image-cache/stand-in"
_STAND_IN_RUN = (("/offload-image-cache/stand-in-entrypoint",), ())


class BadRequest(Exception):
    """A request this plugin cannot take as it is: the reply's status and words (interLink shows the words on the
    pod, as its failure message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def transient(exc: BaseException) -> bool:
    """A site error worth asking again: a command that timed out, a connection that failed; not a command that
    answered with an error, nor an unknown host key (asking again changes neither)."""
    return isinstance(exc, offload.SiteNotAnswering) or (
        isinstance(exc, offload.TransportError)
        and not isinstance(exc, offload.RemoteCommandError | offload.HostKeyError)
    )


async def retrying(call: Callable[[], Awaitable[T]], within: float | None = RETRY_WITHIN) -> T:
    """``call()``, asked again after a transient site error while ``within`` seconds have not passed (RETRY's
    every try, when ``within`` is None: for work that no reply waits for)."""
    policy = dataclasses.replace(RETRY, within=within)
    return await policy.call(call, transient, _asking_again)


def _asking_again(exc: Exception, pause: float) -> None:
    log.info("the site did not answer (%s): asking again in %.1f s", exc, pause)


def site_image(image: str, image_map: Mapping[str, str]) -> str:
    """The image reference offload gives the site for a pod's ``image``: the map's entry (an operator's pin or
    a pushed image's name), an explicit reference or site path as it is, else a registry image (``docker://``)."""
    if image in image_map:
        return image_map[image]
    if "://" in image or image.startswith("/"):
        return image
    return "docker://" + image


@dataclass
class _Listen:
    host: str | None = None
    port: int | None = None
    path: str | None = None


def parse_listen(text: str, public: bool = False) -> _Listen:
    """``HOST:PORT`` or ``unix:///path.sock``; a non-loopback host only with ``public`` (interLink sends no
    credentials to its plugin: anyone who reaches the port can create and delete pods)."""
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path.startswith("/"):
            raise offload.ConfigError(f"--listen {text!r}: a unix socket needs an absolute path, unix:///run/x.sock")
        return _Listen(path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise offload.ConfigError(f"--listen {text!r}: give HOST:PORT (e.g. 127.0.0.1:4000) or unix:///path.sock")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not public:
        raise offload.ConfigError(
            f"--listen {text!r} is not a loopback address: interLink's API server sends its plugin no "
            "credentials, so anyone who reaches this port could run jobs as you. Listen on 127.0.0.1 or a unix "
            "socket next to interLink, or pass --public on a network only interLink can reach"
        )
    return _Listen(host=host, port=int(port))


@dataclass
class _Pending:
    """A pod /create took and whose job is not (yet) submitted: its images are being pulled, or that failed, or
    /delete came first."""

    task: asyncio.Task | None = None
    failure: str = ""
    deleted: bool = False


@dataclass
class _Lock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def _pod_of(data: Any) -> tuple[str, dict, dict]:
    """(uid, metadata, spec) of the pod in a /create or /status body, or BadRequest saying what is malformed."""
    if not isinstance(data, dict):
        raise BadRequest(400, f"expected a JSON object with the pod, got {type(data).__name__}")
    pod = data.get("pod", data)  # /create: RetrievedPodData; /status, /delete: the v1.Pod itself
    meta, spec = (pod.get("metadata"), pod.get("spec")) if isinstance(pod, dict) else (None, None)
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise BadRequest(400, "the pod needs metadata and spec objects (a v1.Pod, as interLink sends it)")
    uid = meta.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadRequest(400, "the pod has no metadata.uid")
    for key in ("containers", "initContainers"):
        containers = spec.get(key) or []
        if not isinstance(containers, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in containers
        ):
            raise BadRequest(400, f"spec.{key} of pod {uid} must be a list of containers, each with a name")
    if not spec.get("containers"):
        raise BadRequest(422, f"pod {uid} has no containers")
    return uid, meta, spec


class PodServer:
    """The plugin's handlers for one site. ``image_map`` maps pod image names to what the site runs;
    ``hosts`` are the names a request's Host may give besides loopback and the listen address (``--public-name``);
    with ``token``, every request needs ``Authorization: Bearer <token>``."""

    def __init__(self, site: offload.Site, image_map: Mapping[str, str] | None = None, *,
                 hosts: Iterable[str] = (), token: str | None = None) -> None:  # fmt: skip
        self.site = site
        self.image_map = dict(image_map or {})
        self.hosts = {h.lower() for h in hosts}
        self.token = token
        self.retry_within = RETRY_WITHIN
        self._jobs: dict[str, offload.Job] = {}
        self._missing: dict[str, float] = {}
        self._final: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, _Pending] = {}
        self._locks: dict[str, _Lock] = {}

    def app(self) -> web.Application:
        # a pod's ConfigMaps and Secrets travel in /create
        app = web.Application(client_max_size=64 * 2**20, middlewares=[self._guard, self._site_errors])
        app.add_routes(
            [
                web.post("/create", self.create),
                web.get("/status", self.status),
                web.get("/getLogs", self.get_logs),
                web.post("/delete", self.delete),
            ]
        )
        app.on_cleanup.append(self._stop_background)
        return app

    async def _stop_background(self, _app: web.Application) -> None:
        tasks = [p.task for p in self._pending.values() if p.task is not None and not p.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- what a request must carry ----------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Refuse what a web page could send: a browser adds ``Origin`` to cross-site requests (interLink's Go
        client never does), cannot send ``application/json`` to another site without asking first (and the ask
        carries ``Origin``), and a page reaching this port through DNS rebinding names its own host in ``Host``."""
        if "Origin" in request.headers:
            return _error(403, "requests from web pages (with an Origin header) are refused: only interLink calls")
        if (request.method == "POST" or request.body_exists) and request.content_type != "application/json":
            return _error(415, f"send the body as Content-Type: application/json, not {request.content_type!r}")
        if not self._host_allowed(request):
            return _error(421, f"Host {request.host!r} is not this plugin's address: give --public-name NAME "
                               "for a name interLink uses to reach it")  # fmt: skip
        if self.token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return _error(401, "this plugin needs Authorization: Bearer <the token of --token-file>")
        return await handler(request)

    def _host_allowed(self, request: web.Request) -> bool:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not isinstance(sockname, tuple):  # a unix socket: no web page reaches it (interLink names it "unix")
            return True
        host = request.host.lower()
        if host.startswith("["):
            host = host[1 : host.find("]")]
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        if host == "localhost" or host in self.hosts:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False  # a name: DNS rebinding gives a page's own name here
        listening = ipaddress.ip_address(sockname[0].split("%")[0])
        return address.is_loopback or address == listening or listening.is_unspecified

    @web.middleware
    async def _site_errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """A malformed request is its reply's words; a site that hiccups is asked again (the handlers are
        idempotent) before the reply says it does not answer; an error of the site is the reply's words."""
        try:
            return await retrying(lambda: handler(request), self.retry_within)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        except json.JSONDecodeError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        except (offload.SiteNotAnswering, offload.TransportError) as exc:
            log.warning("%s: %s", request.path, exc)
            return _error(503, str(exc))
        except offload.OffloadError as exc:
            log.warning("%s: %s", request.path, exc)
            return _error(500, str(exc))

    @contextlib.asynccontextmanager
    async def _locked(self, uid: str) -> AsyncIterator[None]:
        """One pod's lock (submitting its job, cancelling it); the entry goes when nobody holds or waits for it."""
        entry = self._locks.setdefault(uid, _Lock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                self._locks.pop(uid, None)

    # -- finding a pod's job ------------------------------------------------------------------------------

    async def _job(self, uid: str, fresh: bool = False) -> offload.Job | None:
        """The job of pod ``uid``: this server's memory, else this machine's records (a restarted plugin),
        else the scheduler, by the job's name (a plugin moved to another machine). ``fresh``: ask even if
        the last answer was "none" (before submitting)."""
        if uid in self._jobs:
            return self._jobs[uid]
        if not fresh and time.monotonic() - self._missing.get(uid, -MISSING_FOR) < MISSING_FOR:
            return None
        name = job_name(uid)
        records = self.site.records(name, limit=1)
        if records:
            job = await self.site.ajob(records[0].job_id, jobdir=records[0].jobdir)
        else:
            found = await self.site.afind(name)
            job = found[0] if found else None
        if job is None:
            self._missing[uid] = time.monotonic()
            return None
        self._missing.pop(uid, None)
        self._jobs[uid] = job
        return job

    # -- POST /create ---------------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        """Check the pod, record it and answer: its images are pulled and its job submitted in the background
        (a cold pull outlasts interLink's 120 s, and a pod whose reply timed out would be failed while its job
        runs on, orphaned). Any reply but 200 fails the pod for good, with the reply's words as its message."""
        data = await request.json()
        if isinstance(data, list):  # older interLink releases send a list of one
            if len(data) != 1:
                raise BadRequest(400, f"expected one pod per /create, got {len(data)}")
            data = data[0]
        uid, meta, spec = _pod_of(data)
        job = self._jobs.get(uid)
        if job is not None or uid in self._pending:  # a repeat: the Virtual Kubelet or interLink asked again
            return web.json_response({"PodUID": uid, "PodJID": job.id if job else ""})
        images = [c.get("image") or "" for c in [*(spec.get("initContainers") or []), *spec["containers"]]]
        if "" in images:
            raise BadRequest(422, "every container of the pod needs an image")
        cached = {image for image in images if self._through_cache(image)}
        stand_ins = {image: _STAND_IN_IMAGE if image in cached else site_image(image, self.image_map)
                     for image in images}  # fmt: skip
        try:  # what offload cannot run is refused now, before anything is pulled or queued
            plan_pod(self.site, data, stand_ins, dict.fromkeys(cached, _STAND_IN_RUN))
        except offload.ConfigError as exc:
            raise BadRequest(422, str(exc)) from None
        pending = self._pending[uid] = _Pending()
        pending.task = asyncio.create_task(self._prepare(uid, data, pending), name=f"create pod {uid}")
        log.info("pod %s/%s (%s) taken: pulling its images and submitting its job", meta.get("namespace"),
                 meta.get("name"), uid)  # fmt: skip
        return web.json_response({"PodUID": uid, "PodJID": ""})

    def _through_cache(self, image: str) -> bool:
        """Whether the pod's ``image`` comes through the site's image cache (pulled on its login node, or pushed):
        its path and its ENTRYPOINT and CMD are known only once it is there."""
        return self.site.images.through_cache(site_image(image, self.image_map))

    async def _prepare(self, uid: str, data: dict, pending: _Pending) -> None:
        """The background half of /create: find the pod's job (a repeat after a restart) or pull its images and
        submit it. A failure is the pod's status; after /delete nothing is submitted."""
        meta = data["pod"]["metadata"]
        try:
            job = await retrying(lambda: self._adopt_or_submit(uid, data, pending), within=None)
        except offload.OffloadError as exc:
            pending.failure = str(exc)
            log.warning("pod %s/%s (%s) failed before its job: %s", meta.get("namespace"), meta.get("name"), uid, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never a pod that waits forever: its status says what broke
            pending.failure = f"offload could not submit this pod: {exc!r} (see the plugin's log)"
            log.exception("pod %s (%s): submitting its job failed", meta.get("name"), uid)
        else:
            if job is not None:
                log.info("pod %s/%s (%s) is job %s", meta.get("namespace"), meta.get("name"), uid, job.id)

    async def _adopt_or_submit(self, uid: str, data: dict, pending: _Pending) -> offload.Job | None:
        async with self._locked(uid):
            if pending.deleted:
                return None
            job = await self._job(uid, fresh=True)  # also after a lost reply to a submission: no second job
            if job is not None:
                return job
        spec = data["pod"]["spec"]
        wanted = {c["image"] for c in [*(spec.get("initContainers") or []), *spec["containers"]]}
        refs = {image: site_image(image, self.image_map) for image in wanted}
        found = dict(zip(refs, await asyncio.gather(*(self._site_image(ref) for ref in refs.values())), strict=True))
        images = {image: path for image, (path, _) in found.items()}
        commands = {image: (c.entrypoint, c.cmd) for image, (_, c) in found.items() if c is not None}
        planned = plan_pod(self.site, data, images, commands)
        async with self._locked(uid):  # /delete waits here, and after it nothing is submitted
            if pending.deleted:
                log.info("pod %s was deleted while its images were pulled: no job submitted", uid)
                return None
            job = await self.site.asubmit(planned)
            self._jobs[uid] = job
            self._missing.pop(uid, None)
            return job

    async def _site_image(self, ref: str) -> tuple[str, offload.CachedImage | None]:
        """What the site runs for ``ref``, and its record in the site's image cache (None for an image that does
        not come through it): one pull or lookup, which aresolve shares with acached."""
        cached = await self.site.images.acached(ref)
        return await self.site.images.aresolve(ref), cached

    # -- GET /status ----------------------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        pods = await request.json() if request.body_exists else []
        if not isinstance(pods, list):
            raise BadRequest(400, f"expected a JSON array of pods, got {type(pods).__name__}")
        if not pods:  # interLink's ping: the VK reads a PingResponse from it and sets the node's capacity
            return web.json_response(await self._ping())
        for pod in pods:
            _pod_of(pod)
        answers = await asyncio.gather(*(self._pod_status(pod) for pod in pods))
        return web.json_response([answer for answer in answers if answer is not None])

    async def _ping(self) -> dict[str, Any]:
        """interLink's ``PingResponse``: the site's free CPUs, memory and GPUs (what ``offload sites gpus``
        reads: one scheduler call), as the Virtual Kubelet's node capacity."""
        nodes = [n for n in await self.site.anodes() if n.available]
        resources: dict[str, Any] = {"cpu": str(sum(n.cpus_free for n in nodes))}
        if any(n.memory_mb for n in nodes):
            resources["memory"] = f"{sum(max(0, n.memory_mb - n.memory_used_mb) for n in nodes)}Mi"
        if any(n.gpus for n in nodes):
            resources["accelerators"] = [{"resourceType": "nvidia.com/gpu",
                                          "available": str(sum(n.gpus_free for n in nodes))}]  # fmt: skip
        return {"status": "ok", "resources": resources}

    async def _pod_status(self, pod: dict) -> dict[str, Any] | None:
        uid, meta, spec = _pod_of(pod)
        if uid in self._final:
            return self._final[uid]
        pending = self._pending.get(uid)
        job = self._jobs.get(uid) if pending is not None else await self._job(uid)
        if job is None and pending is None:
            log.warning("asked for the status of pod %s (%s), which has no job here", meta.get("name"), uid)
            return None
        init_containers, containers = spec.get("initContainers") or [], spec.get("containers") or []
        init, main = [c["name"] for c in init_containers], [c["name"] for c in containers]
        images = {c["name"]: c.get("image", "") for c in [*init_containers, *containers]}
        states: dict[str, dict[str, Any]] = {}
        if job is not None:
            status = await job.astatus(refresh=False)  # the poller's answer: one squeue for every pod
            started = status.state is not offload.JobState.PENDING
            states = parse_state((await job.aget(STATE_FILE)).decode(errors="replace")) if started else {}
        elif pending is not None and pending.deleted:
            status = offload.JobStatus(offload.JobState.CANCELLED, reason="deleted before its job was submitted")
        elif pending is not None and pending.failure:
            status = offload.JobStatus(offload.JobState.FAILED, reason=pending.failure)
        else:  # its images are being pulled, or its job submitted
            status = offload.JobStatus(offload.JobState.PENDING, reason="ContainerCreating")
        answer = {
            "name": meta.get("name"),
            "UID": uid,
            "namespace": meta.get("namespace"),
            "JID": job.id if job else "",
            "containers": container_statuses(main, images, status, states),
            "initContainers": container_statuses(init, images, status, states),
        }
        if status.state.is_terminal:
            self._final[uid] = answer  # nothing changes after the end: no more reads for this pod
        return answer

    # -- GET /getLogs ---------------------------------------------------------------------------------------

    async def get_logs(self, request: web.Request) -> web.StreamResponse:
        asked = await request.json()
        if not isinstance(asked, dict) or not isinstance(asked.get("Opts") or {}, dict):
            raise BadRequest(400, "expected interLink's LogStruct: PodUID, ContainerName, Opts")
        uid, container = str(asked.get("PodUID", "")), str(asked.get("ContainerName", ""))
        opts = asked.get("Opts") or {}
        pending = self._pending.get(uid)
        job = self._jobs.get(uid) if pending is not None else await self._job(uid)
        if job is None:
            if pending is not None:
                raise BadRequest(400, f"container {container!r} is waiting to start: ContainerCreating")
            raise BadRequest(404, f"offload has no job for pod {asked.get('PodName')!r} ({uid})")
        tail, limit = int(opts.get("Tail") or 0), int(opts.get("Bytes") or opts.get("LimitBytes") or 0)
        try:
            name = log_file(container)
            if not opts.get("Follow"):  # read only what is shown: `kubectl logs --tail=1` of a 300 MiB log
                shown = await _read_shown(job, name, tail, limit)
                return web.Response(body=shown, content_type="text/plain", charset="utf-8")
            data = await job.aget(name) if tail else b""  # else all of it comes through the follower, in pieces
        except offload.ConfigError as exc:
            raise BadRequest(400, str(exc)) from None
        shown = _tail(data, tail)
        if limit:
            shown = shown[:limit]
        # Headers go now: interLink's client waits 120 s for them (ResponseHeaderTimeout), then nothing times the
        # body out (no http.Client Timeout, no WriteTimeout on interLink's or the VK's servers, TCP keep-alive from
        # their dialers), and interLink copies every byte into `kubectl logs -f`. So a silent container sends
        # nothing: any keep-alive byte would show. The loop notices a reader that went away on its own.
        response = web.StreamResponse()
        response.content_type = "text/plain"
        await response.prepare(request)
        await response.write(shown)
        sent = len(shown)

        def gone() -> bool:
            return request.transport is None or request.transport.is_closing()  # kubectl (hence interLink) left

        async def done() -> bool:  # asked while the log is quiet; the follower then reads once more
            return gone() or await self._container_ended(job, container)

        interval = min(2.0, self.site.config.poll_interval)
        # a read that fails is tried again at the same pace while the site was quiet for less than retry_within
        quiet = offload.RetryPolicy(first=interval, factor=1.0, cap=interval, jitter=0.0, within=self.retry_within)
        follower = job.afollow(name, len(data), until=done, interval=interval, retry=quiet, retry_if=transient)
        try:
            async with contextlib.aclosing(follower):
                while not (limit and sent >= limit) and not gone():
                    chunk = await anext(follower, b"")  # never empty until the end
                    if not chunk:
                        break
                    chunk = chunk[: limit - sent] if limit else chunk
                    await response.write(chunk)
                    sent += len(chunk)
        except offload.OffloadError as exc:
            log.warning("following %s of pod %s ended: %s", container, uid, exc)
        await response.write_eof()
        return response

    async def _container_ended(self, job: offload.Job, container: str) -> bool:
        if (await job.astatus(refresh=False)).state.is_terminal:
            return True
        return "exit" in parse_state((await job.aget(STATE_FILE)).decode(errors="replace")).get(container, {})

    # -- POST /delete ---------------------------------------------------------------------------------------

    async def delete(self, request: web.Request) -> web.Response:
        uid, meta, _spec = _pod_of(await request.json())
        pending = self._pending.get(uid)
        if pending is not None:
            pending.deleted = True  # before the lock: a submission not yet started will not start
        # the Virtual Kubelet may ask once more; then this plugin forgets the pod (its records do not)
        asyncio.get_running_loop().call_later(FORGET_AFTER, self._forget, uid)
        async with self._locked(uid):  # a submission under way ends first: its job is then cancelled below
            job = await self._job(uid, fresh=True)
        if job is None:
            return web.Response(text=f"no job for pod {uid}: nothing to cancel")
        status = await job.astatus(refresh=False)
        if not status.state.is_terminal:
            await self.site.acancel([job], timeout=30)
            log.info("pod %s/%s (%s) deleted: job %s cancelled", meta.get("namespace"), meta.get("name"), uid, job.id)
        await self._remove_volumes(job)
        return web.Response(text=f"job {job.id} of pod {uid} cancelled")

    async def _remove_volumes(self, job: offload.Job) -> None:
        """Kubernetes deletes a pod's volumes with the pod. The driver removes its secret and projected ones when
        it ends, but a job cancelled before it started never ran its driver: so the deletion removes them all
        (the containers' logs stay, beside them in the job's directory)."""
        if not job.ref.jobdir:
            return
        argv = ["rm", "-rf", "--", f"{job.ref.jobdir}/volumes"]
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.site.transport_run, argv)
        except offload.OffloadError as exc:
            log.warning("could not remove the volumes of job %s (%s): remove %s/volumes", job.id, exc, job.ref.jobdir)

    def _forget(self, uid: str) -> None:
        for known in (self._jobs, self._final, self._missing):
            known.pop(uid, None)
        pending = self._pending.get(uid)
        if pending is not None and (pending.task is None or pending.task.done()):
            del self._pending[uid]


async def _read_shown(job: offload.Job, name: str, lines: int, limit: int) -> bytes:
    """The last ``lines`` lines of a container's log (all of it if 0), cut at ``limit`` bytes (0: no cut),
    reading from the end only as much as they need."""
    if not lines:
        return await job.aget(name, 0, limit or None)
    size = 64 * 1024
    while True:
        data = await job.aget(name, -size)
        if len(data) < size or data.count(b"\n") > lines:
            break
        size *= 4
    shown = _tail(data, lines)
    return shown[:limit] if limit else shown


def _tail(data: bytes, lines: int) -> bytes:
    if lines <= 0:
        return data
    kept = data.rstrip(b"\n").split(b"\n")[-lines:]
    return b"\n".join(kept) + b"\n" if kept != [b""] else b""


def _error(status: int, message: str) -> web.Response:
    # interLink puts this body on the pod as its failure message: the words that say what to change
    return web.Response(status=status, text=message)


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (``--token-file``), surrounding white space dropped."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise offload.ConfigError(f"--token-file {str(path)!r}: {exc.strerror}: give a readable file") from None
    if not token:
        raise offload.ConfigError(f"--token-file {str(path)!r} is empty: put the token in it")
    return token


async def serve(site: offload.Site, listen: str, *, image_map: Mapping[str, str] | None = None,
                public: bool = False, hosts: Iterable[str] = (), token_file: str | Path | None = None,
                ready: asyncio.Event | None = None) -> None:  # fmt: skip
    """Serve the plugin API for ``site`` on ``listen`` until SIGINT/SIGTERM. Jobs keep running when it stops:
    a plugin started again answers for them (its records map each pod's UID to its job). ``hosts``: names
    interLink may reach it by (checked in ``Host``); ``token_file``: every request then needs that bearer token
    (interLink's API server sends none itself: for a proxy in front that adds it)."""
    where = parse_listen(listen, public)
    token = read_token(token_file) if token_file else None
    await site.aworkdir()  # the site answers and its host key is trusted, before interLink is told anything
    runner = web.AppRunner(PodServer(site, image_map, hosts=hosts, token=token).app(), access_log=None)
    await runner.setup()
    if where.path:
        endpoint: web.BaseSite = web.UnixSite(runner, where.path)
    else:
        endpoint = web.TCPSite(runner, where.host, where.port)
    await endpoint.start()
    log.info("interLink plugin for site %s listening on %s", site.name, listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
