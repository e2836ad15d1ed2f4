"""``reach``: a job uses services on the user's side (MLflow, a hub API, a database) through offload's connection.

Compute nodes usually have no outbound network, so ``JobSpec(reach={"MLFLOW_TRACKING_URI": url})`` gives the
payload ``MLFLOW_TRACKING_URI`` pointing at the node's loopback, and offload carries that traffic back to the
original address **from this machine**: its network, VPN and DNS apply, and nothing listens here.

How the bytes travel (see :mod:`offload.reach_node` for the node side)::

    payload -> 127.0.0.1:P on the node -> relay (serve) -> carrier step (srun --overlap, stdio)
            -> srun on the login node -> the SSH channel -> this process -> the service

``https://`` targets go through a CONNECT proxy on the node (``https_proxy``), so TLS is end to end with the
real host name; ``http://`` and plain ``host:port`` targets get a loopback port of their own. The process that
submitted the job serves its relay while it runs (``Site.relay(job)`` serves it from any other process, e.g.
``offload relay JOB``); a lost connection is re-established and the carrier restarted, while the job sees
refused connections meanwhile, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import shlex
import struct
from typing import TYPE_CHECKING

from offload import reach_node
from offload.errors import ConfigError, OffloadError, TransportError
from offload.jobs import JobRef, JobState
from offload.retry import RetryPolicy
from offload.runtimes.base import ContainerContext

if TYPE_CHECKING:
    from offload.context import SiteContext

log = logging.getLogger("offload.reach")

SOURCE = inspect.getsource(reach_node)
# A carrier that stopped is started again while its job runs, pausing from 1 s up to 30 s; never given up.
_RESTARTS = RetryPolicy(first=1.0, factor=2.0, cap=30.0)


def base_key(jobdir: str) -> str:
    """The job's relay socket name on its node, less the array index the batch script appends."""
    return hashlib.sha256(jobdir.encode()).hexdigest()[:24]


def relay_key(ref: JobRef) -> str:
    base = base_key(ref.jobdir)
    return base if ref.index is None else f"{base}-{ref.index}"


# -- serving a relay from this process -------------------------------------------------------------------


class _ClientMux(reach_node.Mux):
    """The client's end of a carrier: each OPEN is a connection from this machine to the target."""

    def __init__(self, writer, targets: list[tuple[str, int]], stats: dict[str, int]) -> None:
        super().__init__(writer, 2)
        self.targets = targets
        self.stats = stats

    async def on_open(self, sid: int, payload: bytes) -> None:
        (index,) = struct.unpack("!H", payload[:2])
        if index >= len(self.targets):
            self.send(reach_node.frame(reach_node.CLOSE, sid, b"no such target"))
            return
        host, port = self.targets[index]
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 15)
        except (OSError, TimeoutError) as exc:
            reason = f"{host}:{port} is not reachable from the client: {getattr(exc, 'strerror', None) or exc!r}"
            log.warning("reach: %s", reason)
            self.send(reach_node.frame(reach_node.CLOSE, sid, reason.encode()))
            return
        stream = self.streams[sid] = reach_node.Stream(self, sid, reader, writer)
        self.stats["connections"] = self.stats.get("connections", 0) + 1
        self.send(reach_node.frame(reach_node.OPENED, sid))
        stream.start()


class JobForward:
    """A local port reaching a port on a job's node loopback (through the job's relay)."""

    def __init__(self, server: asyncio.AbstractServer) -> None:
        self._server = server

    @property
    def local_port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)


class Relays:
    """The relays this process serves, one task per job: start the carrier once the job runs, restart it
    after a lost connection, stop when the job ends."""

    def __init__(self, ctx: SiteContext) -> None:
        self._ctx = ctx
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._muxes: dict[str, _ClientMux] = {}
        self._attached: dict[str, asyncio.Event] = {}
        self.stats: dict[str, int] = {}

    def serve(self, ref: JobRef, targets: list[tuple[str, int]]) -> asyncio.Task[None]:
        """Serve ``ref``'s relay (idempotent); runs on offload's private loop."""
        task = self._tasks.get(ref.id)
        if task is None or task.done():
            task = self._tasks[ref.id] = asyncio.get_running_loop().create_task(self._serve(ref, targets))
            task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        return task

    def serving(self, job_id: str) -> bool:
        """Whether this process serves the job's relay (a task that has not ended)."""
        task = self._tasks.get(job_id)
        return task is not None and not task.done()

    async def serve_recorded(self, ref: JobRef) -> None:
        """Serve the relay of a job another process submitted, to the targets its directory records."""
        raw = await self._ctx.transport.read_file(ref.paths.reach)
        if not raw:
            raise ConfigError(
                f"job {ref.id} on {self._ctx.name} runs no relay (it was submitted without reach or relay)"
            )
        self.serve(ref, [(t["host"], int(t["port"])) for t in json.loads(raw)])

    def carrier_argv(self, ref: JobRef) -> list[str]:
        """The job step that carries the relay on the job's node: the relay program in ``carry`` mode, with the
        node's python3 or else the image's (the one this machine's records say the job runs)."""
        carrier = ["python3", "-c", SOURCE, "carry", relay_key(ref)]
        record = self._ctx.records.get(self._ctx.name, ref.id)
        image = (record.image if record else None) or self._ctx.config.image
        inner = self._ctx.runtime.command(carrier, ContainerContext(image=image, jobdir=ref.jobdir))
        script = (f"if command -v python3 >/dev/null 2>&1; then exec {shlex.join(carrier)}; "
                  f"else exec {shlex.join(inner)}; fi")  # fmt: skip
        return ["bash", "-c", script]

    def stop(self, job_id: str) -> None:
        task = self._tasks.pop(job_id, None)
        if task is not None:
            task.cancel()

    async def mux(self, ref: JobRef, timeout: float) -> _ClientMux:
        """The job's attached carrier, once it is (the job must run and its relay be served)."""
        attached = self._attached.setdefault(ref.id, asyncio.Event())
        await asyncio.wait_for(attached.wait(), timeout)
        return self._muxes[ref.id]

    async def forward(self, ref: JobRef, remote_port: int, local_port: int = 0) -> JobForward:
        """Listen on 127.0.0.1:``local_port``; each connection reaches the job node's 127.0.0.1:``remote_port``
        through the job's carrier (the service may listen on the node's loopback only)."""

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                mux = await self.mux(ref, timeout=30)
            except TimeoutError:
                writer.close()
                return
            stream = await mux.open(reach_node.loopback(remote_port), reader, writer)
            if stream is None:
                writer.close()
                return
            stream.start()

        server = await asyncio.start_server(connected, "127.0.0.1", local_port)
        return JobForward(server)

    async def close(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, ref: JobRef, targets: list[tuple[str, int]]) -> None:
        try:
            await self._serve_until_end(ref, targets)
        finally:  # a hub or plugin serves relays for months: nothing of an ended job stays
            self._attached.pop(ref.id, None)
            self._muxes.pop(ref.id, None)
            if self._tasks.get(ref.id) is asyncio.current_task():
                del self._tasks[ref.id]

    async def _serve_until_end(self, ref: JobRef, targets: list[tuple[str, int]]) -> None:
        ctx, restarts = self._ctx, _RESTARTS.start()
        while True:
            status = await ctx.poller.wait(ref, (JobState.RUNNING,))
            if status.state.is_terminal:
                return
            node = ctx.scheduler.first_host(status.node)
            argv = await ctx.scheduler.step(ctx.transport, ref, node, self.carrier_argv(ref))
            if argv is None:
                return  # the job runs here: it reaches the services directly
            started = asyncio.get_running_loop().time()
            try:
                await self._carry(argv, targets, ref)
            except (OffloadError, OSError, asyncio.IncompleteReadError) as exc:
                log.debug("reach: the carrier of job %s stopped (%s)", ref.id, exc)
            if asyncio.get_running_loop().time() - started > 60:
                restarts.reset()  # it carried for a while: a new trouble, the pauses start short again
            restarts.failed()
            await restarts.wait()

    async def _carry(self, argv: list[str], targets: list[tuple[str, int]], ref: JobRef) -> None:
        process = await self._ctx.transport.start(argv)
        try:
            kind, _, payload = await asyncio.wait_for(reach_node.read_frame(process.stdout), 120)
            if kind != reach_node.HELLO:
                raise TransportError(f"the relay of job {ref.id} answered frame {kind} instead of HELLO")
            log.debug("reach: relay of job %s on %s attached", ref.id, json.loads(payload).get("node"))
            self.stats["carriers"] = self.stats.get("carriers", 0) + 1
            mux = self._muxes[ref.id] = _ClientMux(process.stdin, targets, self.stats)
            attached = self._attached.setdefault(ref.id, asyncio.Event())
            attached.set()
            try:
                await mux.run(process.stdout)
            finally:
                attached.clear()
                if self._muxes.get(ref.id) is mux:
                    del self._muxes[ref.id]
        finally:
            with contextlib.suppress(Exception):
                process.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.wait(), 5)
