"""User story 1: "I have a container, run it on a node with N GPUs".

Runs on this machine by default (the built-in ``local`` site); on an HPC site by naming it:

    python examples/gpu_job.py                       # local processes, no container
    python examples/gpu_job.py --site testsite       # SLURM over SSH, in the site's container image
    python examples/gpu_job.py --site leonardo --gpus 4 --image docker://ghcr.io/me/train:1
"""

from __future__ import annotations

import argparse
import sys

import offload

PAYLOAD = """
import os, platform, socket
gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
print(f"host {socket.gethostname()}, {platform.python_implementation()} {platform.python_version()}")
print(f"GPUs visible: {gpus or 'none'}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default=None, help="site profile (default: $OFFLOAD_SITE, else 'local')")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--image", default=None, help="container image (default: the site's)")
    args = parser.parse_args()

    site = offload.load_site(args.site)
    spec = offload.JobSpec(
        ["python3", "-c", PAYLOAD],
        image=args.image,
        resources=offload.Resources(gpus=args.gpus, walltime="00:10:00"),
        name="gpu-example",
    )
    job = site.submit(spec)
    print(f"submitted job {job.id} to {site.name}", file=sys.stderr)
    for line in job.logs(follow=True):
        print(line)
    status = job.wait()
    print(f"job {job.id}: {status.describe()}", file=sys.stderr)
    return status.exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
