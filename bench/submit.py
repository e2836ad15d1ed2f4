"""Submission throughput and status polling: offload over one SSH connection vs the usual alternatives.

* 200 distinct jobs: ``Site.submit_many`` (one round trip) vs a local loop of ``sbatch`` on the login node.
* 200 identical jobs: the same call, which sends one job array, vs the same local loop.
* vs one new SSH connection per job (what per-task SSH operators do), on the direct link and through a TCP
  proxy that delays every packet (a laptop-to-site WAN link).
* Status polling of 200 tracked jobs: scheduler calls per minute, one ``squeue`` per interval vs per job.

Jobs are submitted held (``--hold``), so nothing runs and only submission is measured; each round cancels
what it submitted.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

import asyncssh
from common import TESTSITE, Comparison, alternate

import offload
from offload import load_profiles

JOBS = 200
PER_CONNECTION_JOBS = 40  # the connection-per-job approach is slow; its rate is measured on fewer jobs
HOLD = ("--hold",)


def site_config(port: int | None = None, known_hosts: str | None = None):
    os.environ.setdefault("OFFLOAD_CONFIG", f"{TESTSITE}/offload.toml")
    config = load_profiles().get("testsite")
    changes = {}
    if port:
        changes["port"] = port
    if known_hosts:
        changes["known_hosts"] = known_hosts
    return config.with_overrides(**changes) if changes else config


NAMES = ("bench", "bench-loop", "bench-conn")  # every job the benchmark submits carries one of these


def cancel_all() -> None:
    """Cancel what the benchmark submitted (by name: other users of the site are left alone)."""
    for name in NAMES:
        subprocess.run(["scancel", f"--name={name}"], check=False)
    for _ in range(300):
        out = subprocess.run(["squeue", "--noheader", "--format=%j"], capture_output=True, text=True).stdout
        if not set(out.split()) & set(NAMES):
            return
        time.sleep(0.1)


def offload_rate(identical: bool, config=None) -> float:
    site = offload.Site(config or site_config())
    try:
        held = offload.Resources(extra=HOLD)
        site.submit(offload.JobSpec(["true"], resources=held, name="bench"))  # connect, resolve the workdir
        if identical:
            specs = [offload.JobSpec(["true"], resources=held, name="bench")] * JOBS
        else:
            specs = [offload.JobSpec(["true", str(i)], resources=held, name="bench") for i in range(JOBS)]
        start = time.perf_counter()
        jobs = site.submit_many(specs)
        elapsed = time.perf_counter() - start
        assert len(jobs) == JOBS
    finally:
        site.close()
        cancel_all()
    return JOBS / elapsed


def sbatch_loop_rate() -> float:
    script = Path(tempfile.mkdtemp()) / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --output=/dev/null\n#SBATCH --job-name=bench-loop\ntrue\n")
    loop = f"for i in $(seq {JOBS}); do sbatch --parsable --hold {script} >/dev/null || exit 1; done"
    start = time.perf_counter()
    subprocess.run(["bash", "-c", loop], check=True)
    elapsed = time.perf_counter() - start
    cancel_all()
    return JOBS / elapsed


def per_connection_rate(config=None) -> float:
    config = config or site_config()

    async def one(i: int) -> None:
        async with asyncssh.connect(config.host, port=config.port, username=config.user,
                                    client_keys=list(config.identity_files),
                                    known_hosts=config.known_hosts) as conn:  # fmt: skip
            result = await conn.run("sbatch --parsable --hold --job-name=bench-conn --output=/dev/null --wrap true",
                                    check=True)  # fmt: skip
            assert result.stdout.strip().isdigit()

    async def run() -> float:
        start = time.perf_counter()
        for i in range(PER_CONNECTION_JOBS):
            await one(i)
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    cancel_all()
    return PER_CONNECTION_JOBS / elapsed


def rate_rows(runs: int) -> list[Comparison]:
    rows = []
    distinct, loop = alternate(runs, lambda: offload_rate(False), sbatch_loop_rate)
    rows.append(Comparison(f"submit {JOBS} distinct jobs", "local sbatch loop", distinct, loop, unit="jobs/s",
                           lower_is_better=False, target=">= 0.9"))  # fmt: skip
    identical, loop2 = alternate(runs, lambda: offload_rate(True), sbatch_loop_rate)
    rows.append(Comparison(f"submit {JOBS} identical jobs (array)", "local sbatch loop", identical, loop2,
                           unit="jobs/s", lower_is_better=False, target=">= 5"))  # fmt: skip
    ours, per_conn = alternate(runs, lambda: offload_rate(False), per_connection_rate)
    rows.append(Comparison(f"submit {JOBS} distinct jobs", "new SSH connection per job", ours, per_conn,
                           unit="jobs/s", lower_is_better=False, target=">= 10"))  # fmt: skip
    return rows


# -- a WAN link: a TCP proxy that delays every chunk each way ---------------------------------------------


class DelayProxy:
    """127.0.0.1:port -> sshd, adding ``delay`` seconds to every chunk in each direction, keeping order."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.loop = asyncio.new_event_loop()
        self.port = 0

    def start(self) -> int:
        import threading

        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        ready.wait()
        return self.port

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        while True:
            data = await reader.read(65536)
            await queue.put((time.monotonic() + self.delay, data))
            if not data:
                break
        await sender


def wan_rows(runs: int, delay: float = 0.025) -> list[Comparison]:
    config = site_config()
    proxy = DelayProxy(config.port or 22, delay)
    port = proxy.start()
    host_key = (Path(TESTSITE) / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known = Path(tempfile.mkdtemp()) / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    wan = config.with_overrides(port=port, known_hosts=str(known))
    ours, per_conn = alternate(runs, lambda: offload_rate(False, wan), lambda: per_connection_rate(wan))
    return [Comparison(f"submit {JOBS} distinct jobs over a {delay * 1000:.0f} ms-each-way link",
                       "new SSH connection per job", ours, per_conn, unit="jobs/s", lower_is_better=False,
                       target="gap wider than on the direct link")]  # fmt: skip


# -- polling --------------------------------------------------------------------------------------------


def polling_rows(window: float = 10.0) -> list[Comparison]:
    """Scheduler calls per minute while 200 jobs are watched, offload's poller vs one query per job."""
    site = offload.Site(site_config())
    try:
        jobs = site.submit_many([offload.JobSpec(["true", str(i)], resources=offload.Resources(extra=HOLD),
                                                 name="bench") for i in range(JOBS)])  # fmt: skip
        before = site.transport.stats["run:squeue"]

        async def watch() -> None:
            waits = [asyncio.ensure_future(job.finished()) for job in jobs]
            await asyncio.sleep(window)
            for w in waits:
                w.cancel()

        asyncio.run(watch())
        ours = (site.transport.stats["run:squeue"] - before) * 60 / window
        interval = site.config.poll_interval
        config = site.config

        async def per_job() -> int:
            calls = 0
            async with asyncssh.connect(config.host, port=config.port, username=config.user,
                                        client_keys=list(config.identity_files),
                                        known_hosts=config.known_hosts) as conn:  # fmt: skip
                deadline = time.monotonic() + window
                while time.monotonic() < deadline:
                    tick = time.monotonic()
                    for job in jobs:  # what a per-task sensor does: ask about its own job
                        await conn.run(f"squeue --noheader --jobs={job.id} --format=%T")
                        calls += 1
                        if time.monotonic() > deadline:
                            break
                    await asyncio.sleep(max(0.0, interval - (time.monotonic() - tick)))
            return calls

        theirs = asyncio.run(per_job()) * 60 / window
    finally:
        site.close()
        cancel_all()
    return [Comparison(f"scheduler calls/min watching {JOBS} jobs ({interval:g} s interval)", "one squeue per job",
                       [ours], [theirs], unit="calls/min", target="one per interval")]  # fmt: skip


if __name__ == "__main__":
    from common import table

    runs = int(os.environ.get("BENCH_RUNS", "3"))
    print(table(rate_rows(runs) + wan_rows(runs) + polling_rows()))
