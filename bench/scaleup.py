"""Time to N ready Dask workers: OffloadCluster over SSH vs dask-jobqueue's SLURMCluster submitting locally.

Both pack 4 workers per job (a 4-GPU node's worth) with 1 thread and 1 GiB each, and both clocks run from
the cluster's constructor to ``wait_for_workers(N)``. dask-jobqueue runs its scheduler in the client process
and its workers outside any container; offload starts its scheduler as a job, reaches it through an SSH port
forward, uses TLS and runs every worker in Charliecloud. Target: ratio at or below 0.8 at N=16.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings

from common import Comparison, alternate, squeue_empty

PER_JOB = 4


LOGIN_ADDRESS = "10.231.77.1"  # the login node on the test site's cluster network (scripts/testsite)
OPEN_PORT = 60190  # in its SRUN_PORTS range, which nodes may reach


def offload_time(n: int) -> float:
    from distributed import Client

    from dask_offload import OffloadCluster

    start = time.perf_counter()
    # the same keywords as the SLURMCluster below (cores and memory are the job's, in both)
    with OffloadCluster(site="testsite", queue="cpu", n_workers=n, processes=PER_JOB, cores=PER_JOB,
                        memory=f"{PER_JOB}GiB", walltime="00:10:00") as cluster, Client(cluster) as client:  # fmt: skip
        client.wait_for_workers(n, timeout=300)
        seconds = time.perf_counter() - start  # closing is not part of getting ready
    squeue_empty()
    return seconds


def jobqueue_time(n: int) -> float:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    logs = tempfile.mkdtemp(prefix="jobqueue-logs-")
    start = time.perf_counter()
    # dask-jobqueue's workers connect to its scheduler, which the test site's nodes may do only on the ports
    # it keeps open for srun (as a site that lets nodes reach its login node would): its best case here.
    with SLURMCluster(queue="cpu", cores=PER_JOB, processes=PER_JOB, memory=f"{PER_JOB}GiB",
                      walltime="00:10:00", python=sys.executable, log_directory=logs, n_workers=n,
                      scheduler_options={"host": LOGIN_ADDRESS, "port": OPEN_PORT, "dashboard_address": ":0"},
                      ) as cluster, Client(cluster) as client:  # fmt: skip
        client.wait_for_workers(n, timeout=300)
        seconds = time.perf_counter() - start
    squeue_empty()
    return seconds


def measure(sizes: tuple[int, ...] = (1, 8, 16), runs: int = 3) -> list[Comparison]:
    logging.getLogger("distributed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Mismatched versions")  # Python 3.11.7 here, 3.11.2 in the image
    os.environ.setdefault(
        "OFFLOAD_CONFIG", f"{os.environ.get('OFFLOAD_TESTSITE_DIR', '/var/lib/offload-testsite')}/offload.toml"
    )
    rows = []
    for n in sizes:
        ours, theirs = alternate(runs, lambda n=n: offload_time(n), lambda n=n: jobqueue_time(n))
        rows.append(Comparison(f"time to {n} ready Dask workers", "dask-jobqueue SLURMCluster", ours, theirs,
                               target="<= 0.8 at N=16" if n == 16 else ""))  # fmt: skip
    return rows


if __name__ == "__main__":
    from common import table

    print(table(measure(runs=int(os.environ.get("BENCH_RUNS", "3")))))
