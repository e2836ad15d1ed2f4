"""A dask-jobqueue script moved to offload: only the import and ``site=``/``image=`` changed.

It was, on the login node of a site:

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=2, processes=2, memory="2GB", queue="cpu", walltime="00:20:00",
                           job_script_prologue=["echo worker job on $(hostname)"])

and is now, from anywhere (a laptop, a hub), the same keywords with the same meaning:

    python examples/dask_from_jobqueue.py                      # this machine (the local site)
    python examples/dask_from_jobqueue.py --site testsite      # SLURM jobs on the test site
"""

from __future__ import annotations

import argparse

from distributed import Client

from dask_offload import OffloadCluster as SLURMCluster


def inc(x: int) -> int:
    return x + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default=None)
    parser.add_argument("--image", default=None)
    args = parser.parse_args()

    cluster = SLURMCluster(site=args.site, image=args.image, cores=2, processes=2, memory="2GB", queue="cpu",
                           walltime="00:20:00", job_script_prologue=["echo worker job on $(hostname)"])  # fmt: skip
    cluster.scale(jobs=2)  # two jobs of two workers, one thread and 1 GB each
    client = Client(cluster)
    client.wait_for_workers(4, timeout=300)
    threads = sorted(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values())
    print(f"{len(threads)} workers with {threads} threads; sum: {sum(client.gather(client.map(inc, range(100))))}")
    client.close()
    cluster.close()


if __name__ == "__main__":
    main()
