"""One job, several sites: it goes to the site where it starts first.

Name the sites you hold accounts on, or a group of them from your profile file::

    [groups]
    gpu = ["leonardo", "juwels"]

then::

    python examples/any_free_site.py --sites @gpu --gpus 4
    python examples/any_free_site.py --sites leonardo,juwels --gpus 1
    python examples/any_free_site.py --sites @gpu --gpus 1 --policy race   # the first of two to start runs it
    python examples/any_free_site.py --sites @gpu --gpus 1 --policy estimate --patience 120

Each site is asked once (``sinfo`` on SLURM, ``qhost`` on Grid Engine): a site that cannot run the job at all is
skipped with its reason, one where it could start now goes first. The same ranking, without submitting:
``offload sites rank --site @gpu --gpus 4``. With ``--policy race`` the job is submitted to the two best sites;
the first attempt to start runs the payload, exactly once, and the other is released and cancelled. With
``--policy estimate`` the sites are tried one at a time in the order their schedulers plan to start it
(``sbatch --test-only``, corrected by what offload learnt of each site); an attempt still waiting ``--patience``
seconds past its expected start lets the next site try too, keeping its own place.
"""

from __future__ import annotations

import argparse
import sys

import offload

PAYLOAD = "import os, socket; print(socket.gethostname(), os.environ.get('CUDA_VISIBLE_DEVICES', 'no GPU'))"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", required=True, help="'a,b' or '@group' of your profile file")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--policy", choices=["first-fit", "estimate", "race", "failover"], default="first-fit")
    parser.add_argument("--patience", type=float, default=300, help="seconds past the expected start")
    args = parser.parse_args()

    sites = offload.load_sites(args.sites)
    spec = offload.JobSpec(["python3", "-c", PAYLOAD], resources=offload.Resources(gpus=args.gpus, walltime="00:10:00"),
                           name="any-free-site")  # fmt: skip
    verdicts = sites.rank(spec, estimate=args.policy != "first-fit")
    for verdict in verdicts:
        print(f"{verdict.site}: {verdict.describe()}", file=sys.stderr)
    # racing, it returns once one attempt started (and was claimed)
    job = sites.submit(spec, ranked=verdicts, policy=args.policy, patience=args.patience,
                       say=lambda line: print(line, file=sys.stderr))  # fmt: skip
    print(f"submitted job {job.id} to {job.site.name}", file=sys.stderr)
    for line in job.logs(follow=True):
        print(line)
    status = job.wait()
    print(f"job {job.id} on {job.site.name}: {status.describe()}", file=sys.stderr)
    return status.exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
