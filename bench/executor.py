"""Python functions as jobs: ``offload.Executor`` side by side with submitit, on the test site.

    python bench/executor.py [--runs 3] [--out docs/benchmarks-executor.md]     # or: tox -e bench-executor

* 100 trivial calls: ``Executor.map`` (one job array of 100 tasks) vs submitit's ``map_array`` (the same);
* 10 calls each returning 50 MB: the same two calls, every result read back into this process.

Each row is the time from the call to the last result in hand, medians over alternating runs; the ratio is
offload/submitit (below 1 favours offload). Both sides are warm: offload's connection is open and its version
check done, submitit is imported and its folder made.

How each runs, which is not the same work:

* offload goes through its one SSH connection to the login node as the site's user, runs every call in the
  site's Charliecloud image (``ch-run``), stages the function and arguments with the submission and reads the
  results back over SFTP;
* submitit must run *on the login node* (here: this machine, as root), pickles into a folder the nodes share,
  and runs each call with this very interpreter on the node (``srun python -m submitit.core._submit``), no
  container; it reads results from that shared folder directly.

So offload pays SSH, SFTP and a container start per task that submitit does not, for running from anywhere.
Not run by the session that wrote it (no test site up there): run it where ``scripts/testsite up`` works.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import TESTSITE, Comparison, alternate, machine, table, timed

import offload

CALLS = 100
BIG_CALLS = 10
BIG = 50 * 1000 * 1000  # bytes each big call returns
NAMES = ("bench-executor", "bench-submitit")


def trivial(x):
    return x + 1


def fifty_megabytes(i):
    return bytes([i % 256]) * BIG


def cancel_all() -> None:
    """Cancel what the benchmark left (by name: other users of the site are left alone)."""
    for name in NAMES:
        subprocess.run(["scancel", f"--name={name}"], check=False)


def offload_side():
    os.environ.setdefault("OFFLOAD_CONFIG", f"{TESTSITE}/offload.toml")
    ex = offload.Executor("testsite", name="bench-executor", walltime="00:10:00")
    ex.check()  # the connection, the image's Python: once per process, not measured
    assert list(ex.map(trivial, [1])) == [2]  # and one array through the image cache, warm

    def calls() -> None:
        assert list(ex.map(trivial, range(CALLS))) == [x + 1 for x in range(CALLS)]

    def big() -> None:
        for i, data in enumerate(ex.map(fifty_megabytes, range(BIG_CALLS))):
            assert len(data) == BIG and data[:1] == bytes([i % 256])

    return ex, calls, big


def submitit_side():
    import submitit

    folder = Path(tempfile.mkdtemp(prefix="bench-submitit-"))
    os.chmod(folder, 0o755)
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    ex.update_parameters(slurm_partition="cpu", timeout_min=10, slurm_job_name="bench-submitit",
                         slurm_array_parallelism=CALLS)  # fmt: skip
    assert [job.result() for job in ex.map_array(trivial, [1])] == [2]  # warm, as offload's side is

    def calls() -> None:
        jobs = ex.map_array(trivial, range(CALLS))
        assert [job.result() for job in jobs] == [x + 1 for x in range(CALLS)]

    def big() -> None:
        jobs = ex.map_array(fifty_megabytes, range(BIG_CALLS))
        for i, job in enumerate(jobs):
            data = job.result()
            assert len(data) == BIG and data[:1] == bytes([i % 256])

    return calls, big


def rows(runs: int) -> list[Comparison]:
    try:
        ex, offload_calls, offload_big = offload_side()
        submitit_calls, submitit_big = submitit_side()
        out = []
        for what, mine, theirs in (
            (f"{CALLS} trivial calls as one array, to the last result", offload_calls, submitit_calls),
            (f"{BIG_CALLS} calls returning 50 MB each, all read back", offload_big, submitit_big),
        ):
            print(f"[bench] executor: {what} ...", file=sys.stderr, flush=True)
            ours, other = alternate(runs, lambda m=mine: timed(m), lambda t=theirs: timed(t))
            out.append(Comparison(what, "submitit", ours, other))
        ex.shutdown(wait=False)
        return out
    finally:
        cancel_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    args = parser.parse_args()
    started = time.time()
    report = "\n".join([
        "# Benchmark: offload.Executor and submitit",
        "",
        "Python functions as jobs on the test site, side by side, alternating, medians over the runs; the ratio",
        "is offload/submitit (below 1 favours offload). See `bench/executor.py` for how each side runs (offload",
        "over SSH in the site's container image, submitit on the login node with the client's own Python).",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} on {machine()}, {args.runs} runs.",
        "",
        table(rows(args.runs)),
        "",
    ])  # fmt: skip
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
