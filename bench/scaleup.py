"""Time to N ready Dask workers: OffloadCluster over SSH vs dask-jobqueue's SLURMCluster submitting locally.

Two shapes, each worker with 1 thread and 1 GiB, set up the same way in both clusters:

* packed: 4 workers per job (a 4-GPU node's worth), N = 1, 8, 16;
* one worker per job (``processes=1, cores=1, memory="1GiB"``: N jobs for N workers), N = 16 and 40, the harsh
  case: every worker pays its own job start, container start, imports and TLS handshake. The test site has 48
  CPUs over 3 nodes, one of them taken by offload's scheduler job, so 40 one-CPU jobs all run at once.

Both clocks run from the cluster's constructor to ``wait_for_workers(N)``. dask-jobqueue runs its scheduler in
the client process and its workers outside any container; offload starts its scheduler as a job, reaches it
through an SSH port forward, uses TLS and runs every worker in Charliecloud. Targets: ratio at or below 0.8 at
N=16 packed, at or below 0.5 with one worker per job (issue 30). ``bench/profile_scaleup.py`` says where the
seconds of the one-worker-per-job rows go.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings

from common import Comparison, alternate, squeue_empty

PER_JOB = 4  # the packed rows
PACKED_SIZES = (1, 8, 16)
ONE_PER_JOB_SIZES = (16, 40)
PEER = "dask-jobqueue SLURMCluster"


LOGIN_ADDRESS = "10.231.77.1"  # the login node on the test site's cluster network (scripts/testsite)
OPEN_PORT = 60190  # in its SRUN_PORTS range, which nodes may reach


def offload_time(n: int, per_job: int = PER_JOB) -> float:
    from distributed import Client

    from dask_offload import OffloadCluster

    start = time.perf_counter()
    # the same keywords as the SLURMCluster below (cores and memory are the job's, in both)
    with OffloadCluster(site="testsite", queue="cpu", n_workers=n, processes=per_job, cores=per_job,
                        memory=f"{per_job}GiB", walltime="00:10:00") as cluster, Client(cluster) as client:  # fmt: skip
        client.wait_for_workers(n, timeout=300)
        seconds = time.perf_counter() - start  # closing is not part of getting ready
    squeue_empty()
    return seconds


def jobqueue_time(n: int, per_job: int = PER_JOB) -> float:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    logs = tempfile.mkdtemp(prefix="jobqueue-logs-")
    start = time.perf_counter()
    # dask-jobqueue's workers connect to its scheduler, which the test site's nodes may do only on the ports
    # it keeps open for srun (as a site that lets nodes reach its login node would): its best case here.
    with SLURMCluster(queue="cpu", cores=per_job, processes=per_job, memory=f"{per_job}GiB",
                      walltime="00:10:00", python=sys.executable, log_directory=logs, n_workers=n,
                      scheduler_options={"host": LOGIN_ADDRESS, "port": OPEN_PORT, "dashboard_address": ":0"},
                      ) as cluster, Client(cluster) as client:  # fmt: skip
        client.wait_for_workers(n, timeout=300)
        seconds = time.perf_counter() - start
    squeue_empty()
    return seconds


def setup() -> None:
    logging.getLogger("distributed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Mismatched versions")  # Python 3.11.7 here, 3.11.2 in the image
    os.environ.setdefault(
        "OFFLOAD_CONFIG", f"{os.environ.get('OFFLOAD_TESTSITE_DIR', '/var/lib/offload-testsite')}/offload.toml"
    )


def measure(sizes: tuple[int, ...] = PACKED_SIZES, runs: int = 3,
            one_per_job: tuple[int, ...] = ONE_PER_JOB_SIZES) -> list[Comparison]:  # fmt: skip
    setup()
    rows = []
    for n in sizes:
        ours, theirs = alternate(runs, lambda n=n: offload_time(n), lambda n=n: jobqueue_time(n))
        rows.append(Comparison(f"time to {n} ready Dask workers, {PER_JOB} workers per job", PEER, ours, theirs,
                               target="<= 0.8 at N=16" if n == 16 else ""))  # fmt: skip
    for n in one_per_job:
        ours, theirs = alternate(runs, lambda n=n: offload_time(n, 1), lambda n=n: jobqueue_time(n, 1))
        rows.append(Comparison(f"time to {n} ready Dask workers, one worker per job ({n} jobs)", PEER, ours, theirs,
                               target="<= 0.5"))  # fmt: skip
    return rows


if __name__ == "__main__":
    import argparse

    from common import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "3")))
    parser.add_argument("--packed", default=",".join(map(str, PACKED_SIZES)), help="N of the packed rows ('' none)")
    parser.add_argument("--one-per-job", default=",".join(map(str, ONE_PER_JOB_SIZES)), help="N of the harsh rows")
    args = parser.parse_args()

    def sizes(text: str) -> tuple[int, ...]:
        return tuple(int(n) for n in text.split(",") if n)

    print(table(measure(sizes(args.packed), args.runs, sizes(args.one_per_job))))
