"""One job, several sites: offload's placement side by side with the ways users place by hand, on the test site.

    python bench/placement.py [--runs 1] [--kills 100] [--out docs/benchmarks-placement.md]
    # or: tox -e bench-placement

Two pairs of sites, each measured on its own: the test site's SLURM cluster with its Grid Engine cell, and the
two SLURM clusters (``testsite`` and ``second``). The sites of a pair are separate schedulers that share no
database, as two centres would. Each has 4 GPUs (2 nodes with 2). The scripted load, put on again before each
way is measured: another user's job holds every GPU of the first site for 40 s, and one holds one node of the
second (2 GPUs) for 80 s; each asks for 10 minutes of walltime, as users ask for more than they use (what
schedulers plan by). Then 16 one-GPU jobs (each holds its GPU 10 s) are placed at once; the time to start of
each is from its submit call to the moment it runs (for a race, to its claim); p50 and p95 over the 16.

The ways, one after the other:

* **SLURM only** / **Grid Engine only**: every job to one site (a user who picks by hand); the better of the two
  is the row the others are compared with: the best a user could do who knew in advance.
* **ordered failover, 120 s**: to SLURM first (the user's home site), cancelled and sent to Grid Engine if it has
  not started within 120 s (SkyPilot's way on Slurm).
* **offload first-fit** (``SiteGroup.submit``): each job to the site where it starts now, one ``sinfo``/``qhost``
  per site.
* **offload estimate** (``policy="estimate"``): failover in the order of the schedulers' plans (SLURM's
  ``sbatch --test-only``, asked once a minute per site and shape; Grid Engine plans nothing, so ranks by its
  free GPUs), with the default patience.
* **offload race** (``policy="race"``): attempts on both sites, the first to start runs it, the other is released
  and cancelled.
* **sbatch -M testsite,second** (the SLURM pair only): Slurm's multi-cluster submission, which asks each cluster
  when it would start the job and submits it to the earliest, once. It needs both clusters in one slurmdbd, which
  separate centres do not have: for this row only, the second cluster is registered in the first's slurmdbd
  (``scripts/testsite-slurm2 accounting shared``), and given back its own after. The job is submitted with
  offload to the first cluster with ``--clusters=testsite,second`` among its options, so it is sbatch that picks.

Two more rows: **failover on a never-clearing reason** (an attempt on SLURM made to wait on a dependency that can
never be met, ``DependencyNeverSatisfied``: how many poll rounds until the next attempt is on Grid Engine), and
**killed clients** (``--kills`` runs of a race whose client is SIGKILLed at a random point, then ``offload
placements resume``: how many ran the payload once, none, or more; how many jobs were left).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import TESTSITE, machine

import offload
from offload import JobSpec, JobState, Resources

JOBS = 16
HOLD = 10  # seconds each job holds its GPU
LOAD_WALLTIME = "00:10:00"  # what the load's jobs ask for: far more than they use, as users do
FIRST_LOAD, SECOND_LOAD = (Resources(nodes=2, gpus_per_node=2, walltime=LOAD_WALLTIME), 40), (
    Resources(gpus=2, walltime=LOAD_WALLTIME), 80)  # fmt: skip
PAIRS = {"SLURM + Grid Engine": ("testsite", "gridengine"), "two SLURM clusters": ("testsite", "second")}
NAMES = {"testsite": "SLURM", "gridengine": "Grid Engine", "second": "second SLURM"}
CLUSTERS = {"testsite": "offload-testsite", "second": "second"}  # their SLURM ClusterName, what -M takes
GE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
SLURM2 = Path(__file__).resolve().parent.parent / "scripts" / "testsite-slurm2"


def job(name: str) -> JobSpec:
    return JobSpec(["sleep", str(HOLD)], resources=Resources(gpus=1, walltime="00:05:00"), container=False, name=name)


async def load(pair: list[offload.Site]) -> list[offload.Job]:
    """The scripted load, running on both sites of the pair before anything is placed."""
    held = [await site.asubmit(JobSpec(["sleep", str(seconds)], resources=res, container=False, name="bench-load"))
            for site, (res, seconds) in zip(pair, (FIRST_LOAD, SECOND_LOAD), strict=True)]  # fmt: skip
    await asyncio.gather(*(j.await_state(JobState.RUNNING, timeout=120) for j in held))
    return held


async def started(submit, name: str) -> tuple[float, offload.Job]:
    """Seconds from the submit call to the job's RUNNING, and the job."""
    t0 = time.monotonic()
    placed = await submit(job(name))
    await placed.await_state(JobState.RUNNING, timeout=900, or_end=True)
    return time.monotonic() - t0, placed


async def ordered_failover(first: offload.Site, then: offload.Site, spec: JobSpec, timeout: float = 120):
    """The peer: the first site; if the job has not started within ``timeout`` s, cancelled there and sent to the
    next (the job may have started meanwhile: this way has no claim, so it would then run twice)."""
    placed = await first.asubmit(spec)
    try:
        await placed.await_state(JobState.RUNNING, timeout=timeout)
        return placed
    except TimeoutError:
        await placed.acancel()
        return await then.asubmit(spec)


def ways(pair: tuple[str, str]) -> list[str]:
    multi = [f"sbatch -M {','.join(pair)}"] if pair == ("testsite", "second") else []
    return [*(f"{NAMES[name]} only" for name in pair), "ordered failover, 120 s", *multi, "offload first-fit",
            "offload estimate", "offload race"]  # fmt: skip


def multi_cluster(site: offload.Site, clusters: str):
    """The peer ``sbatch -M``: submitted with offload to the first cluster, ``--clusters`` among its options."""

    def submit(spec: JobSpec):
        extra = (*spec.resources.extra, f"--clusters={clusters}")
        return site.asubmit(dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, extra=extra)))

    return submit


async def measure(way: str, pair: list[offload.Site]) -> list[float]:
    first, second = pair
    group = offload.SiteGroup(pair)
    submit = {
        f"{NAMES[first.name]} only": first.asubmit,
        f"{NAMES[second.name]} only": second.asubmit,
        "ordered failover, 120 s": lambda spec: ordered_failover(first, second, spec),
        f"sbatch -M {first.name},{second.name}": multi_cluster(first, ",".join(CLUSTERS.get(s.name, "") for s in pair)),
        "offload first-fit": group.asubmit,
        "offload estimate": lambda spec: group.asubmit(spec, policy="estimate"),
        "offload race": lambda spec: group.asubmit(spec, policy="race", width=2),
    }[way]
    held = await load(pair)
    try:
        results = await asyncio.gather(*(started(submit, f"bench-place-{i}") for i in range(JOBS)))
        await asyncio.gather(*(j.finished(timeout=900) for _, j in results))
    finally:
        for j in held:
            await j.acancel()
    return [t for t, _ in results]


def run_way(way: str, pair: list[offload.Site]) -> list[float]:
    """One way's 16 times; ``sbatch -M`` with the second cluster in the first's slurmdbd only while it runs."""
    if not way.startswith("sbatch -M"):
        return offload._loop.run(measure(way, pair))
    subprocess.run([str(SLURM2), "accounting", "shared"], check=True)
    try:
        return offload._loop.run(measure(way, pair))
    finally:
        subprocess.run([str(SLURM2), "accounting", "own"], check=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stuck_rounds(env: dict[str, str]) -> str:
    """How many poll rounds a failover takes on a reason that never clears: the SLURM attempt is made to wait on
    a dependency that can never be met while both sites are busy; counted from the moment squeue shows the
    reason to the moment the Grid Engine attempt is recorded."""
    offload_cli = [sys.executable, "-m", "offload.cli"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*offload_cli, *args], capture_output=True, text=True, env=env, timeout=300)

    hog = ["--detach", "--nodes", "2", "--gpus-per-node", "2", "--name", "bench-hog", "--", "sleep", "300"]
    for site in ("testsite", "gridengine"):
        held = cli("run", "--site", site, *hog).stdout.strip()
        deadline = time.monotonic() + 120  # running, so that neither site could start the job now
        while "RUNNING" not in cli("status", "--site", site, held).stdout and time.monotonic() < deadline:
            time.sleep(0.5)
    client = subprocess.Popen([*offload_cli, "run", "--site", "testsite,gridengine", "--policy", "failover",
                               "--gpus", "1", "--", "true"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        attempt = None
        while attempt is None and time.monotonic() < deadline:
            attempt = next((a for a in attempts(cli) if a["site"] == "testsite" and a["job_id"]), None)
            time.sleep(0.5)
        assert attempt is not None, "no SLURM attempt"
        failed = cli("run", "--site", "testsite", "--", "false").stderr.split("submitted job ")[1].split()[0]
        subprocess.run(["scontrol", "update", f"jobid={attempt['job_id']}", f"dependency=afterok:{failed}"],
                       check=True, capture_output=True)  # fmt: skip
        reason = ["squeue", "-h", "-j", attempt["job_id"], "-o", "%r"]
        while "DependencyNeverSatisfied" not in subprocess.run(reason, capture_output=True, text=True).stdout:
            time.sleep(0.1)
        seen = time.monotonic()
        while not any(a["site"] == "gridengine" and a["job_id"] for a in attempts(cli)):
            time.sleep(0.1)
        moved = time.monotonic() - seen
    finally:
        client.kill()
        client.wait()
        for site in ("testsite", "gridengine"):
            cli("cancel", "--site", site, "--name", "bench-hog")
        for a in attempts(cli):
            if a["job_id"] and a["state"] in ("queued", "planned", "claimed"):
                cli("cancel", "--site", a["site"], a["job_id"])
    interval = offload.load_site("testsite").config.poll_interval
    return f"{moved:.1f} s after squeue showed the reason: {moved / interval:.1f} poll rounds of {interval:g} s"


def attempts(cli) -> list[dict]:
    """Every attempt of every placement in the records, from ``offload placements --json``."""
    return [a for p in json.loads(cli("placements", "--json").stdout or "[]") for a in p["attempts"]]


def output(attempt: dict) -> str:
    path = Path(attempt["jobdir"], "output")
    return path.read_text(errors="replace") if path.exists() else ""


def kills(env: dict[str, str], runs: int) -> str:
    """``runs`` races whose client is SIGKILLed at a random point, each then resumed; the payload's runs counted
    from every attempt's output (this runs as root on the site's machine)."""
    offload_cli = [sys.executable, "-m", "offload.cli"]
    once = never = twice = left = 0
    for run in range(runs):
        marker = f"PAYLOAD-{uuid.uuid4().hex[:8]}"
        client = subprocess.Popen([*offload_cli, "run", "--site", "@both", "--policy", "race", "--gpus", "1", "--",
                                   "sh", "-c", f"echo {marker}"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(random.Random(run).uniform(0.5, 12.0))
        client.kill()
        client.wait()
        found = json.loads(subprocess.run([*offload_cli, "placements", "--json"], capture_output=True, text=True,
                                          env=env).stdout or "[]")  # fmt: skip
        placement = found[0] if found else None  # the newest: this run's (the records are this run's alone)
        if placement is not None and placement["state"] != "failed":
            subprocess.run([*offload_cli, "placements", "resume", placement["id"]], capture_output=True, env=env,
                           timeout=600)  # fmt: skip
            placement = json.loads(subprocess.run([*offload_cli, "placements", "--json"], capture_output=True,
                                                  text=True, env=env).stdout)[0]  # fmt: skip
        ran = sum(1 for a in (placement or {"attempts": []})["attempts"] if marker in output(a))
        once, never, twice = once + (ran == 1), never + (ran == 0), twice + (ran > 1)
        time.sleep(3)
        left += len(subprocess.run(["squeue", "-h", "-u", "hpcuser", "-o", "%i"], capture_output=True,
                                   text=True).stdout.split())  # fmt: skip
        left += len(subprocess.run(["qstat", "-u", "hpcuser"], capture_output=True, text=True,
                                   env={**os.environ, **GE_ENV}).stdout.splitlines()[2:])  # fmt: skip
        print(f"[bench] kill {run + 1}/{runs}: ran {ran}", file=sys.stderr, flush=True)
        # fresh records for the next run: the newest placement is then this run's
        for path in Path(env["OFFLOAD_STATE_DIR"]).glob("jobs.sqlite*"):
            path.unlink()
    return (
        f"{runs} runs: payload once in {once}, never in {never} (killed before an attempt got in), twice in "
        f"{twice}; jobs left: {left}"
    )


def earlier_kills(out: str | None) -> str:
    """With ``--kills 0``: the killed-clients row of the report being replaced, said to be from then."""
    lines = Path(out).read_text().splitlines() if out and Path(out).exists() else []
    row = next((line for line in lines if line.startswith("- Clients SIGKILLed")), "")
    earlier = row.split(": ", 1)[1].rstrip(".") if ": " in row else ""
    return f"{earlier} (an earlier run; not rerun this time)" if earlier else "not run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("OFFLOAD_CONFIG", f"{TESTSITE}/offload.toml")
    tables: list[str] = []
    for title, names in PAIRS.items():
        pair = [offload.load_site(name) for name in names]
        times: dict[str, list[float]] = {way: [] for way in ways(names)}
        for _ in range(args.runs):
            for way in ways(names):
                print(f"[bench] placement, {title}: {way} ...", file=sys.stderr, flush=True)
                times[way] += run_way(way, pair)
        singles = [f"{NAMES[name]} only" for name in names]
        best = min(singles, key=lambda way: statistics.median(times[way]))
        tables += [f"### {title}: {' and '.join(names)} (the better single site: {best})", "",
                   "| way | p50 to start | p95 to start | p50 ratio to the better single site |",
                   "|---|---|---|---|"]  # fmt: skip
        for way in ways(names):
            p50, p95 = pct(times[way], 0.5), pct(times[way], 0.95)
            tables.append(f"| {way} | {p50:.1f} s | {p95:.1f} s | **{p50 / pct(times[best], 0.5):.2f}** |")
        tables.append("")
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "OFFLOAD_STATE_DIR": state}
        print("[bench] placement: failover on a never-clearing reason ...", file=sys.stderr, flush=True)
        try:
            stuck = stuck_rounds(env)
        except (AssertionError, OSError, subprocess.SubprocessError) as exc:  # the tables above still count
            stuck = f"not measured this run ({exc!r})"
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "OFFLOAD_STATE_DIR": state}
        killed = kills(env, args.kills) if args.kills else earlier_kills(args.out)
    report = "\n".join([
        "# Benchmark: one job, several sites",
        "",
        f"{JOBS} one-GPU jobs ({HOLD} s each) placed at once over two sites under scripted load (the first site's 4"
        f" GPUs held {FIRST_LOAD[1]} s, 2 of the second's 4 held {SECOND_LOAD[1]} s, each load asking for"
        f" {LOAD_WALLTIME} of walltime); {args.runs} run(s). What each way is and why: `bench/placement.py`.",
        "",
        *tables,
        f"- Failover on a never-clearing reason (DependencyNeverSatisfied): {stuck}.",
        f"- Clients SIGKILLed at a random point of a race, then resumed: {killed}.",
        "",
        f"Machine: {machine()}.",
        "",
    ])  # fmt: skip
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
