"""interLink's plugin API, served by offload: the Virtual Kubelet's pods become jobs on one site.

interLink's API server calls a plugin over plain HTTP (no credentials on that leg): ``POST /create`` with one
``RetrievedPodData``, ``GET /status`` with an array of pods (an empty array is its ping), ``GET /getLogs`` and
``POST /delete``. This server answers them from offload's own parts, so the site sees what any other offload
client costs it: one SSH connection, one scheduler poll per interval for every live pod together (``/status``
reads the poller's cache), and records that map a pod's UID to its job, so ``/create`` is idempotent and a
restarted plugin answers for the pods created before.

The handlers run on this server's loop and hand each site call to offload's own loop, where the connection and
the poller live (the ``a*`` methods do that).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

# A followed log with nothing new still sends something this often, so no proxy between interLink and its
# client closes the stream as idle.
HEARTBEAT_SECONDS = 15.0
# How long "offload has no job for this pod" is believed before the records and the scheduler are asked again.
MISSING_FOR = 60.0
# How long after /delete a pod's answers stay in memory (a long-lived plugin serves many pods).
FORGET_AFTER = 600.0


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


class PodServer:
    """The plugin's handlers for one site. ``image_map`` maps pod image names to what the site runs."""

    def __init__(self, site: offload.Site, image_map: Mapping[str, str] | None = None) -> None:
        self.site = site
        self.image_map = dict(image_map or {})
        self._jobs: dict[str, offload.Job] = {}
        self._missing: dict[str, float] = {}
        self._final: dict[str, dict[str, Any]] = {}
        self._creating: dict[str, asyncio.Lock] = {}

    def app(self) -> web.Application:
        # a pod's ConfigMaps and Secrets travel in /create
        app = web.Application(client_max_size=64 * 2**20, middlewares=[_site_errors])
        app.add_routes(
            [
                web.post("/create", self.create),
                web.get("/status", self.status),
                web.get("/getLogs", self.get_logs),
                web.post("/delete", self.delete),
            ]
        )
        return app

    # -- finding a pod's job ------------------------------------------------------------------------------

    async def _job(self, uid: str) -> offload.Job | None:
        """The job of pod ``uid``: this server's memory, else this machine's records (a restarted plugin),
        else the scheduler, by the job's name (a plugin moved to another machine)."""
        if uid in self._jobs:
            return self._jobs[uid]
        if time.monotonic() - self._missing.get(uid, -MISSING_FOR) < MISSING_FOR:
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
        try:
            data = await request.json()
        except json.JSONDecodeError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        if isinstance(data, list):  # older interLink releases send a list of one
            if len(data) != 1:
                return _error(400, f"expected one pod per /create, got {len(data)}")
            data = data[0]
        uid = ((data.get("pod") or {}).get("metadata") or {}).get("uid")
        if not uid:
            return _error(400, "the pod has no metadata.uid")
        lock = self._creating.setdefault(uid, asyncio.Lock())
        async with lock:
            job = await self._job(uid)
            if job is not None:  # a repeat: the Virtual Kubelet retried, or a restarted plugin is asked again
                return web.json_response({"PodUID": uid, "PodJID": job.id})
            try:
                job = await self._submit(data)
            except offload.ConfigError as exc:
                return _error(422, str(exc))
            except (offload.SiteNotAnswering, offload.TransportError) as exc:
                return _error(503, str(exc))
            except offload.OffloadError as exc:  # the scheduler's or the image cache's own words
                return _error(500, str(exc))
            self._jobs[uid] = job
            self._missing.pop(uid, None)
        meta = data["pod"]["metadata"]
        log.info("pod %s/%s (%s) is job %s", meta.get("namespace"), meta.get("name"), uid, job.id)
        return web.json_response({"PodUID": uid, "PodJID": job.id})

    async def _submit(self, data: dict) -> offload.Job:
        spec = (data.get("pod") or {}).get("spec") or {}
        wanted = {c.get("image", "") for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]}
        if "" in wanted:
            raise offload.ConfigError("every container of the pod needs an image")
        refs = {image: site_image(image, self.image_map) for image in wanted}
        resolved = await asyncio.gather(*(self.site.images.aresolve(ref) for ref in refs.values()))
        images = dict(zip(refs, resolved, strict=True))
        return await self.site.asubmit(plan_pod(self.site, data, images))

    # -- GET /status ----------------------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        try:
            pods = await request.json() if request.can_read_body else []
        except json.JSONDecodeError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        if not pods:  # interLink's ping
            return web.json_response([])
        answers = await asyncio.gather(*(self._pod_status(pod) for pod in pods))
        return web.json_response([answer for answer in answers if answer is not None])

    async def _pod_status(self, pod: dict) -> dict[str, Any] | None:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        uid = meta.get("uid", "")
        if uid in self._final:
            return self._final[uid]
        lock = self._creating.get(uid)
        if lock is not None and lock.locked():  # its /create is still pulling or submitting
            job = None
        else:
            job = await self._job(uid)
            if job is None:
                log.warning("asked for the status of pod %s (%s), which has no job here", meta.get("name"), uid)
                return None
        init_containers, containers = spec.get("initContainers") or [], spec.get("containers") or []
        init, main = [c["name"] for c in init_containers], [c["name"] for c in containers]
        images = {c["name"]: c.get("image", "") for c in [*init_containers, *containers]}
        if job is None:
            status = offload.JobStatus(offload.JobState.PENDING, reason="ContainerCreating")
            states: dict[str, dict[str, Any]] = {}
        else:
            status = await job.astatus(refresh=False)  # the poller's answer: one squeue for every pod
            started = status.state is not offload.JobState.PENDING
            states = parse_state((await job.aget(STATE_FILE)).decode(errors="replace")) if started else {}
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
        try:
            asked = await request.json()
        except json.JSONDecodeError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        uid, container = asked.get("PodUID", ""), asked.get("ContainerName", "")
        opts = asked.get("Opts") or {}
        job = await self._job(uid)
        if job is None:
            return _error(404, f"offload has no job for pod {asked.get('PodName')!r} ({uid})")
        try:
            name = log_file(container)
            data = await job.aget(name)
        except offload.ConfigError as exc:
            return _error(400, str(exc))
        tail, limit = int(opts.get("Tail") or 0), int(opts.get("Bytes") or opts.get("LimitBytes") or 0)
        shown = _tail(data, tail)
        if limit:
            shown = shown[:limit]
        if not opts.get("Follow"):
            return web.Response(body=shown, content_type="text/plain", charset="utf-8")
        response = web.StreamResponse()
        response.content_type = "text/plain"
        await response.prepare(request)
        await response.write(shown)
        sent, offset, written = len(shown), len(data), time.monotonic()
        interval = min(2.0, self.site.config.poll_interval)
        ended = False
        while not (limit and sent >= limit):
            chunk = await job.aget(name, offset)
            offset += len(chunk)
            if limit:
                chunk = chunk[: limit - sent]
            if chunk:
                await response.write(chunk)
                sent, written = sent + len(chunk), time.monotonic()
                continue
            if ended:  # ended before the read above: that read had its last words
                break
            # asked only while the container is quiet; then one more read, for what it wrote last
            if ended := await self._container_ended(job, container):
                continue
            if time.monotonic() - written > HEARTBEAT_SECONDS:
                await response.write(b"\n")
                written = time.monotonic()
            await asyncio.sleep(interval)
        await response.write_eof()
        return response

    async def _container_ended(self, job: offload.Job, container: str) -> bool:
        if (await job.astatus(refresh=False)).state.is_terminal:
            return True
        return "exit" in parse_state((await job.aget(STATE_FILE)).decode(errors="replace")).get(container, {})

    # -- POST /delete ---------------------------------------------------------------------------------------

    async def delete(self, request: web.Request) -> web.Response:
        try:
            pod = await request.json()
        except json.JSONDecodeError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        meta = pod.get("metadata") or {}
        uid = meta.get("uid", "")
        job = await self._job(uid)
        if job is None:
            return web.Response(text=f"no job for pod {uid}: nothing to cancel")
        # the Virtual Kubelet may ask once more; then this plugin forgets the pod (its records do not)
        asyncio.get_running_loop().call_later(FORGET_AFTER, self._forget, uid)
        status = await job.astatus(refresh=False)
        if not status.state.is_terminal:
            await self.site.acancel([job], timeout=30)
            log.info("pod %s/%s (%s) deleted: job %s cancelled", meta.get("namespace"), meta.get("name"), uid, job.id)
        return web.Response(text=f"job {job.id} of pod {uid} cancelled")

    def _forget(self, uid: str) -> None:
        for known in (self._jobs, self._final, self._missing):
            known.pop(uid, None)
        lock = self._creating.get(uid)
        if lock is not None and not lock.locked():
            del self._creating[uid]


@web.middleware
async def _site_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """A site that does not answer (or answers with an error) is the reply's words, not a bare 500."""
    try:
        return await handler(request)
    except (offload.SiteNotAnswering, offload.TransportError) as exc:
        log.warning("%s: %s", request.path, exc)
        return _error(503, str(exc))
    except offload.OffloadError as exc:
        log.warning("%s: %s", request.path, exc)
        return _error(500, str(exc))


def _tail(data: bytes, lines: int) -> bytes:
    if lines <= 0:
        return data
    kept = data.rstrip(b"\n").split(b"\n")[-lines:]
    return b"\n".join(kept) + b"\n" if kept != [b""] else b""


def _error(status: int, message: str) -> web.Response:
    # interLink puts this body on the pod as its failure message: the words that say what to change
    return web.Response(status=status, text=message)


async def serve(site: offload.Site, listen: str, *, image_map: Mapping[str, str] | None = None,
                public: bool = False, ready: asyncio.Event | None = None) -> None:  # fmt: skip
    """Serve the plugin API for ``site`` on ``listen`` until SIGINT/SIGTERM. Jobs keep running when it stops:
    a plugin started again answers for them (its records map each pod's UID to its job)."""
    where = parse_listen(listen, public)
    await site.aworkdir()  # the site answers and its host key is trusted, before interLink is told anything
    runner = web.AppRunner(PodServer(site, image_map).app(), access_log=None)
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
