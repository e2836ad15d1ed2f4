"""User story 3 for Dask: existing analysis code, its heavy lifting on GPU workers of an HPC site.

Only the line that makes the cluster knows about the site:

    python examples/dask_gpu.py                          # this machine (the local site)
    python examples/dask_gpu.py --site testsite          # 4 GPU workers: SLURM jobs on 2 nodes, in containers
    python examples/dask_gpu.py --site leonardo --image docker://ghcr.io/me/analysis:1.2
"""

from __future__ import annotations

import argparse
import os
import socket
from collections import Counter

from dask_offload import OffloadCluster


def analyse(chunk: int) -> tuple[str, str, float]:
    """Stands for a GPU kernel: it reports where it ran."""
    total = sum(i * i for i in range(chunk * 10_000, (chunk + 1) * 10_000))
    return socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES", "-"), total**0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default=None)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--image", default=None)
    args = parser.parse_args()

    with OffloadCluster(site=args.site, gpus=args.gpus, image=args.image, walltime="00:30:00") as cluster:
        client = cluster.get_client()
        client.wait_for_workers(args.gpus, timeout=600)
        print(f"{args.gpus} GPU workers ready; dashboard: {cluster.dashboard_link}")
        futures = client.map(analyse, range(40), resources={"GPU": 1})
        results = client.gather(futures)
        by_gpu = Counter(f"{host}/{gpu}" for host, gpu, _ in results)
        print(f"40 chunks analysed; chunks per node/GPU: {dict(sorted(by_gpu.items()))}")


if __name__ == "__main__":
    main()
