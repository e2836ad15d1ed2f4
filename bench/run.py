"""Run every benchmark against the test site (or the site of $OFFLOAD_CONFIG) and write the Markdown table.

    python bench/run.py [--runs 3] [--out docs/benchmarks.md]

Each row compares offload with a peer in the same run, alternating, medians over the runs. Ratios are
offload/peer: for times below 1 is better for offload, for rates above 1 is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import scaleup
import submit
import transfer
from common import machine, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    args = parser.parse_args()
    started = time.time()
    rows = []
    for name, measure in (
        ("scale-up", lambda: scaleup.measure(runs=args.runs)),
        ("submission", lambda: submit.rate_rows(args.runs)),
        ("WAN", lambda: submit.wan_rows(args.runs)),
        ("polling", lambda: submit.polling_rows()),
        ("forwards", lambda: transfer.forward_rows(args.runs)),
        ("files", lambda: transfer.file_rows(args.runs)),
    ):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows += measure()
    report = "\n".join([
        "# Benchmarks",
        "",
        "offload side by side with a peer, in one process, on the same test site, alternating, medians over",
        "the runs. Ratios are offload/peer: for times below 1 favours offload, for rates (jobs/s) above 1 does.",
        "Rerun: `tox -e bench` (or `python bench/run.py --runs 3 --out docs/benchmarks.md` with the test site",
        "up); each file in `bench/` says what it measures and how the peer is set up.",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} on {machine()},",
        f"{args.runs} alternating runs per row, in {time.time() - started:.0f} s.",
        "",
        table(rows),
        "",
    ])  # fmt: skip
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
