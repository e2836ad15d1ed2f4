"""Where the time goes for N one-worker Dask jobs: OffloadCluster and dask-jobqueue's SLURMCluster, phase by phase.

    python bench/profile_scaleup.py [--n 16,40] [--runs 1] [--peer] [--probe]

Instrumented from outside the product: the clusters are set up as in ``bench/scaleup.py`` (one worker per job),
with one prologue line in every worker job (``echo PROFILE batch-start $(date +%s.%N)``, on the node before the
worker starts); this script wraps a few of offload's calls to time them (submission, the scheduler's address
known, ``scheduler.json`` written, the forward open), and reads what the others write anyway: slurmctld's log
(each job's submission and allocation, in ms), the workers' and schedulers' Dask logs (their own time stamps:
worker started, registered), the machine's CPU time (``/proc/stat``: the test site's nodes share its 2 cores).
``--probe`` also runs N one-CPU jobs that only time their container's start, Python's start and ``import
distributed`` inside offload's image (what a worker job does before its first Dask log line).

Every time is seconds from the cluster's constructor; each phase is printed as first / median / last worker.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import scaleup
from common import squeue_empty

CTLD_LOG = "/var/log/slurm/slurmctld.log"
PROLOGUE = 'echo "PROFILE batch-start $(date +%s.%N)"'
DASK_TIME = re.compile(r"^(?:\[[^]]*\] )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - ")


class Timeline:
    """Named moments (epoch seconds), several per name (one per job or worker)."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.events: dict[str, list[float]] = {}

    def mark(self, name: str, when: float | None = None) -> None:
        self.events.setdefault(name, []).append(time.time() if when is None else when)

    def report(self, title: str) -> str:
        lines = [f"#### {title}", "", "| moment | first | median | last | count |", "|---|---|---|---|---|"]
        for name, times in sorted(self.events.items(), key=lambda item: min(item[1])):
            rel = sorted(t - self.t0 for t in times)
            lines.append(f"| {name} | {rel[0]:.2f} | {statistics.median(rel):.2f} | {rel[-1]:.2f} | {len(rel)} |")
        return "\n".join(lines)


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def dask_time(line: str) -> float | None:
    match = DASK_TIME.search(line)
    if not match:
        return None
    return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the nodes' local time is this one's


def read_worker_log(timeline: Timeline, text: str) -> None:
    """The moments a worker job's log says: its batch script's start (the prologue line) and its Dask milestones."""
    for line in text.splitlines():
        if line.startswith("PROFILE batch-start "):
            timeline.mark("worker batch script starts (node)", float(line.split()[-1]))
        elif (when := dask_time(line)) is None:
            continue
        elif "Start Nanny at" in line:
            timeline.mark("worker: nanny started (jobqueue)", when)
        elif "Start worker at" in line:
            timeline.mark("worker: Worker started (imports done)", when)
        elif "Registered to" in line:
            timeline.mark("worker: registered (its own log)", when)


def read_ctld(timeline: Timeline, ids: set[str], since: float, scheduler: str = "") -> None:
    """Submission and allocation of ``ids`` (plain job ids or array tasks ``A_i``) from slurmctld's log (ms)."""
    try:
        text = Path(CTLD_LOG).read_text(errors="replace")
    except OSError as exc:
        print(f"[profile] cannot read {CTLD_LOG}: {exc}", file=sys.stderr)
        return
    arrays = {i.split("_")[0] for i in ids if "_" in i}
    for line in text.splitlines():
        try:
            stamp = datetime.fromisoformat(line[1:24]).timestamp()
        except ValueError:
            continue
        if stamp < since - 1:
            continue
        if (m := re.search(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", line)) and (m[1] in ids or m[1] in arrays):
            timeline.mark(f"slurmctld: {'scheduler job' if m[1] == scheduler else 'worker job'} submitted", stamp)
        elif (m := re.search(r"(?:sched: Allocate|Started) JobId=(\d+(?:_\d+)?)", line)) and m[1] in ids:
            timeline.mark(f"slurmctld: {'scheduler job' if m[1] == scheduler else 'worker job'} allocated", stamp)


def wrap(owner: object, name: str, before: Callable[[], None] | None, after: Callable[[], None] | None) -> None:
    """Mark moments around an async method, from outside (the product is not changed)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    async def timed(*args, **kwargs):
        if before:
            before()
        result = await original(*args, **kwargs)
        if after:
            after()
        return result

    setattr(owner, name, timed)


def profile_offload(n: int) -> str:
    from distributed import Client

    import offload
    from dask_offload import OffloadCluster
    from dask_offload import cluster as cluster_mod

    timeline = Timeline()
    wrap(offload.Site, "asubmit_many", lambda: timeline.mark("client: submission starts (SSH connect + 1 trip)"),
         lambda: timeline.mark("client: submission returns (job ids)"))  # fmt: skip
    wrap(cluster_mod.SiteScheduler, "_scheduler_info", None, lambda: timeline.mark("client: scheduler address read"))
    wrap(offload.Job, "aput", None, lambda: timeline.mark("client: scheduler.json written to a worker job"))
    wrap(offload.Site, "aforward", None, lambda: timeline.mark("client: forward to the scheduler listens"))
    busy0 = cpu_busy()
    timeline.t0 = time.time()
    with OffloadCluster(site="testsite", queue="cpu", n_workers=n, processes=1, cores=1, memory="1GiB",
                        walltime="00:10:00", job_script_prologue=[PROLOGUE]) as cluster:  # fmt: skip
        timeline.mark("client: constructor returns")
        with Client(cluster) as client:
            timeline.mark("client: Client connected")
            client.wait_for_workers(n, timeout=300)
            timeline.mark("client: wait_for_workers(N) returns (READY)")
            busy1 = cpu_busy()
            ids = {job.id for job in cluster.jobs}
            scheduler_id = cluster.scheduler.job.id
            scheduler_log = cluster.scheduler.job.output().decode("utf-8", "replace")
            worker_logs = [job.output().decode("utf-8", "replace") for job in cluster.jobs[1:]]
    squeue_empty()
    for log in worker_logs:
        read_worker_log(timeline, log)
    for line in scheduler_log.splitlines():
        if (when := dask_time(line)) is not None:
            if "Scheduler at:" in line:
                timeline.mark("scheduler job: Scheduler listens (imports done)", when)
            elif "Register worker" in line:
                timeline.mark("scheduler: worker registered", when)
            elif "Receive client connection" in line:
                timeline.mark("scheduler: client connected", when)
    read_ctld(timeline, ids, timeline.t0, scheduler_id)
    cpu = (busy1[0] - busy0[0]) / (busy1[1] - busy0[1])
    return timeline.report(f"offload OffloadCluster, {n} one-worker jobs (machine CPU busy until READY: {cpu:.0%})")


def profile_jobqueue(n: int) -> str:
    from dask_jobqueue import SLURMCluster, slurm
    from distributed import Client

    timeline = Timeline()
    wrap(slurm.SLURMJob, "_submit_job", lambda: timeline.mark("client: sbatch starts"),
         lambda: timeline.mark("client: sbatch returns"))  # fmt: skip

    class Registered(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Register worker" in record.getMessage():
                timeline.mark("scheduler: worker registered", record.created)

    scheduler_logger = logging.getLogger("distributed.scheduler")
    handler, level = Registered(), scheduler_logger.level
    scheduler_logger.addHandler(handler)
    scheduler_logger.setLevel(logging.INFO)
    logs = tempfile.mkdtemp(prefix="jobqueue-logs-")
    busy0 = cpu_busy()
    timeline.t0 = time.time()
    try:
        with SLURMCluster(queue="cpu", cores=1, processes=1, memory="1GiB", walltime="00:10:00",
                          python=sys.executable, log_directory=logs, n_workers=n, job_script_prologue=[PROLOGUE],
                          scheduler_options={"host": scaleup.LOGIN_ADDRESS, "port": scaleup.OPEN_PORT,
                                             "dashboard_address": ":0"}) as cluster:  # fmt: skip
            timeline.mark("client: constructor returns")
            with Client(cluster) as client:
                timeline.mark("client: Client connected")
                client.wait_for_workers(n, timeout=300)
                timeline.mark("client: wait_for_workers(N) returns (READY)")
                busy1 = cpu_busy()
                ids = {str(w.job_id) for w in cluster.workers.values() if getattr(w, "job_id", None)}
    finally:
        scheduler_logger.removeHandler(handler)
        scheduler_logger.setLevel(level)
    squeue_empty()
    for path in Path(logs).iterdir():
        read_worker_log(timeline, path.read_text(errors="replace"))
    read_ctld(timeline, ids, timeline.t0)
    cpu = (busy1[0] - busy0[0]) / (busy1[1] - busy0[1])
    return timeline.report(f"dask-jobqueue SLURMCluster, {n} one-worker jobs (machine CPU busy until READY: {cpu:.0%})")


PROBE = """
import time
started = time.time()
import distributed
print("PROFILE python-start", started, flush=True)
print("PROFILE imported", time.time(), flush=True)
"""


def probe(n: int) -> str:
    """N one-CPU jobs at once in offload's image (as the workers' jobs): container start, Python, the import."""
    import offload

    site = offload.load_site("testsite")
    spec = offload.JobSpec(["python3", "-c", PROBE], name="bench-probe", prologue=(PROLOGUE,),
                           resources=offload.Resources(cpus=1, memory="1G", partition="cpu"))  # fmt: skip
    try:
        jobs = site.submit_many([spec] * n, arrays=n >= 16)
        for job in jobs:
            job.wait(timeout=300)
        moments: dict[str, list[float]] = {"container+python start": [], "import distributed": []}
        for job in jobs:
            out = {line.split()[1]: float(line.split()[2]) for line in job.output().decode().splitlines()
                   if line.startswith("PROFILE ")}  # fmt: skip
            moments["container+python start"].append(out["python-start"] - out["batch-start"])
            moments["import distributed"].append(out["imported"] - out["python-start"])
    finally:
        site.close()
    squeue_empty()
    lines = [
        f"#### probe: {n} jobs in offload's image at once",
        "",
        "| step | min | median | max |",
        "|---|---|---|---|",
    ]
    for name, values in moments.items():
        lines.append(f"| {name} | {min(values):.2f} | {statistics.median(values):.2f} | {max(values):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="16,40")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--peer", action="store_true", help="profile dask-jobqueue too (alternating)")
    parser.add_argument("--probe", action="store_true", help="time container start and imports on their own")
    args = parser.parse_args()
    scaleup.setup()
    for n in (int(x) for x in args.n.split(",")):
        for i in range(args.runs):
            steps = [lambda n=n: profile_offload(n)] + ([lambda n=n: profile_jobqueue(n)] if args.peer else [])
            for step in steps if i % 2 == 0 else steps[::-1]:
                print(step(), "\n", flush=True)
        if args.probe:
            print(probe(n), "\n", flush=True)


if __name__ == "__main__":
    main()
