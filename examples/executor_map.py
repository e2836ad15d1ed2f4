"""Python functions as jobs: ``offload.Executor``, a ``concurrent.futures`` executor whose calls run on a site.

Runs on this machine by default (the built-in ``local`` site: each call a local process); on an HPC site by
naming it, where ``map`` sends one job array and every call runs in the site's container image:

    python examples/executor_map.py                          # local processes
    python examples/executor_map.py --site testsite          # SLURM over SSH, one array of 4 tasks
    python examples/executor_map.py --site leonardo --gpus 1 --image docker://python:3.11-slim

Nothing needs installing in the image but Python at this client's minor version: the functions below travel
by value (this file is ``__main__``, which the site cannot import), and so does cloudpickle if it lacks it.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys

import offload


def estimate_pi(seed: int, samples: int = 200_000) -> tuple[float, str, str]:
    """One Monte Carlo estimate of pi, and where it ran (host, GPUs it was given)."""
    if seed < 0:
        raise ValueError(f"seeds are non-negative, got {seed}")
    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples, socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default=None, help="site profile (default: $OFFLOAD_SITE, else 'local')")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per job")
    parser.add_argument("--image", default=None, help="container image (default: the site's)")
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--chunksize", type=int, default=4, help="calls per array task")
    args = parser.parse_args()

    with offload.Executor(site=args.site, gpus=args.gpus or None, image=args.image, walltime="00:10:00",
                          name="executor-example") as ex:  # fmt: skip
        found = ex.check()  # before anything is queued: the image's Python must be this one's minor version
        print(f"calls run with {found.implementation} {found.version_text} ({found.where})", file=sys.stderr)

        estimates = list(ex.map(estimate_pi, range(args.calls), chunksize=args.chunksize))
        mean = sum(e for e, _, _ in estimates) / len(estimates)
        hosts = sorted({host for _, host, _ in estimates})
        print(f"pi is about {mean:.3f} ({args.calls} calls in {-(-args.calls // args.chunksize)} tasks)")
        print(f"ran on: {', '.join(hosts)}")
        if args.gpus:
            print(f"GPUs seen: {sorted({gpus for _, _, gpus in estimates})}")

        future = ex.submit(estimate_pi, -1)  # raises on the site: the exception comes back, traceback and all
        try:
            future.result()
        except ValueError as exc:
            print(f"the site raised: {exc!r} in job {future.job.id} (its remote traceback is exc.__cause__)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
